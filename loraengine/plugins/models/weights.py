"""Loading a diffusers model folder while holding one copy of its weights.

``from_pretrained`` reads a ``.safetensors`` file through a memory map and copies each
tensor out of it, so until the file is closed the process holds the mapped file pages
and the copies: twice the weights in resident memory. A dtype conversion afterwards
(``module.to(bf16)``) starts from the full-precision copy, so converting never lowers
that peak either.

:func:`load_folder` builds the model's skeleton on the ``meta`` device, reads each
tensor with plain file reads into its own buffer (the page cache is not mapped into the
process, so it does not count in its memory), converts it to the target dtype at once
through a scratch buffer of 1 MiB, and puts it into the model at once. At most the
loaded weights plus that buffer are resident at any moment. A ``prepare`` transform
(a memory strategy's change to the base, such as quantizing each Linear weight) runs
on a module as each of its tensors arrives, so a quantized base holds its quantized
layers plus the one full-precision weight just read. Folders it does not understand (``.bin``
weights, names that differ from the model's, tensors left without weights) are left
to ``from_pretrained``: :func:`load_folder` returns ``None`` for them. A weight file
that does not open, or whose header is not a safetensors header, is a ``DataError``
naming it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from loraengine.core.data import open_regular, unreadable
from loraengine.core.errors import DataError

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"

#: bytes read at a time into the scratch buffer of a tensor converted on reading
CHUNK = 1 << 20
#: safetensors dtype names
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def weight_files(model_dir: Path) -> list[Path] | None:
    """The folder's safetensors files (one, or the shards its index names), or ``None``
    when it has none."""
    single = model_dir / WEIGHTS
    if single.is_file():
        return [single]
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            files = sorted({model_dir / name for name in weight_map.values()})
        except OSError as exc:
            raise unreadable(index, "model.path", exc) from None
        except (ValueError, AttributeError, TypeError):  # not JSON, or not its layout
            raise DataError(f"model.path: {index} is not a readable index of weight "
                            f"files (a JSON object with a weight_map)") from None
        return files if files and all(f.is_file() for f in files) else None
    return None


def read_tensors(path: Path, want: dict[str, torch.dtype | None]
                 ) -> dict[str, torch.Tensor] | None:
    """The tensors of one safetensors file whose names are in ``want``, each converted
    to its dtype there (``None``: the file's) as soon as it is read. ``None`` when the
    file holds a name not in ``want`` or a dtype this reader does not know."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(path, want):
        if tensor is None:
            return None
        out[name] = tensor
    return out


def open_weights(path: Path, key: str = "model.path") -> IO[bytes]:
    """``path`` opened for reading, unbuffered; a ``DataError`` naming ``key`` and the
    file, with the system's reason, when it is not a regular file that opens."""
    return open_regular(path, key)


def header_of(path: Path, key: str = "model.path") -> dict[str, Any]:
    """The tensor entries of the safetensors file ``path`` (see :func:`read_header`);
    errors name ``key`` and the file."""
    with open_weights(path, key) as f:
        return read_header(f, path, key)[0]


#: The largest header safetensors itself reads, in bytes.
MAX_HEADER = 100_000_000


def read_header(f: IO[bytes], path: Path, key: str = "model.path"
                ) -> tuple[dict[str, Any], int]:
    """The tensor entries of the safetensors file open as ``f`` (its ``__metadata__``
    left out) and the offset its data starts at, each entry checked to lie in the
    file; ``DataError`` naming ``key`` and the file when it is not a safetensors file."""
    def damaged(why: str) -> DataError:
        return DataError(f"{key}: {path} is not a readable safetensors file (its header "
                         f"is damaged: {why})")

    size = os.fstat(f.fileno()).st_size
    first = f.read(8)
    if len(first) < 8:
        raise damaged(f"the file is only {size} bytes long")
    (header_len,) = struct.unpack("<Q", first)
    if header_len > min(size - 8, MAX_HEADER):
        raise damaged(f"it gives a header length of {header_len} bytes, in a file of "
                      f"{size} bytes")
    try:
        header = json.loads(f.read(header_len))
    except ValueError:  # not JSON, or not UTF-8
        raise damaged("it is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("it is not a JSON object")
    header.pop("__metadata__", None)
    room = size - 8 - header_len
    for name, info in header.items():
        if not _entry_fits(info, room):
            raise damaged(f"the entry of tensor {name!r} is not a dtype, shape and data "
                          f"offsets inside the file")
    return header, 8 + header_len


def _entry_fits(info: Any, room: int) -> bool:
    """Whether a header entry has a dtype, a shape and data offsets that lie within
    ``room`` bytes and, for a dtype this reader knows, span the shape exactly."""
    if not isinstance(info, dict):
        return False
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(
            offsets, list) or len(offsets) != 2:
        return False
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
               for n in (*shape, *offsets)):
        return False
    begin, end = offsets
    if not begin <= end <= room:
        return False
    known = _DTYPES.get(dtype)
    return known is None or math.prod(shape) * known.itemsize == end - begin


def iter_tensors(path: Path, want: dict[str, torch.dtype | None]
                 ) -> Iterator[tuple[str, torch.Tensor | None]]:
    """:func:`read_tensors` one tensor at a time, in file order; a ``None`` tensor (then
    the end) when the file cannot be read this way. A file that cannot be opened, or
    whose header is not that of a safetensors file, is a ``DataError`` naming it."""
    with open_weights(path) as f:
        header, start = read_header(f, path)
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        if any(name not in want or info["dtype"] not in _DTYPES for name, info in entries):
            yield "", None
            return
        # Tensors converted on reading pass through one small scratch buffer, a chunk
        # at a time: no buffer of a whole tensor in the file's dtype, freed after
        # converting, leaves a hole in the heap that the process keeps.
        scratch = torch.empty(CHUNK, dtype=torch.uint8)
        for name, info in entries:
            begin, end = info["data_offsets"]
            target = want[name]
            dtype = _DTYPES[info["dtype"]]
            f.seek(start + begin)
            if _converts(info, target):
                assert target is not None
                tensor = torch.empty(info["shape"], dtype=target)
                flat, size = tensor.view(-1), dtype.itemsize
                for first in range(0, end - begin, CHUNK):
                    part = scratch[:min(CHUNK, end - begin - first)]
                    if not _read_into(f, part):
                        yield name, None
                        return
                    flat[first // size:(first + len(part)) // size].copy_(part.view(dtype))
            else:
                raw = torch.empty(end - begin, dtype=torch.uint8)
                if not _read_into(f, raw):
                    yield name, None  # truncated file: from_pretrained says why
                    return
                tensor = raw.view(dtype).reshape(info["shape"])
            yield name, tensor
            del tensor
        del scratch


def _converts(info: dict[str, Any], target: torch.dtype | None) -> bool:
    dtype = _DTYPES[info["dtype"]]
    return target is not None and dtype.is_floating_point and dtype != target


def _read_into(f: Any, buffer: torch.Tensor) -> bool:
    view = memoryview(buffer.numpy())  # type: ignore[arg-type]
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            return False
        got += n
    return True


def load_folder(cls: Any, model_dir: Path, dtype: torch.dtype | None,
                prepare: Callable[[str, nn.Module], None] | None = None
                ) -> nn.Module | None:
    """A diffusers model class ``cls`` loaded from ``model_dir`` with its floating
    tensors in ``dtype`` (``None``: the dtype the class builds them in, as
    ``from_pretrained`` does), holding one copy of the weights; ``None`` when the
    folder needs ``from_pretrained``. ``prepare(path, module)`` runs after each tensor
    is put into the module at ``path`` that owns it."""
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    if files is None:
        return None
    from accelerate import init_empty_weights

    config = cls.load_config(str(model_dir))
    with init_empty_weights(include_buffers=False):
        module: nn.Module = cls.from_config(config)
    expected = module.state_dict(keep_vars=True)
    want: dict[str, torch.dtype | None] = {
        name: (dtype or t.dtype) if t.is_floating_point() else None
        for name, t in expected.items()}
    loaded: set[str] = set()
    for path in files:
        for name, tensor in iter_tensors(path, want):
            if tensor is None or tensor.shape != expected[name].shape or name in loaded:
                return None
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path)
            # as load_state_dict(assign=True) does: parameters stay parameters
            owner.load_state_dict({leaf: tensor}, strict=False, assign=True)
            loaded.add(name)
            del tensor
            if prepare is not None:
                prepare(owner_path, owner)
    if loaded != set(expected):
        return None
    if any(t.device.type == "meta" for t in (*module.parameters(), *module.buffers())):
        return None
    if dtype is not None:
        module.to(dtype)  # buffers built (not loaded) by the class, as before
    module.eval()
    return module
