"""The ``wan`` family: Wan 2.1 and 2.2 video transformers (``WanTransformer3DModel``),
trained with rectified flow on video latents ``[N,C,T,H,W]``.

The transformer takes the latents as they are (it patchifies them itself), the
timestep as ``σ·1000`` and UMT5's hidden states as ``cond``. Wan 2.2 A14B pipelines
hold two experts: ``transformer`` denoises the high-noise part of the schedule
(``t ≥ boundary_ratio·1000``) and ``transformer_2`` the rest. ``model.expert`` picks
which one trains; training one expert draws only timesteps from its range, and
``both`` trains them together (each sample goes to the expert of its timestep) and
writes one file per expert.

The Wan VAE normalizes each latent channel by its own mean and deviation
(``latents_mean`` / ``latents_std`` of the VAE config), so the family attaches a VAE
that undoes it; the engine's scalar scale and shift stay 1 and 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from loraengine.core.config.root import ConfigPath
from loraengine.core.errors import ConfigError, DataError
from loraengine.core.model import LoadedModel, PredictFn
from loraengine.core.plugins.specs import ModelFamilySpec
from loraengine.core.schedule import NoiseSchedule
from loraengine.plugins.models.common import (
    Family,
    FlowOptions,
    ModelInputs,
    config_int,
    describe_family,
    flow_transformer_family,
    load_module,
    locate,
    pipeline_class,
    read_json,
    scheduler_config,
    skeleton_of,
    submodules,
)

#: Every Linear of the transformer blocks (self- and cross-attention, feed-forward).
WAN_TARGETS = ("blocks.*",)
#: What each expert is called (file suffix, module prefix) and its pipeline subfolder.
EXPERTS = {"high_noise": "transformer", "low_noise": "transformer_2"}
Expert = Literal["auto", "high_noise", "low_noise", "both"]


class WanOptions(FlowOptions):
    path: ConfigPath = Field(description="A diffusers pipeline folder (WanPipeline), its "
                             "transformer folder, or a single original-layout "
                             ".safetensors file.")
    expert: Expert = Field("auto", description="Which Wan 2.2 expert trains: high_noise "
                           "(the pipeline's transformer), low_noise (transformer_2) or "
                           "both (one file each). One expert draws only timesteps of its "
                           "range. auto: the one transformer of a Wan 2.1 pipeline, both "
                           "for a two-expert pipeline.")
    boundary_ratio: float | None = Field(None, gt=0, lt=1, description="σ where the "
                                         "experts hand over (high noise: σ ≥ it). Default: "
                                         "the pipeline's model_index.json.")


def wan_inputs(model: nn.Module) -> ModelInputs:
    """Latent channels and UMT5 width of a Wan transformer (of the first expert)."""
    if isinstance(model, WanExperts):
        model = model.high_noise
    text = config_int(model, "text_dim")
    return config_int(model, "in_channels"), {} if text is None else {"cond": text}


def wan_blocks(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, WanExperts):
        return wan_blocks(model.high_noise) + wan_blocks(model.low_noise)
    return submodules(model, "blocks")


def call_transformer(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                     cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One Wan transformer call as WanPipeline makes it (``t`` already σ·1000)."""
    if x_t.ndim != 5:
        raise ValueError(f"Wan takes video latents [N,C,T,H,W]; got shape {list(x_t.shape)}")
    out: torch.Tensor = model(hidden_states=x_t, timestep=t.float(),
                              encoder_hidden_states=cond["cond"], return_dict=False)[0]
    return out


class WanExperts(nn.Module):
    """Wan 2.2's two experts as one module: a sample whose timestep is at or above
    ``boundary`` (model units, ``σ·1000``) goes to ``high_noise``, the rest to
    ``low_noise``, as WanPipeline switches between them."""

    def __init__(self, high_noise: nn.Module, low_noise: nn.Module, boundary: float):
        super().__init__()
        self.high_noise = high_noise
        self.low_noise = low_noise
        self.boundary = boundary

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]
                ) -> torch.Tensor:
        t = t.reshape(-1).expand(x_t.shape[0])
        high = t >= self.boundary
        if bool(high.all()) or not bool(high.any()):
            expert = self.high_noise if bool(high.all()) else self.low_noise
            return call_transformer(expert, x_t, t, cond)
        out = torch.empty_like(x_t)
        for mask, expert in ((high, self.high_noise), (~high, self.low_noise)):
            part = {k: v[mask] if v.ndim and v.shape[0] == x_t.shape[0] else v
                    for k, v in cond.items()}
            out[mask] = call_transformer(expert, x_t[mask], t[mask], part).to(out.dtype)
        return out


