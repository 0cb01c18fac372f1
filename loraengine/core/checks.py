"""Checks of a built pipeline for settings that run but do not do what they say: the
engine trains anyway and the caller shows each message as a warning (``loraengine
train`` prints ``warning: ...``; ``loraengine.train`` issues ``UserWarning``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from loraengine.core.data import BucketedDataset
from loraengine.core.files import in_layout, module_layouts
from loraengine.core.threads import threads_over_cpus


def pipeline_warnings(pipe: Any) -> list[str]:
    """One line per setting of ``pipe.config`` the built run does not honour as
    written."""
    threads = threads_over_cpus(pipe.config.training.threads)
    return [*_rank_of_existing(pipe), *_rank_above_width(pipe),
            *_batch_larger_than_data(pipe),
            *_exporter_limits(pipe), *([threads] if threads else []),
            *_settings_without_effect(pipe.config)]


def _settings_without_effect(cfg: Any) -> list[str]:
    """Keys set to values that change nothing in this run (each would otherwise pass
    silently): checkpoints after the last step, validation data no schedule uses, a
    min_delta without patience, a warmup that outlasts the run."""
    steps = int(cfg.training.steps)
    out: list[str] = []
    save_every = cfg.output.save_every
    if save_every is not None and save_every > steps:
        out.append(f"output.save_every: {save_every} is more than training.steps ({steps}); "
                   f"no checkpoint is written")
    if cfg.data.validation is not None and cfg.validation.every is None:
        out.append("data.validation: no validation loss is computed without "
                   "validation.every")
    if "min_delta" in cfg.early_stop.model_fields_set and cfg.early_stop.patience is None:
        out.append("early_stop.min_delta: has no effect without early_stop.patience")
    warmup = getattr(cfg.lr_scheduler, "warmup_steps", None)
    if isinstance(warmup, int) and warmup >= steps > 0:
        out.append(f"lr_scheduler.warmup_steps: {warmup} is not below training.steps "
                   f"({steps}); the rate never reaches optimizer.lr")
    return out


def _exporter_limits(pipe: Any) -> list[str]:
    """What the consumer of ``adapter.exporter`` cannot express of the adapters being
    trained (the exporter's own ``limits``): the file is written anyway, as trained."""
    name = pipe.config.adapter.exporter or pipe.loaded.default_exporter
    try:
        exporter = pipe.host.registry.get("exporter", name)
    except Exception:
        return []
    if getattr(exporter, "limits", None) is None:
        return []
    layers = dict(pipe.network.items())
    # named as the file will name them (a layout may mark fused layers, see
    # ``ExporterSpec.limits``)
    names = in_layout({p: {} for p in pipe.network.file_modules()}, exporter,
                      module_layouts(pipe.host.registry, pipe.loaded.module))
    renamed = dict(zip(pipe.network.file_modules(), names, strict=True))
    modules = {}
    for path, params in pipe.network.file_modules().items():
        layer = layers.get(path)
        algorithm = "deltas" if layer is None else \
            str(getattr(layer, "algorithm", None) or pipe.adapter_spec.name)
        # names -> shapes: the names for every limit, the shapes for those needing them
        modules[renamed[path]] = (algorithm, {k: tuple(v.shape) for k, v in params.items()})
    spec = pipe.adapter_spec
    # the metadata the file will carry: the model it is for, and what changes how it
    # reads (DoRA's norm)
    metadata = {"ss_base_model_version": pipe.loaded.base_model_version}
    if getattr(spec, "file_metadata", None):
        metadata.update(spec.file_metadata(pipe.config.adapter))
    return [f"adapter.exporter: {line}" for line in exporter.limits(modules,
                                                                     metadata=metadata)]


def _rank_of_existing(pipe: Any) -> list[str]:
    """``adapter.rank`` set beside ``adapter.existing``: layers restored from the file
    keep the file's rank (the rank of a trained adapter cannot change while continuing
    it), so a different rank in the config is ignored for them."""
    acfg = pipe.config.adapter
    if acfg.existing is None or "rank" not in acfg.model_fields_set:
        return []
    ranks = Counter(getattr(layer, "rank", None) for _, layer in pipe.network.items())
    other = sorted(r for r in ranks if r is not None and r != acfg.rank)
    if not other:
        return []
    held = ", ".join(str(r) for r in other)
    count = sum(ranks[r] for r in other)
    return [f"adapter.rank: {acfg.rank} is ignored for the {count} layer(s) restored from "
            f"adapter.existing ({acfg.existing}), which hold rank {held}; they continue at "
            f"the file's rank"]


def _rank_above_width(pipe: Any) -> list[str]:
    """``adapter.rank`` above the width of some adapted layers (for LoRA min(out, in),
    a conv's kernel counted into ``in``): the update of such a layer has at most that
    rank, so the adapter's extra rank is parameters it trains for nothing. The bound is
    the algorithm's own (``AdapterSpec.full_rank``); an algorithm without one is not
    checked. Layers restored from ``adapter.existing`` at another rank are left out."""
    spec = pipe.adapter_spec
    bound = getattr(spec, "full_rank", None)
    if bound is None:
        return []
    rank = int(pipe.config.adapter.rank)
    layers = list(pipe.network.items())
    narrow: list[tuple[int, str]] = []
    with pipe.host.registry.blame("adapter", spec.name, "full_rank"):
        for path, layer in layers:
            if getattr(layer, "rank", None) != rank:
                continue
            width = bound(layer)
            if width is not None and rank > width:
                narrow.append((int(width), path))
    if not narrow:
        return []
    width, path = min(narrow)
    return [f"adapter.rank: {rank} is above the width of {len(narrow)} of {len(layers)} "
            f"adapted layers (the narrowest: {path}, {width}); their updates cannot use "
            f"the extra rank, which only adds parameters"]


def _batch_larger_than_data(pipe: Any) -> list[str]:
    """A micro-batch larger than the data (or than a bucket: a batch comes from one):
    each batch then holds some samples more than once, with other noise and timesteps,
    which costs compute and weights those samples more, rather than seeing more data."""
    batch = int(pipe.config.training.batch_size)
    dataset = pipe.dataset
    if isinstance(dataset, BucketedDataset):
        small = [i for i, b in enumerate(dataset.buckets) if len(b) < batch]
        if not small:
            return []
        sizes = ", ".join(f"bucket {i}: {len(dataset.buckets[i])}" for i in small[:5])
        return [f"training.batch_size: {batch} is more than the samples of "
                f"{len(small)} bucket(s) ({sizes}{' ...' if len(small) > 5 else ''}); "
                f"each batch from them repeats samples"]
    if len(dataset) >= batch:
        return []
    return [f"training.batch_size: {batch} is more than the {len(dataset)} samples of "
            f"the data; each batch repeats samples (a batch of {len(dataset)} sees the "
            f"same data for less compute)"]
