"""Rectified-flow transformer families as data.

A :class:`FlowCall` says how a diffusers transformer's ``forward`` is called from the
engine's ``(x_t, t, cond)``: the latent's packing, the position inputs, what the
timestep argument holds (σ, the scheduler's σ·1000 or 1−σ), which conditioning tensors go to which
argument, which inputs the pipeline fills with zeros or constants (an audio stream
left empty, an image embedding unused in text-to-video), whether a guidance value is
passed and whether the output is the negated velocity. A :class:`ShiftRule` says how
the pipeline turns a latent size into its timestep shift (:func:`shape_shift`: the
shift of each batch's own size). :func:`flow_predictor` turns a ``FlowCall`` into the family's predict
function, so a family is one :func:`~loraengine.plugins.models.common.flow_transformer_family`
call.

Latents are ``[N,C,H,W]`` (images) or ``[N,C,T,H,W]`` (video) in the space the pipeline
denoises in; a packing only rearranges them for the model and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from loraengine.core.model import PredictFn

#: How the pipeline computes μ from the image's token count.
MuRule = Literal["linear", "flux2"]
#: What the timestep argument holds, given σ ∈ (0, 1]: σ, σ·num_train_timesteps (the
#: scheduler's timestep) or 1 − σ.
TimestepForm = Literal["sigma", "scaled", "one_minus_sigma"]
#: The config key that holds a width: a key, or (flag key, key when the flag is set,
#: key otherwise) where the config switches a projection on or off (LTX-2's text
#: projection, which LTX-2.3 drops: its connectors give the attention width).
WidthKey = str | tuple[str, str, str]


def width_key(config: Any, key: WidthKey) -> str:
    """The config key ``key`` names for this config."""
    if isinstance(key, str):
        return key
    flag, when_set, otherwise = key
    return when_set if getattr(config, flag, False) else otherwise


@dataclass(frozen=True)
class FlowCall:
    """How one transformer class is called (see the module docstring)."""

    #: ``none`` (the model patchifies), ``patch2`` (2×2 patches into tokens, Flux.1 and
    #: Qwen-Image), ``tokens`` (each latent cell one token, frame-major for video:
    #: Flux.2, LTX-2) or ``frames`` (a list of ``[C,1,H,W]``, Z-Image)
    packing: Literal["none", "patch2", "tokens", "frames"] = "none"
    #: position inputs: ``flux1`` (img_ids/txt_ids of 3 axes), ``flux2`` (4 axes, per
    #: sample), ``qwen`` (img_shapes), ``grid`` (the latent's ``num_frames``, ``height``
    #: and ``width`` as integers; the model builds its positions, LTX-2) or ``none``
    positions: Literal["none", "flux1", "flux2", "qwen", "grid"] = "none"
    timestep: TimestepForm = "sigma"
    latent_arg: str = "hidden_states"
    timestep_arg: str = "timestep"
    #: further arguments given the same timestep (LTX-2.3's ``sigma``)
    also_timestep: tuple[str, ...] = ()
    #: the latent's dimensions: 4 (images) or 5 (video, ``[N,C,T,H,W]``)
    latent_ndim: int = 4
    #: append zero channels up to the config's ``in_channels`` (an image-to-video model
    #: trained text-to-video: its condition latents and mask are zero, HunyuanVideo 1.5);
    #: the latent channels are then the config's ``out_channels``
    pad_channels: bool = False
    #: (cond key, forward argument) for the tensors every sample has
    args: tuple[tuple[str, str], ...] = (("cond", "encoder_hidden_states"),)
    #: (cond key, forward argument) passed only when the conditioning file has them
    optional_args: tuple[tuple[str, str], ...] = ()
    #: forward argument given the conditioning's ``mask``, or ones over the text tokens
    #: when it has none (a model that always takes a text mask)
    text_mask: str | None = None
    #: (forward argument, tokens, config key of the width or ``None``) given zeros
    #: ``[N, tokens, width]`` (``[N, tokens]`` without a width) unless an ``args`` or
    #: ``optional_args`` entry gave it: inputs the pipeline fills with zeros or leaves
    #: empty (LTX-2's audio stream when training video only, HunyuanVideo 1.5's image
    #: embedding in text-to-video)
    zeros: tuple[tuple[str, int, WidthKey | None], ...] = ()
    #: (forward argument, value) passed as they are (LTX-2's ``audio_num_frames``)
    constants: tuple[tuple[str, Any], ...] = ()
    #: cond keys stored ``[N, K, ...]`` (K per-layer states, HiDream's Llama) that the
    #: model takes as ``[K, N, ...]``
    batch_second: tuple[str, ...] = ()
    #: forward argument given, when the conditioning has a ``mask``, that text mask
    #: followed by ones for every image token, in the latents' float dtype as the
    #: pipeline passes it (Chroma)
    joint_mask: str | None = None
    #: pass ``guidance`` (the ``guidance`` option) when the config has guidance_embeds
    guidance: bool = False
    #: the model predicts x0 − noise (the negated velocity)
    negate: bool = False
    #: conditioning key of a reference image's latents ``[N,C,h,w]`` appended to the
    #: image tokens (edit models); its prediction is dropped
    reference: str | None = None
    #: (cond key, config key) of the conditioning widths the config states
    widths: tuple[tuple[str, WidthKey], ...] = (("cond", "joint_attention_dim"),
                                           ("pooled", "pooled_projection_dim"))

    @property
    def cond_keys(self) -> tuple[str, ...]:
        """The cond keys every sample needs, each once."""
        return tuple(dict.fromkeys(key for key, _ in self.args))


@dataclass(frozen=True)
class ShiftRule:
    """How the pipeline picks its shift from the resolution (``use_dynamic_shifting``)."""

    mu: MuRule = "linear"
    #: latent cells per token: 4 for a 2×2 patch, 1 when latents are patchified; a
    #: video latent's cells count every frame
    cells_per_token: int = 4
    #: inference steps μ is computed for where the rule depends on them (Flux.2)
    steps: int = 50


# -- packing ---------------------------------------------------------------------------

def pack2(latents: torch.Tensor) -> torch.Tensor:
    """``[B,C,H,W]`` -> ``[B, H/2·W/2, 4C]``: each 2×2 patch becomes one token."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack2(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack2` for a latent of ``height × width``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """``[B,C,H,W]`` -> ``[B, H·W, C]``; ``[B,C,T,H,W]`` -> ``[B, T·H·W, C]``."""
    b, c = latents.shape[:2]
    return latents.reshape(b, c, -1).permute(0, 2, 1)


def from_tokens(tokens: torch.Tensor, *grid: int) -> torch.Tensor:
    """Inverse of :func:`to_tokens` for a latent of ``grid`` cells (H, W or T, H, W)."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, *grid)