def wan_predictor(options: Any, module: nn.Module, schedule: Any, vae_factor: int
                  ) -> PredictFn:
    def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(model, WanExperts):
            out: torch.Tensor = model(x_t, t, cond)
            return out
        return call_transformer(model, x_t, t, cond)

    return predict


WAN = flow_transformer_family(
    name="wan", model_class="WanTransformer3DModel", pipeline_classes=("WanPipeline",),
    vae_scale=1.0, vae_shift=0.0, default_include=WAN_TARGETS, base_model_version="wan",
    options=WanOptions, predictor=wan_predictor, blocks=wan_blocks, flow_shift=5.0,
    cond_keys=("cond",), default_resolution=480, timestep_sampling="uniform",
    inputs=wan_inputs, default_exporter="wan_comfyui",
    known_as="a Wan 2.x",
    marks=("blocks.N.(attn[12].(to_[qkv]|to_out.N|norm_[qk]|add_[kv]_proj)|ffn.(net.N(.proj)?|N)|"
           "norm[23]|(self|cross)_attn.([qkvo]|norm_[qk]|[kv]_img|norm_k_img))",
           "condition_embedder", "patch_embedding", "head.head", "text_embedding.N",
           "time_embedding.N", "time_projection.N", "img_emb", "proj_out"),
    description="Wan 2.1 / 2.2 video transformer (rectified flow on [N,C,T,H,W] latents; "
    "2.2 A14B: high- and low-noise experts).")


# -- the VAE ------------------------------------------------------------------------------

class WanLatentVAE(nn.Module):
    """An ``AutoencoderKLWan`` that decodes the normalized latents training sees,
    ``(z − mean) / std`` per channel, as WanPipeline does before decoding."""

    #: decodes ``[N,C,T,H,W]`` itself (previews need not fold frames into the batch)
    decodes_video = True

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        shape = (1, int(cfg.z_dim), 1, 1, 1)
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z)) / self.std.to(z)

    def decode(self, latents: torch.Tensor) -> Any:
        z = latents * self.std.to(latents) + self.mean.to(latents)
        return self.vae.decode(z)


def wan_vae_loader(root: Path | None) -> Any:
    """A loader of the pipeline's Wan VAE (``None`` without a ``vae/`` folder)."""
    folder = None if root is None else root / "vae"
    if folder is None or not (folder / "config.json").exists():
        return None

    def load() -> WanLatentVAE:
        import diffusers

        try:
            vae = diffusers.AutoencoderKLWan.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # a broken VAE folder should name itself
            raise DataError(f"{folder}: cannot load the Wan VAE: {exc}") from None
        return WanLatentVAE(vae.eval().requires_grad_(False))

    return load


# -- loading ------------------------------------------------------------------------------

def wan_schedule(options: WanOptions, sched: Mapping[str, Any] | None) -> NoiseSchedule:
    """Rectified flow with the scheduler config's shift: ``shift`` of a flow-matching
    scheduler or ``flow_shift`` of the UniPC/DPM configs Wan ships."""
    sched = sched or {}
    shift = options.flow_shift
    if shift is None:
        shift = sched.get("shift") if "shift" in sched else sched.get("flow_shift")
    if shift is None or sched.get("use_dynamic_shifting", False):
        shift = WAN.flow_shift if shift is None else 1.0
    return NoiseSchedule("flow", shift=float(shift),
                         timestep_scale=float(sched.get("num_train_timesteps", 1000)),
                         sampling=WAN.timestep_sampling)


def choose_expert(options: WanOptions, root: Path | None
                  ) -> tuple[str | None, float | None]:
    """(expert or None for a one-transformer pipeline, boundary ratio)."""
    index = read_json(root / "model_index.json") if root is not None else {}
    two = root is not None and (root / EXPERTS["low_noise"] / "config.json").exists()
    ratio = options.boundary_ratio if options.boundary_ratio is not None else \
        index.get("boundary_ratio")
    expert = options.expert
    if expert == "auto":
        expert = "both" if two else None  # type: ignore[assignment]
    if expert is None or (not two and expert == "high_noise" and ratio is None):
        return None, ratio  # one transformer serves the whole schedule
    if not two and expert != "high_noise":
        raise ConfigError(f"model.expert: {expert} needs a two-expert pipeline folder "
                          f"(a transformer_2 folder, as Wan 2.2 A14B has); "
                          f"{root or options.path} has one transformer")
    if ratio is None:
        raise ConfigError(f"model.boundary_ratio: the pipeline's model_index.json gives "
                          f"none; needed to train the {expert} expert")
    return expert, float(ratio)


