"""Adapter files: atomic writes, metadata, key formats and reading a file back into
per-module tensors with each module's algorithm (the one reader train, ``apply``,
``merge`` and ``inspect`` share)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from loraengine.core.adapter.layer import DELTA_KEYS, split_deltas
from loraengine.core.data import read_safetensors
from loraengine.core.errors import DataError, NonFiniteError, OutputError
from loraengine.core.plugins.registry import Registry
from loraengine.core.plugins.specs import AdapterSpec, ExporterSpec

# ComfyUI names trained files ``<prefix>_<N>_steps_<counter>_``; others use ``_steps_<N>_``
_STEPS_IN_NAME = (re.compile(r"_(\d+)_steps_"), re.compile(r"_steps_(\d+)_"))


# How writers other than Python's own report a failed write: torch's zip writer and
# safetensors raise RuntimeError-like errors whose text carries the OS error.
_IO_FAILURE = re.compile(r"No space left|Disk quota|Input/output error|Read-only file "
                         r"system|IoError|file write failed|PytorchStreamWriter failed")


def read_text(path: Path, what: str) -> str:
    """A small text file a user names (prompts, captions), read whole: a missing file,
    one that is not a regular file (a FIFO would block), a read error, bytes that are
    not UTF-8 (the byte, its offset and line named) or a NUL character are each one
    ``DataError`` line that starts with ``what`` (the option or key) and the path."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} file not found: {path}")
    if not path.is_file():
        raise DataError(f"{what} {path}: not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{what} {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                        f"offset {exc.start}, line {line})") from None
    if "\x00" in text:
        at = text.index("\x00")
        raise DataError(f"{what} {path}: a NUL character at line "
                        f"{text.count(chr(10), 0, at) + 1} (not a text file?)")
    return text


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed when ``exc`` is the operating system refusing it (disk full,
    an I/O error, a read-only file system), in a few words; ``None`` for other errors."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, Exception) and _IO_FAILURE.search(str(exc)):
        found = _IO_FAILURE.search(str(exc))
        text = found.group() if found else str(exc)
        return {"IoError": "I/O error", "file write failed": "write failed",
                "PytorchStreamWriter failed": "write failed"}.get(text, text)
    return None


def _kept(path: Path, existed: bool) -> str:
    return (f"the previous {path.name} is unchanged" if existed
            else f"no {path.name} was written")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success fsync and rename it over
    ``path``. On failure the temporary file is removed and ``path`` is untouched; a
    failure of the operating system (disk full, I/O error) becomes an ``OutputError``
    naming the file and what was kept."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({write_failure(exc)}); "
                          f"{_kept(path, path.exists())}") from None
    os.close(fd)
    existed = path.exists()
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        reason = write_failure(exc)
        if reason is None or isinstance(exc, OutputError):
            raise
        raise OutputError(f"{path}: cannot write ({reason}); {_kept(path, existed)}, "
                          f"nothing half-written is left") from None


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is renamed to ``path``.

    An existing ``path`` is moved aside first and removed only once the new folder is in
    place (a failed rename puts it back). On failure the temporary folder is removed and
    ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old",
                                        dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: umask() can only be read by setting it


def _umask() -> int:
    return _UMASK


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, writer: Callable[[Path], object]) -> None:
    """Write ``path`` through ``writer(temporary_path)`` so it appears whole or not at all."""
    with atomic_path(path) as tmp:
        writer(tmp)


def path_overlap(out: Path, source: Path) -> str | None:
    """How an output path collides with an input, links resolved: ``"is"`` (the same
    file or folder), ``"contains"`` (the input lies inside the output), ``"is inside"``
    (the output lies inside the input), or ``None`` when they are apart."""
    out, source = Path(os.path.realpath(out)), Path(os.path.realpath(source))
    if out == source:
        return "is"
    if source.is_relative_to(out):
        return "contains"
    if out.is_relative_to(source):
        return "is inside"
    return None


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_pair(lat_path: Path, cond_path: Path, lat: Mapping[str, torch.Tensor],
               cond: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
               ) -> None:
    """Write a latents file and its conditioning file as a pair: both are written in
    full (and flushed to disk) to temporary files beside them before either replaces
    an earlier file, so a failed write leaves both as they were and no temporary file."""
    meta = dict(metadata) if metadata is not None else None
    with atomic_path(lat_path) as tmp_lat, atomic_path(cond_path) as tmp_cond:
        for path, tmp, tensors in ((lat_path, tmp_lat, lat), (cond_path, tmp_cond, cond)):
            try:
                save_file(dict(tensors), str(tmp), metadata=meta)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            except Exception as exc:
                reason = write_failure(exc)
                if reason is None:
                    raise
                raise OutputError(f"{path}: cannot write ({reason}); neither {lat_path.name} "
                                  f"nor {cond_path.name} was changed, nothing half-written "
                                  f"is left") from None


