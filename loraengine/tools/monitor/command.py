"""`loraengine monitor RUN_DIR`: serve the live page of a run on this machine."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from loraengine.cli.common import State, reports_errors
from loraengine.core.errors import ConfigError


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="The run's output.name, when the folder holds "
              "several runs or the run has not started yet (default: the newest stream).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (keep 127.0.0.1 and tunnel: ssh -L PORT:127.0.0.1:PORT).")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on; 0 picks a free one.")
@click.pass_obj
@reports_errors
def monitor(state: State, run_dir: Path, name: str | None, host: str, port: int) -> None:
    """Show a run's live loss, LR and validation curves, newest preview grid, progress
    and config in a local web page. RUN_DIR is the run's output.dir (or an events file);
    the page follows <name>.events.jsonl as the run writes it."""
    from loraengine.tools.monitor.logic import find_events, make_app

    events = find_events(run_dir, name)
    try:
        sock = socket.create_server((host, port))
    except OSError as exc:
        raise ConfigError(f"--host/--port: cannot listen on {host}:{port}: "
                          f"{exc.strerror or exc}") from None
    import uvicorn

    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"monitoring {events}", err=True)
    click.echo(f"serving http://{shown}:{bound}/ (Ctrl-C to stop)", err=False)
    server = uvicorn.Server(uvicorn.Config(make_app(events), log_level="warning",
                                           lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