def load_given(options: WanOptions, module: nn.Module) -> LoadedModel:
    """A Wan transformer built by the caller (``plan --real`` builds the released ones
    on the meta device): one expert when ``model.expert`` and ``boundary_ratio`` name
    one, drawing only timesteps of its range."""
    schedule = wan_schedule(options, None)
    expert = None if options.expert == "auto" else options.expert
    if expert == "both":
        raise ConfigError("model.expert: both needs a two-expert pipeline folder; the "
                          "model given is one transformer")
    if expert is not None and options.boundary_ratio is not None:
        ratio = options.boundary_ratio
        schedule.timestep_range = (ratio, 1.0) if expert == "high_noise" else (0.0, ratio)
    return _loaded(options, module, schedule, expert, {}, str(options.path), None, False)


def load_wan(options: WanOptions, context: Mapping[str, Any]) -> LoadedModel:
    given = context.get("module")
    if isinstance(given, nn.Module) and type(given).__name__ == WAN.model_class and \
            not Path(options.path).exists():
        return load_given(options, given)
    where = locate(WAN, options)
    expert, ratio = (None, None) if options.subfolder or where.single_file else \
        choose_expert(options, where.root)
    sched = scheduler_config(where.root)
    schedule = wan_schedule(options, sched)
    parts: dict[str, str] = {}
    dtype, looks_like = context.get("dtype"), context.get("looks_like")
    if expert in (None, "high_noise"):
        module = load_module(WAN, where, dtype, looks_like=looks_like)
    elif expert == "low_noise":
        module = load_module(WAN, _expert_folder(where, "low_noise"), dtype)
    else:
        assert ratio is not None
        module = WanExperts(load_module(WAN, where, dtype),
                            load_module(WAN, _expert_folder(where, "low_noise"), dtype),
                            ratio * schedule.timestep_scale)
        parts = {name: f"{name}." for name in EXPERTS}
    if expert in ("high_noise", "low_noise"):
        assert ratio is not None
        schedule.timestep_range = (ratio, 1.0) if expert == "high_noise" else (0.0, ratio)
    return _loaded(options, module, schedule, expert, parts, str(where.model), where.root,
                   where.single_file)


def _loaded(options: WanOptions, module: nn.Module, schedule: NoiseSchedule,
            expert: str | None, parts: dict[str, str], source: str, root: Path | None,
            single_file: bool) -> LoadedModel:
    include = _targets(bool(parts))
    channels, widths = wan_inputs(module)
    return LoadedModel(
        module=module, predict=WAN.predictor(options, module, schedule, WAN.vae_factor),
        schedule=schedule, blocks=wan_blocks(module), family=WAN.name,
        default_exporter=WAN.default_exporter,
        base_model_version=WAN.base_model_version + (f":{expert}" if expert else ""),
        cond_keys=WAN.cond_keys, source=source, pipeline_root=root,
        single_file=single_file, vae=wan_vae_loader(root),
        default_include=include, latent_ndim=5, latent_channels=channels,
        cond_widths=widths, file_parts=parts)


def _targets(both: bool) -> tuple[str, ...]:
    """The default adapter targets: under each expert's prefix when both train."""
    return tuple(f"{name}.{glob}" for name in EXPERTS for glob in WAN.default_include) \
        if both else WAN.default_include


def _expert_folder(where: Any, expert: str) -> Any:
    return dataclasses.replace(where, model=where.root / EXPERTS[expert])


def _make_encoder(path: Any, options: Mapping[str, Any]) -> Any:
    from loraengine.plugins.models.video_encoders import WanEncoder

    return WanEncoder(WAN, Path(path), options)


def _family_of(path: Any) -> bool:
    return pipeline_class(Path(path)) in WAN.pipeline_classes


def _describe(options: WanOptions, context: Mapping[str, Any]) -> Any:
    """``loraengine validate``: the (first expert's) model and its weights' header, a
    single file's names against its config, without loading; video latents. The
    skeleton is what ``load_wan`` would adapt: the expert it picks, or both experts
    under their prefixes."""
    layout = describe_family(WAN, options, context)
    where = locate(WAN, options)
    expert, _ = (None, None) if options.subfolder or where.single_file else \
        choose_expert(options, where.root)
    skeleton = layout.skeleton
    if expert == "low_noise":
        skeleton = skeleton_of(WAN.model_class, _expert_folder(where, "low_noise").model)
    elif expert == "both" and skeleton is not None:
        high = skeleton
        low = skeleton_of(WAN.model_class, _expert_folder(where, "low_noise").model)

        def both() -> nn.Module:  # the boundary only routes the forward
            return WanExperts(high(), low(), 0.0)

        skeleton = both
    return dataclasses.replace(layout, latent_ndim=5, skeleton=skeleton,
                               default_include=_targets(expert == "both"))


SPEC = ModelFamilySpec(WAN.name, load_wan, WanOptions, WAN.description,
                       make_encoder=_make_encoder, detect=_family_of, describe=_describe)

__all__ = ["SPEC", "WAN", "Family", "WanExperts", "WanLatentVAE", "WanOptions"]