def save_lora(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
              ) -> None:
    """Write a LoRA file atomically. Refuses non-finite tensors (nothing is written)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not
           bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"refusing to write {path}: non-finite values in "
                             f"{', '.join(sorted(bad)[:5])}{' ...' if len(bad) > 5 else ''}")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    data = {k: v.contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda p: save_file(data, str(p), metadata=meta))


def write_adapter_file(path: Path, modules: Mapping[str, Mapping[str, torch.Tensor]],
                       exporter: ExporterSpec, metadata: Mapping[str, Any],
                       layouts: Mapping[str, Mapping[str, str]] | None = None
                       ) -> dict[str, torch.Tensor]:
    """Write ``{module_path: {param: tensor}}`` in ``exporter``'s key format, atomically
    (``save_lora``), in the module layout it asks for (``in_layout``, ``layouts`` from
    ``module_layouts``); returns the file's tensors by key."""
    tensors = exporter.to_file(in_layout(modules, exporter, layouts or {}))
    save_lora(path, tensors, metadata)
    return tensors


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata (strings by key)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:
        raise DataError(f"{path}: not a readable safetensors file ({exc})") from None


def load_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors and metadata, errors naming the file."""
    tensors = read_safetensors(Path(path), "LoRA")
    return tensors, read_metadata(path)


def steps_of(path: Path, metadata: Mapping[str, str]) -> int:
    """Steps already trained into a file: metadata first, then the name (ComfyUI's
    ``..._<N>_steps_...`` or ``..._steps_<N>_...``)."""
    for key in ("loraengine.steps", "ss_steps"):
        if key in metadata:
            try:
                return int(metadata[key])
            except ValueError:
                pass
    name = Path(path).name + "_"
    for pattern in _STEPS_IN_NAME:
        m = pattern.search(name)
        if m:
            return int(m.group(1))
    return 0


class _ReadKeys(Mapping[str, torch.Tensor]):
    """A file's tensors as a key format's ``from_file`` sees them, noting the keys it
    reads: one by one, or all of them where it copies or iterates the values."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors, self.read = tensors, set[str]()

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self._tensors[key]
        self.read.add(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def split_modules(tensors: Mapping[str, torch.Tensor], exporters: Iterable[ExporterSpec],
                  module_paths: Iterable[str], aliases: Mapping[str, str] | None = None
                  ) -> tuple[str, dict[str, dict[str, torch.Tensor]], tuple[str, ...]]:
    """Find the exporter whose key format the file is in and group tensors per module;
    the keys that format left unread come last (sorted).

    ``aliases`` (``{name in another layout: module path}``, see ``module_layouts``) are
    offered to the key formats as paths too; modules found under one are renamed to
    the model's path. Where two formats share a prefix (ComfyUI's ``diffusion_model.``
    and a family's own names under it), the first that places every module on a layer
    of the model wins, else the first that reads the file at all."""
    exporters = list(exporters)
    paths = list(module_paths)
    known = set(paths)
    aliases = dict(aliases or {})
    first: tuple[str, dict[str, dict[str, torch.Tensor]], tuple[str, ...]] | None = None
    for exporter in exporters:
        seen = _ReadKeys(tensors)
        grouped = exporter.from_file(seen, [*paths, *aliases])
        if grouped:
            out: dict[str, dict[str, torch.Tensor]] = {}
            for module, params in grouped.items():
                out.setdefault(aliases.get(module, module), {}).update(params)
            unread = tuple(sorted(set(tensors) - seen.read))
            if not known or set(out) <= known:
                return exporter.name, out, unread
            first = first or (exporter.name, out, unread)
    if first is not None:
        return first
    if not tensors:
        raise DataError("the file holds no tensors")
    sample = ", ".join(sorted(tensors)[:3])
    raise DataError(f"no key format matches this file's tensors (e.g. {sample}) against "
                    f"the model's layers (key formats tried: "
                    f"{', '.join(e.name for e in exporters)})")


def module_layouts(registry: Registry, model: nn.Module) -> dict[str, dict[str, str]]:
    """The other layouts ``model``'s layers are named in, as its model family says
    (``ModelFamilySpec.layouts``): ``{layout: {module path: name there}}``."""
    for spec in registry.specs("model"):
        if spec.layouts is None:
            continue
        found = spec.layouts(model)
        if found:
            return {name: dict(names) for name, names in found.items()}
    return {}


def looks_like(registry: Registry, names: Collection[str]) -> str | None:
    """Which model ``names`` (module names of a file) belong to, as the first model
    family that recognises them says (``ModelFamilySpec.looks_like``)."""
    for spec in registry.specs("model"):
        if spec.looks_like is not None:
            found = spec.looks_like(names)
            if found:
                return found
    return None


def unplaced_message(file: AdapterFile, unknown: Sequence[str], registry: Registry,
                     model: nn.Module | None = None, what: str = "layers") -> str:
    """One line on a file's modules that fit no layer of the model: how many, the first
    ones, the key formats and module layouts tried, and which model they look made for
    when that is another one."""
    line = (f"{file.source}: {len(unknown)} module(s) are not {what} of this model: "
            f"{_first(unknown)} (read as {file.key_format or 'no known'} keys; "
            f"{_tried(registry, model)})")
    return line + _made_for(registry, unknown, model)


def _first(names: Sequence[str], n: int = 5) -> str:
    """The first ``n`` of ``names``, with `` ...`` when there are more."""
    return f"{', '.join(names[:n])}{' ...' if len(names) > n else ''}"


def _tried(registry: Registry, model: nn.Module | None) -> str:
    """``key formats tried: …; module names tried: …`` for a file read against
    ``model``."""
    layouts = ["the model's own", *(sorted(module_layouts(registry, model))
                                    if model is not None else [])]
    formats = [spec.name for spec in registry.specs("exporter")]
    return (f"key formats tried: {', '.join(formats)}; "
            f"module names tried: {', '.join(layouts)}")


def _made_for(registry: Registry, names: Collection[str], model: nn.Module | None) -> str:
    """``; the file looks made for …`` where ``names`` look made for another model than
    ``model``, else nothing."""
    line = ""
    theirs = looks_like(registry, names)
    if theirs and model is not None:
        own = looks_like(registry, [n for n, m in model.named_modules()
                                    if isinstance(getattr(m, "weight", None), torch.Tensor)])
        if theirs != own:
            line += f"; the file looks made for {theirs}"
    return line


#: The first name of a key that is a text encoder's (kohya's ``lora_te1_``, diffusers'
#: ``text_encoder_2.``): the engine adapts the denoiser only.
TEXT_ENCODER_KEY = re.compile(r"^(lora_te\d*_|text_encoder(_\d+)?\.|te\d*\.)")


def unread_message(file: AdapterFile, registry: Registry, model: nn.Module | None = None
                   ) -> str:
    """The error line on a file's keys its key format did not read
    (``AdapterFile.unread``), empty where there are none. The text encoders' keys are
    left out: they are not the denoiser's (``text_encoder_note`` says so)."""
    other = [k for k in file.unread if not TEXT_ENCODER_KEY.match(k)]
    if not other:
        return ""
    error = (f"{file.source}: {len(other)} key(s) are not read as "
             f"{file.key_format or 'no known'} keys, as the rest of the file is: "
             f"{_first(other)} ({_tried(registry, model)})")
    return error + _made_for(registry, [k.rpartition(".")[0] for k in other], model)


def layout_aliases(layouts: Mapping[str, Mapping[str, str]], paths: Collection[str]
                   ) -> dict[str, str]:
    """``{name in another layout: module path}`` for the modules among ``paths``."""
    return {other: path for names in layouts.values() for path, other in names.items()
            if path in paths}


def in_layout(modules: Mapping[str, Mapping[str, torch.Tensor]], exporter: ExporterSpec,
              layouts: Mapping[str, Mapping[str, str]]
              ) -> dict[str, Mapping[str, torch.Tensor]]:
    """``modules`` renamed to the first of ``exporter.layouts`` the model offers (its
    own paths when none is); a module the layout has no name for keeps its path."""
    chosen = next((layouts[name] for name in exporter.layouts if name in layouts), None)
    if chosen is None:
        return dict(modules)
    return {chosen.get(path, path): params for path, params in modules.items()}


# -- reading an adapter file ---------------------------------------------------------------

#: The distribution of the engine's own plugins: their algorithms win a tie.
ENGINE_DISTRIBUTION = "loraengine"


@dataclass(frozen=True)
class AdapterModule:
    """One module of an adapter file: its algorithm tensors, its ``diff``/``diff_b``
    channel deltas, and the algorithms claiming the tensors, best first."""

    path: str
    params: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor]
    owners: tuple[AdapterSpec[BaseModel], ...] = ()

    @property
    def algorithm(self) -> str | None:
        """The algorithm this module is read as (``None``: deltas only, or unknown)."""
        return self.owners[0].name if self.owners else None