def _pack(kind: str, x: torch.Tensor) -> Any:
    if kind == "patch2":
        return pack2(x)
    if kind == "tokens":
        return to_tokens(x)
    if kind == "frames":
        return list(x.unsqueeze(2).unbind(0))
    return x


def _unpack(kind: str, out: Any, grid: tuple[int, ...]) -> torch.Tensor:
    if kind == "patch2":
        return unpack2(out, *grid)
    if kind == "tokens":
        return from_tokens(out, *grid)
    if kind == "frames":
        return torch.stack([o.squeeze(1) for o in out])
    return out


def _tokens_of(kind: str, grid: tuple[int, ...]) -> int:
    cells = math.prod(grid)
    return cells // 4 if kind == "patch2" else cells


# -- position inputs -------------------------------------------------------------------

def grid_ids(rows: int, cols: int, axes: int, first: float, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
    """``[rows·cols, axes]`` ids: ``first`` on axis 0, the row on axis 1, the column on
    axis 2, zeros elsewhere."""
    ids = torch.zeros(rows, cols, axes, device=device, dtype=dtype)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, axes)


def flux1_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype
                    ) -> torch.Tensor:
    """FLUX.1's position ids of a ``height × width`` latent packed 2×2: ``[H/2·W/2, 3]``,
    (0, row, column) of each token."""
    return grid_ids(height // 2, width // 2, 3, 0.0, device, dtype)


def _positions(call: FlowCall, x: torch.Tensor, ref: torch.Tensor | None,
               cond: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    if call.positions == "grid":
        frames, height, width = x.shape[2:] if x.ndim == 5 else (1, *x.shape[2:])
        return {"num_frames": int(frames), "height": int(height), "width": int(width)}
    if call.positions == "none":
        return {}
    b, _, h, w = x.shape
    dev, dt = x.device, x.dtype
    txt = cond[call.args[0][0]]
    if call.positions == "flux1":
        txt_ids = cond.get("txt_ids")
        if txt_ids is None:
            txt_ids = torch.zeros(txt.shape[1], 3, device=dev, dtype=dt)
        elif txt_ids.ndim == 3:
            txt_ids = txt_ids[0]  # the same for every sample; the model takes one
        img = flux1_image_ids(h, w, dev, dt)
        if ref is not None:
            img = torch.cat([img, grid_ids(ref.shape[2] // 2, ref.shape[3] // 2, 3, 1.0,
                                           dev, dt)])
        return {"img_ids": img, "txt_ids": txt_ids}
    if call.positions == "flux2":
        img = grid_ids(h, w, 4, 0.0, dev, dt)
        if ref is not None:  # the pipeline puts reference image k at time 10·(k+1)
            img = torch.cat([img, grid_ids(ref.shape[2], ref.shape[3], 4, 10.0, dev, dt)])
        txt_ids = torch.zeros(txt.shape[1], 4, device=dev, dtype=dt)
        txt_ids[:, 3] = torch.arange(txt.shape[1], device=dev, dtype=dt)
        return {"img_ids": img.expand(b, -1, -1), "txt_ids": txt_ids.expand(b, -1, -1)}
    if call.positions == "qwen":
        shapes: list[tuple[int, int, int]] = [(1, h // 2, w // 2)]
        if ref is not None:
            shapes.append((1, ref.shape[2] // 2, ref.shape[3] // 2))
        return {"img_shapes": [shapes] * b}
    return {}


# -- the predict function --------------------------------------------------------------

def model_timestep(form: TimestepForm, t: torch.Tensor, scale: float) -> torch.Tensor:
    """The timestep argument for engine timesteps ``t`` = σ·``scale``."""
    sigma = t.double() / scale
    if form == "sigma":
        return sigma
    if form == "one_minus_sigma":
        return 1.0 - sigma
    return t.double()  # σ·num_train_timesteps, the scheduler's own timestep


def flow_predictor(call: FlowCall) -> Callable[[Any, nn.Module, Any, int], PredictFn]:
    """The family ``predictor`` of a :class:`FlowCall`."""
    def predictor(options: Any, module: nn.Module, schedule: Any, vae_factor: int
                  ) -> PredictFn:
        scale = float(schedule.timestep_scale)
        guidance_value = float(getattr(options, "guidance", 1.0))

        def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                    cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
            b, grid = x_t.shape[0], tuple(x_t.shape[2:])
            if x_t.ndim != call.latent_ndim:
                shape = "[N,C,T,H,W]" if call.latent_ndim == 5 else "[N,C,H,W]"
                raise ValueError(f"this family takes latents {shape}; got shape "
                                 f"{list(x_t.shape)}")
            if call.packing == "patch2" and any(n % 2 for n in grid):
                raise ValueError(f"this family's latents need even sides; got "
                                 f"{'×'.join(map(str, grid))}")
            ref = cond.get(call.reference) if call.reference else None
            x_in = x_t
            if call.pad_channels:
                config: Any = model.config
                extra = int(config.in_channels) - x_t.shape[1]
                x_in = torch.cat([x_t, x_t.new_zeros(b, extra, *grid)], dim=1)
            hidden = _pack(call.packing, x_in)
            if ref is not None:
                hidden = torch.cat([hidden, _pack(call.packing, ref.to(x_t.dtype))], dim=1)
            kwargs: dict[str, Any] = {call.latent_arg: hidden}
            step = model_timestep(call.timestep, t, scale).float()
            for arg in (call.timestep_arg, *call.also_timestep):
                kwargs[arg] = step
            for key, arg in call.args:
                kwargs[arg] = cond[key].transpose(0, 1) if key in call.batch_second \
                    else cond[key]
            for key, arg in call.optional_args:
                if key in cond:
                    kwargs[arg] = cond[key]
            if call.packing == "frames":  # per-sample lists; a mask trims padding
                mask = cond.get("mask")
                for key, arg in call.args:
                    rows = cond[key].unbind(0)
                    kwargs[arg] = [r[m.bool()] for r, m in zip(rows, mask.unbind(0), strict=True)] \
                        if mask is not None else list(rows)
            if call.text_mask:
                text = cond[call.args[0][0]]
                kwargs[call.text_mask] = cond["mask"] if "mask" in cond else \
                    torch.ones(text.shape[:2], dtype=torch.long, device=text.device)
            for arg, tokens, width in call.zeros:
                if arg not in kwargs:
                    size = (b, tokens) if width is None else \
                        (b, tokens, int(getattr(model.config, width_key(model.config, width))))
                    kwargs[arg] = x_t.new_zeros(size)
            kwargs.update(call.constants)
            if call.joint_mask and "mask" in cond:
                text = cond["mask"].to(x_t.dtype)
                kwargs[call.joint_mask] = torch.cat(
                    [text, text.new_ones(b, _tokens_of(call.packing, grid))], dim=1)
            if call.guidance and getattr(model.config, "guidance_embeds", False):
                kwargs["guidance"] = torch.full((b,), guidance_value, device=x_t.device,
                                                dtype=x_t.dtype)
            kwargs.update(_positions(call, x_t, ref, cond))
            out = model(**kwargs, return_dict=False)[0]
            if ref is not None:
                out = out[:, :_tokens_of(call.packing, grid)]
            pred = _unpack(call.packing, out, grid)
            return -pred if call.negate else pred

        return predict

    return predictor


# -- the resolution-dependent shift ----------------------------------------------------

def linear_mu(seq_len: int, sched: Mapping[str, Any]) -> float:
    """μ growing linearly in the image's token count between the config's
    (``base_image_seq_len``, ``base_shift``) and (``max_image_seq_len``, ``max_shift``)."""
    lo, hi = float(sched.get("base_image_seq_len", 256)), float(sched.get(
        "max_image_seq_len", 4096))
    b0, b1 = float(sched.get("base_shift", 0.5)), float(sched.get("max_shift", 1.15))
    m = (b1 - b0) / (hi - lo)
    return seq_len * m + (b0 - m * lo)


def flux2_mu(seq_len: int, steps: int) -> float:
    """Flux.2's fitted μ: linear in the token count (two fits, for 10 and 200 steps),
    interpolated in the step count below 4300 tokens."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    m200 = a2 * seq_len + b2
    if seq_len > 4300:
        return m200
    m10 = a1 * seq_len + b1
    a = (m200 - m10) / 190.0
    return a * steps + (m200 - 200.0 * a)


def mu_for(rule: ShiftRule, sched: Mapping[str, Any], *grid: int) -> float:
    """μ of a latent of ``grid`` cells (``height, width``, or ``frames, height, width``
    for video: the pipeline counts the tokens of every frame)."""
    seq = math.prod(grid) // rule.cells_per_token
    return flux2_mu(seq, rule.steps) if rule.mu == "flux2" else linear_mu(seq, sched)


def shift_of_mu(mu: float, sched: Mapping[str, Any]) -> float:
    """The plain shift s (σ' = s·σ/(1+(s−1)·σ)) that equals the scheduler's time shift
    by μ: e^μ for the exponential kind, μ for the linear one."""
    return mu if sched.get("time_shift_type", "exponential") == "linear" else math.exp(mu)


def resolution_shift(rule: ShiftRule, sched: Mapping[str, Any], *grid: int) -> float:
    """The shift the pipeline uses for a latent of ``grid`` cells."""
    return shift_of_mu(mu_for(rule, sched, *grid), sched)


def shape_shift(rule: ShiftRule, sched: Mapping[str, Any]
                ) -> Callable[[tuple[int, ...]], float]:
    """The shift of each latent shape ``(C, ...cells)``: what the pipeline would use at
    that size (a schedule's ``shift_by_shape``)."""
    def shift(shape: tuple[int, ...]) -> float:
        return resolution_shift(rule, sched, *shape[1:])

    return shift


def inference_sigmas(rule: ShiftRule | None, sched: Mapping[str, Any], height: int,
                     width: int, steps: int) -> torch.Tensor:
    """The σ of each inference step the pipeline runs at this latent size (what its
    scheduler's ``set_timesteps`` gives for ``linspace(1, 1/steps)``), in float64."""
    sigma = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    if sched.get("use_dynamic_shifting", False):
        s = resolution_shift(rule or ShiftRule(), sched, height, width)
    else:
        s = float(sched.get("shift", 1.0))
    sigma = s * sigma / (1 + (s - 1) * sigma)
    terminal = sched.get("shift_terminal")
    if terminal:
        rest = 1 - sigma
        sigma = 1 - rest / (rest[-1] / (1 - float(terminal)))
    return sigma

