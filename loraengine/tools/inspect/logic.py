"""Describe a LoRA file without a model: what ``loraengine inspect`` prints."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from loraengine.core.files import load_lora, steps_of

#: suffix of a parameter key -> algorithm, for files without our metadata
_KEY_ALGOS = (("lora_down.weight", "lora"), ("lora_A.weight", "lora"), ("hada_w1_a", "loha"),
              ("lokr_w1", "lokr"), ("oft_blocks", "oft"), ("oft_R", "boft"),
              ("a1.weight", "glora"), ("diff", "full"), ("weight", "ia3"))


#: every parameter name a module of a LoRA-family file may carry, longest first
_PARAM_SUFFIXES = sorted({
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1",
    "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "oft_blocks",
    "oft_R", "rescale", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "diff", "diff_b",
    "alpha", "dora_scale", "on_input", "weight", "bias"}, key=len, reverse=True)


def describe(path: Path) -> dict[str, Any]:
    tensors, meta = load_lora(Path(path))
    modules: dict[str, list[str]] = {}
    for key in tensors:
        for suffix in _PARAM_SUFFIXES:
            if key.endswith("." + suffix):
                modules.setdefault(key[: -len(suffix) - 1], []).append(suffix)
                break
    algo = meta.get("loraengine.algorithm")
    if not algo:
        counts: Counter[str] = Counter()
        for params in modules.values():
            for suffix, name in _KEY_ALGOS:
                if suffix in params:
                    counts[name] += 1
                    break
        algo = counts.most_common(1)[0][0] if counts else "unknown"
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith(
        ("lora_down.weight", "lora_A.weight", "hada_w1_b"))})
    alphas = sorted({float(t) for k, t in tensors.items() if k.endswith(".alpha")})
    return {
        "file": str(path),
        "algorithm": algo,
        "rank": meta.get("ss_network_dim") or (", ".join(map(str, ranks)) or "-"),
        "alpha": meta.get("ss_network_alpha") or (", ".join(f"{a:g}" for a in alphas) or "-"),
        "modules": len(modules),
        "parameters": int(sum(t.numel() for k, t in tensors.items()
                              if not k.endswith(".alpha"))),
        "steps": steps_of(Path(path), meta),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
        "metadata": {k: v for k, v in meta.items() if k != "loraengine.config"} | (
            {"loraengine.config": json.dumps(json.loads(meta["loraengine.config"]))}
            if "loraengine.config" in meta else {}),
    }