@dataclass(frozen=True)
class AdapterFile:
    """An adapter file read against a model's module paths: what train
    (``adapter.existing``), ``apply``, ``merge`` and ``inspect`` all start from."""

    source: str
    key_format: str | None
    modules: dict[str, AdapterModule]
    metadata: dict[str, str] = field(default_factory=dict)
    steps: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    #: keys of the file its key format did not read (another format's, or nobody's)
    unread: tuple[str, ...] = ()

    @property
    def algorithm_hint(self) -> str | None:
        """The algorithm the file's metadata names, if any."""
        return self.metadata.get("loraengine.algorithm") or None

    def not_in(self, paths: Collection[str]) -> list[str]:
        """Module paths of the file that are not among ``paths``, sorted."""
        return sorted(set(self.modules) - set(paths))

    @property
    def text_encoder_modules(self) -> list[str]:
        """The file's text-encoder modules (``TEXT_ENCODER_KEY``), sorted: no key
        format reads them onto the denoiser."""
        return text_encoder_modules(self.tensors)


#: The tensor names that end a key of an adapter module (what is left is the module)
_PARAM_TAIL = re.compile(r"\.(lora_\w+|hada_\w+|lokr_\w+|oft_\w+|alpha|dora_scale|diff|diff_b|"
                         r"w_norm|b_norm|on_input|weight|bias)(\.\w+)*$")


