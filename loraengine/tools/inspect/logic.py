"""Describe a LoRA file without a model: what ``loraengine inspect`` prints."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from loraengine.core.errors import DataError
from loraengine.core.files import read_adapter_file
from loraengine.core.plugins.registry import Registry

#: Parameters whose first dimension is a module's rank (LoRA, also as PEFT's lora_A,
#: and LoHa), in the engine's spelling of parameter names.
_RANK_PARAMS = ("lora_down.weight", "hada_w1_b")


def describe(path: Path, registry: Registry | None = None) -> dict[str, Any]:
    """What a LoRA file holds: its algorithm (from the metadata, else the algorithm
    most modules are read as), rank, alpha, modules (and text-encoder modules, which
    no reader applies), parameters, steps and metadata, and ``warnings`` (one line each:
    a metadata entry that does not read as it should, shown as written).

    Modules and their algorithms come from the one adapter-file reader, asked without a
    model; ``registry`` supplies the key formats and algorithms (default: the plugins
    installed)."""
    if registry is None:
        from loraengine.plugins import build_plugin_manager

        registry = build_plugin_manager().registry
    path = Path(path)
    file = read_adapter_file(path, registry)
    tensors, meta = file.tensors, file.metadata
    algo = meta.get("loraengine.algorithm")
    if not algo:
        counts = Counter(m.algorithm for m in file.modules.values() if m.algorithm)
        if not tensors:
            raise DataError(f"{path}: the file holds no tensors")
        if not counts and not any(m.deltas for m in file.modules.values()):
            sample = ", ".join(sorted(tensors)[:3])
            raise DataError(f"{path}: no installed adapter algorithm claims its tensors "
                            f"(e.g. {sample}); is it a model's weights rather than an "
                            f"adapter file?")
        algo = counts.most_common(1)[0][0] if counts else "unknown"
    warnings = []
    config = meta.get("loraengine.config")
    if config is not None:
        try:
            config = json.dumps(json.loads(config))
        except (ValueError, RecursionError) as exc:  # the rest of the file still reads
            warnings.append(f"{path}: the metadata entry loraengine.config is not JSON "
                            f"({exc}); shown as written")
    ranks = sorted({int(m.params[p].shape[0]) for m in file.modules.values()
                    for p in _RANK_PARAMS if p in m.params})
    alphas = sorted({float(t) for k, t in tensors.items() if k.endswith(".alpha")})
    return {
        "file": str(path),
        "algorithm": algo,
        "rank": meta.get("ss_network_dim") or (", ".join(map(str, ranks)) or "-"),
        "alpha": meta.get("ss_network_alpha") or (", ".join(f"{a:g}" for a in alphas) or "-"),
        "modules": len(file.modules),
        # sd-scripts' lora_te* modules, beside the denoiser's (not adapted by loraengine)
        "text_encoder_modules": len(file.text_encoder_modules),
        "parameters": int(sum(t.numel() for k, t in tensors.items()
                              if not k.endswith(".alpha"))),
        "steps": file.steps,
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
        "metadata": {k: v for k, v in meta.items() if k != "loraengine.config"} | (
            {"loraengine.config": config} if config is not None else {}),
        "warnings": warnings,
    }
