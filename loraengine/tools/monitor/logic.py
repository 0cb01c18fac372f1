"""`loraengine monitor`: a local web page that follows a run's JSON-lines event stream.

The page (``static/``: one HTML file, its script and its style sheet, nothing fetched
from elsewhere) asks ``/api/events?since=OFFSET`` about once a second and gets the
events written since that byte offset; it draws the loss, validation-loss and LR curves
itself, shows the newest preview grid (``/api/file``, only PNGs under the run folder),
progress with rate and ETA, and the run's config. Plain polling of a small JSON
endpoint goes through any SSH tunnel or proxy unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraengine.core.errors import ConfigError

STATIC = Path(__file__).resolve().parent / "static"
#: The most bytes of the stream one answer carries; the page asks again for the rest.
CHUNK = 4 << 20
SUFFIX = ".events.jsonl"


def find_events(run: Path, name: str | None = None) -> Path:
    """The event stream to follow: ``run`` itself when it is a file, else
    ``<run>/<name>.events.jsonl`` (which may not exist yet: the page waits for it), else
    the newest ``*.events.jsonl`` file in the folder. A ``ConfigError`` (exit 2) when
    there is no such folder, it holds no stream, the stream is a folder, or ``name`` is
    not a plain file name (``../..`` would reach out of the run folder)."""
    run = Path(run)
    if name is not None and (name in ("", ".", "..") or Path(name).name != name
                             or "\0" in name):
        raise ConfigError(f"--name {name!r}: not a plain file name (the run's output.name, "
                          f"without a folder)")
    if run.is_file():
        return run
    if not run.is_dir():
        raise ConfigError(f"RUN_DIR: {run} is not a folder or an events file")
    if name is not None:
        events = run / f"{name}{SUFFIX}"
        if os.path.lexists(events) and not events.is_file():
            raise ConfigError(f"--name: {events} is not a file (a folder?); the page "
                              f"follows the run's events file")
        return events
    found = sorted((p for p in run.glob(f"*{SUFFIX}") if p.is_file()),
                   key=lambda p: (p.stat().st_mtime, p.name))
    if not found:
        raise ConfigError(f"RUN_DIR: no *{SUFFIX} file in {run}; a run writes "
                          f"<name>{SUFFIX} with output.loggers: [events] (the default), or "
                          f"pass --name to wait for one")
    return found[-1]


@dataclass
class Chunk:
    """Events read from ``offset`` up to ``next_offset`` (the end of the last whole
    line). ``reset``: the file is shorter than the offset asked for (a new run
    rewrote it), so these events start again from its beginning."""

    events: list[dict[str, Any]]
    offset: int
    next_offset: int
    reset: bool
    exists: bool

    def as_json(self) -> dict[str, Any]:
        return {"events": self.events, "offset": self.offset, "next": self.next_offset,
                "reset": self.reset, "exists": self.exists}


def read_events(path: Path, since: int = 0, limit: int = CHUNK) -> Chunk:
    """The whole lines of ``path`` after byte ``since``, parsed; a line still being
    written (no newline yet) waits for the next call, and a line that is not a JSON
    object is skipped."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            reset = since > size
            start = 0 if reset else max(0, since)
            fh.seek(start)
            data = fh.read(limit)
    except FileNotFoundError:
        return Chunk([], since, since, False, False)
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return Chunk(events, start, start + end, reset, True)


def served_file(root: Path, requested: str) -> Path | None:
    """``requested`` (absolute, or relative to ``root``) when it is a PNG file inside
    ``root``; ``None`` for anything else, so the page can show grids and nothing more."""
    root = root.resolve()
    path = Path(requested)
    try:
        path = (path if path.is_absolute() else root / path).resolve()
        if path.suffix.lower() != ".png" or not path.is_file():
            return None
    except (OSError, ValueError):  # a NUL byte, a name too long, a loop of links
        return None
    try:
        path.relative_to(root)
    except ValueError:
        return None
    return path


def make_app(events: Path) -> Any:
    """The starlette application serving the page for the stream ``events``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    root = events.parent

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def api_events(request: Request) -> Response:
        try:
            since = int(request.query_params.get("since", "0"))
        except ValueError:
            return JSONResponse({"error": "since: expected a byte offset"}, status_code=400)
        try:
            chunk = read_events(events, since)
        except OSError as exc:  # the stream became a folder, or unreadable
            return JSONResponse({"error": f"{events.name}: cannot be read "
                                 f"({exc.strerror or exc})"}, status_code=409)
        body = chunk.as_json() | {"file": events.name}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def api_file(request: Request) -> Response:
        path = served_file(root, request.query_params.get("path", ""))
        if path is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})

    return Starlette(routes=[
        Route("/", index),
        Route("/api/events", api_events),
        Route("/api/file", api_file),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ])


class Serving:
    """The page served from a background thread while the block runs (tests, the
    screenshot script): ``with Serving(events) as url: ...``. Port 0 picks a free one."""

    def __init__(self, events: Path, host: str = "127.0.0.1", port: int = 0):
        self.events, self.host, self.port = Path(events), host, port
        self.server: Any = None
        self.thread: Any = None

    def __enter__(self) -> str:
        import socket
        import threading
        import time

        import uvicorn

        self.sock = socket.create_server((self.host, self.port))
        port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(make_app(self.events), log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive():
            if time.monotonic() > deadline:
                raise RuntimeError("the monitor did not start within 30 s")
            time.sleep(0.02)
        return f"http://{self.host}:{port}/"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