def text_encoder_modules(tensors: Iterable[str]) -> list[str]:
    """The modules (key less its tensor names) of ``tensors``' keys that belong to a
    text encoder (``TEXT_ENCODER_KEY``: sd-scripts' ``lora_te_``/``lora_te1_``/…, which
    ComfyUI, A1111/Forge and sd-scripts read onto the text encoders, and diffusers'
    ``text_encoder.``), sorted."""
    return sorted({_PARAM_TAIL.sub("", k) for k in tensors if TEXT_ENCODER_KEY.match(k)})


def text_encoder_note(file: AdapterFile, what: str) -> str | None:
    """One line saying ``file``'s text-encoder modules are left out of ``what`` (None
    when it has none)."""
    names = file.text_encoder_modules
    if not names:
        return None
    return (f"{file.source}: {len(names)} text-encoder module(s) ({', '.join(names[:2])}"
            f"{' ...' if len(names) > 2 else ''}) are not {what}: loraengine adapts the "
            f"denoiser only")


def owners_of(specs: Iterable[AdapterSpec[BaseModel]], params: Mapping[str, torch.Tensor],
              hint: str | None = None, builtin: Collection[str] = ()) -> list[AdapterSpec[BaseModel]]:
    """The adapter specs claiming a saved module, best first: the algorithm the file's
    metadata names, then the engine's own algorithms, then plugins'.

    ``owns_keys`` is asked with the parameter names, as its contract says. When several
    specs claim the same names (OFT's and BOFT's ``oft_blocks``), the ones that accept
    the tensors themselves — a richer question some specs answer — are preferred."""
    owners = [s for s in specs if s.owns_keys(set(params))]
    narrowed = [s for s in owners if _claims_tensors(s, params)]
    # a spec that looks at the tensors and refuses them is not an owner (a model's own
    # ``weight`` is not an IA3 vector); between several, keep them all if all refuse
    owners = narrowed if narrowed or len(owners) < 2 else owners
    owners.sort(key=lambda s: (s.name != hint, s.name not in builtin))
    return owners


def _claims_tensors(spec: AdapterSpec[BaseModel], params: Mapping[str, torch.Tensor]) -> bool:
    try:
        return bool(spec.owns_keys(params))  # type: ignore[arg-type]
    except Exception:  # a spec that only understands a set of names
        return True


def recorded_options(spec: AdapterSpec[BaseModel], metadata: Mapping[str, str],
                     source: str) -> dict[str, object]:
    """The option values a file's ``metadata`` records for ``spec``
    (``AdapterSpec.file_options``, e.g. DoRA's norm); a value the spec does not know is
    a ``DataError`` naming the file (``source``)."""
    if spec.file_options is None:
        return {}
    try:
        return dict(spec.file_options(metadata))
    except ValueError as exc:
        raise DataError(f"{source}: {exc}") from None


def option_conflicts(spec: AdapterSpec[BaseModel], file: AdapterFile, options: object,
                     source: str) -> list[str]:
    """One line per option the file's metadata records (``recorded_options``) that
    ``options`` (the ``adapter`` section continuing it) sets otherwise: the file's
    layers would compute other weights than they were trained to."""
    return [f"adapter.{key}: {getattr(options, key)!r}, but {source} was trained with "
            f"{value!r} (its metadata); set adapter.{key}: {value} to continue it"
            for key, value in recorded_options(spec, file.metadata, source).items()
            if getattr(options, key, value) != value]


def load_options(spec: AdapterSpec[BaseModel], file: AdapterFile) -> BaseModel:
    """The options ``spec.load`` rebuilds ``file``'s modules with: the spec's defaults
    and what the file's metadata records (``recorded_options``), so that every reader
    (``apply``, ``merge``, ``convert``) computes what the file was trained to compute."""
    return spec.config_model.model_validate(recorded_options(spec, file.metadata,
                                                             file.source))


def engine_algorithms(registry: Registry) -> set[str]:
    """Names of the adapter algorithms the engine's own distribution provides."""
    return {name for name, provided in registry.entries["adapter"].items()
            if provided.distribution == ENGINE_DISTRIBUTION}


def read_adapter_file(source: Path | str | Mapping[str, torch.Tensor], registry: Registry,
                      module_paths: Iterable[str] | None = None, *,
                      name: str | None = None, metadata: Mapping[str, str] | None = None,
                      model: nn.Module | None = None) -> AdapterFile:
    """Read an adapter file (a path, or its tensors) in any installed key format.

    Tensors are grouped per module against ``module_paths`` (a model's layers); without
    them the module boundaries are inferred from the parameter names the installed
    algorithms claim (``loraengine inspect``, which has no model). Each module's
    ``diff``/``diff_b`` deltas are split off and its algorithm chosen by ``owners_of``.
    ``name`` is how errors name the source (default: the path); ``metadata`` goes with
    tensors given directly. With ``model``, modules may also be named in any layout its
    family offers (``module_layouts``: a UNet's original ``input_blocks.*`` names)."""
    meta: dict[str, str]
    if isinstance(source, Mapping):
        tensors, meta, steps = dict(source), dict(metadata or {}), 0
        label = name or "adapter tensors"
    else:
        path = Path(source)
        tensors, meta = load_lora(path)
        steps, label = steps_of(path, meta), name or str(path)
    exporters = registry.specs("exporter")
    specs: list[AdapterSpec[BaseModel]] = registry.specs("adapter")
    key_format: str | None
    unread: tuple[str, ...] = ()
    if module_paths is None:
        key_format, grouped = _group_without_model(tensors, exporters, specs)
    else:
        paths = list(module_paths)
        layouts = module_layouts(registry, model) if model is not None else {}
        try:
            key_format, grouped, unread = split_modules(tensors, exporters, paths,
                                                        layout_aliases(layouts, set(paths)))
        except DataError as exc:
            names = ["the model's own", *sorted(layouts)]
            raise DataError(f"{label}: {exc}; module names tried: {', '.join(names)}"
                            f"{_made_for(registry, list(tensors), model)}") from None
    hint = meta.get("loraengine.algorithm") or None
    builtin = engine_algorithms(registry)
    modules: dict[str, AdapterModule] = {}
    for path_, found in grouped.items():
        params, deltas = split_deltas(standard_names(found))
        owners = tuple(owners_of(specs, params, hint, builtin)) if params else ()
        modules[path_] = AdapterModule(path_, params, deltas, owners)
    return AdapterFile(label, key_format, modules, meta, steps, tensors, unread)


#: PEFT's name of a DoRA magnitude; the engine's (and LyCORIS's) is ``dora_scale``.
PEFT_MAGNITUDE = "lora_magnitude_vector"
#: LyCORIS's names of a norm layer's ``diff`` / ``diff_b``
NORM_DELTA_NAMES = frozenset({"w_norm", "b_norm"})


def standard_names(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved module's tensors under the engine's names: PEFT's
    ``lora_magnitude_vector`` (one magnitude per output channel, ``[out]`` or
    ``[1, out, 1, ...]``) becomes ``dora_scale`` as a 1-D tensor, which the DoRA
    loader reads as per output channel whatever the layer's shape; a norm layer's
    ``w_norm``/``b_norm`` (LyCORIS) become ``diff``/``diff_b``."""
    out = dict(params)
    if PEFT_MAGNITUDE in out and "dora_scale" not in out:
        out["dora_scale"] = out.pop(PEFT_MAGNITUDE).reshape(-1)
    # LyCORIS's (and A1111's) names for a norm layer's deltas
    if "w_norm" in out and "diff" not in out and set(out) <= NORM_DELTA_NAMES:
        out["diff"] = out.pop("w_norm")
        if "b_norm" in out:
            out["diff_b"] = out.pop("b_norm")
    return out


def _group_without_model(tensors: Mapping[str, torch.Tensor],
                         exporters: Sequence[ExporterSpec], specs: Sequence[AdapterSpec[BaseModel]]
                         ) -> tuple[str | None, dict[str, dict[str, torch.Tensor]]]:
    """Group a file's tensors per module when no model says where modules end.

    The key format's own reading (with no known paths) gives ``<path>.<param>`` names in
    the engine's parameter spelling; a module is then the shortest prefix whose names an
    installed algorithm claims (or that holds only channel deltas). The format then
    groups the file again against those paths."""
    key_format, flat = None, dict(tensors)
    for exporter in exporters:
        rough = exporter.from_file(tensors, [])
        if rough:
            key_format = exporter.name
            flat = {f"{m}.{p}": t for m, params in rough.items() for p, t in params.items()}
            break
    under: dict[str, set[str]] = {}
    for key in flat:
        parts = key.split(".")
        for i in range(1, len(parts)):
            under.setdefault(".".join(parts[:i]), set()).add(".".join(parts[i:]))

    claimed: dict[str, bool] = {}

    def is_module(prefix: str) -> bool:
        if prefix not in claimed:
            names = under[prefix]
            rest = names - set(DELTA_KEYS) - NORM_DELTA_NAMES
            claimed[prefix] = not rest or any(s.owns_keys(rest) for s in specs)
        return claimed[prefix]

    # Shortest first: a longer prefix can look like a module of its own (``a.lora_down``
    # holding only ``weight`` reads as IA3). Adaptable layers have no adaptable children,
    # so the shortest claimed prefix is the layer.
    paths: set[str] = set()
    for key in flat:
        parts = key.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
        found = next((p for p in prefixes if is_module(p)), None)
        paths.add(found if found is not None else key.rsplit(".", 1)[0])
    if key_format is None:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            module = max((p for p in paths if key.startswith(p + ".")), key=len,
                         default=key.rsplit(".", 1)[0])
            grouped.setdefault(module, {})[key[len(module) + 1:]] = tensor
        return None, grouped
    exporter = next(e for e in exporters if e.name == key_format)
    return key_format, exporter.from_file(tensors, sorted(paths)) or {}
