"""The front ends ``loraengine prepare`` uses: a pipeline's own VAE and text encoders.

Each family's encoder loads the pipeline folder without its denoiser (and without
safety checkers or image encoders), encodes images to VAE latents — the posterior mean,
so a rerun gives the same bits, shifted and scaled as the pipeline's VAE config says —
and captions through the pipeline's own ``encode_prompt``, so the conditioning is
exactly what the pipeline gives its denoiser at inference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from loraengine.core import devices
from loraengine.core.devices import DTYPES
from loraengine.core.errors import ConfigError, DataError
from loraengine.plugins.models.common import Family, read_json

#: Components an encoder never needs; passing None skips loading them.
UNUSED = ("unet", "transformer", "transformer_2", "safety_checker", "feature_extractor",
          "image_encoder", "audio_vae", "vocoder", "prompt_enhancer", "duration_head")
#: Components whose files decide what an encoder produces.
ENCODING = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4",
            "tokenizer", "tokenizer_2", "tokenizer_3", "tokenizer_4", "processor",
            "connectors")


def resolve_device(name: str) -> torch.device:
    """The encoders' device (``--device`` of ``loraengine prepare``); not probed here,
    the first tensor put on it says whether it works."""
    return devices.resolve_device(name, key="--device", error=DataError, probe=False)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DataError(f"--dtype: expected one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def folder_fingerprint(root: Path, components: tuple[str, ...]) -> str:
    """A digest of what the encoding components are: their JSON files' contents and
    every weight file's name, size and modification time (hashing gigabytes of
    weights on every run would cost more than it saves)."""
    h = hashlib.sha256()
    for comp in components:
        folder = root / comp
        if not folder.is_dir():
            continue
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = f.relative_to(root).as_posix()
            st = f.stat()
            h.update(f"{rel}\0{st.st_size}\0".encode())
            if f.suffix == ".json" or st.st_size < 65536:
                h.update(f.read_bytes())
            else:
                h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()


class _NoTorchvisionNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL
    version for want of torchvision: diffusers' pipeline modules import the CLIP and
    SigLIP image processors, which prepare and sample never use."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("requires torchvision" in text and "falling back to" in text)


#: The transformers logger that issues that notice (``transformers.utils.import_utils``).
_IMPORT_LOGGER = "transformers.utils.import_utils"


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence the libraries' own loading bars and deprecation chatter: prepare shows
    its own progress, and old scheduler configs are read as they are."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    notice = _NoTorchvisionNotice()
    logging.getLogger(_IMPORT_LOGGER).addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logging.getLogger(_IMPORT_LOGGER).removeFilter(notice)
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


class PipelineEncoder:
    """VAE + text encoders of one pipeline folder (see :class:`DataEncoder`)."""

    caption_batch = 8
    #: components of the folder this encoder does not load (beside :data:`UNUSED`)
    unused: tuple[str, ...] = ()

    def __init__(self, family: Family, root: Path, options: Mapping[str, Any]):
        import diffusers
        from diffusers import DiffusionPipeline

        diffusers.utils.logging.set_verbosity_error()
        self.family = family.name
        self.root = Path(root)
        index_path = self.root / "model_index.json"
        if not index_path.exists():
            raise DataError(f"--model: {root} is not a diffusers pipeline folder (no "
                            f"model_index.json); prepare needs its VAE and text encoders")
        index = read_json(index_path)
        cls = str(index.get("_class_name", ""))
        if family.pipeline_classes and cls not in family.pipeline_classes:
            # another family's pipeline would fail deep inside this one's encoding
            raise ConfigError(f"--family: {root} holds a {cls or 'unnamed'} pipeline; "
                              f"{family.name} prepares with "
                              f"{' or '.join(family.pipeline_classes)} (pass its own "
                              f"family, or --family auto)")
        self.device = resolve_device(str(options.get("device", "auto")))
        self.dtype = resolve_dtype(str(options.get("dtype", "auto")), self.device)
        self.max_sequence_length = options.get("max_sequence_length")
        self.pipeline_class = cls
        skip = {name: None for name in (*UNUSED, *self.unused) if name in index}
        # Components saved as [null, null] (SD3 without T5...) must be passed as None.
        skip.update({name: None for name, value in index.items() if
                     isinstance(value, list) and value and value[0] is None})
        try:
            with _quiet_loading():
                pipe = DiffusionPipeline.from_pretrained(str(self.root), local_files_only=True,
                                                         torch_dtype=self.dtype, **skip)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise DataError(f"--model: cannot load the pipeline at {root}: "
                            f"{text[0] if text else type(exc).__name__}") from None
        if getattr(pipe, "vae", None) is None:
            raise DataError(f"--model: pipeline {root} has no vae")
        pipe.to(self.device)
        vae_cfg = pipe.vae.config
        if self.dtype == torch.float16 and getattr(vae_cfg, "force_upcast", False):
            pipe.vae.to(torch.float32)  # e.g. SDXL's VAE overflows in fp16
        self.pipe = pipe
        scale = getattr(vae_cfg, "scaling_factor", None)  # absent from video VAEs
        self.vae_scale = float(scale if scale is not None else family.vae_scale)
        shift = getattr(vae_cfg, "shift_factor", None)
        self.vae_shift = float(shift if shift is not None else family.vae_shift)
        levels = getattr(vae_cfg, "block_out_channels", None)
        vae_factor = 2 ** (len(levels) - 1) if levels else family.vae_factor
        self.bucket_multiple = vae_factor * self._latent_multiple(family)
        self.default_resolution = family.default_resolution
        settings = json.dumps([family.name, str(self.dtype), self.max_sequence_length])
        self.fingerprint = hashlib.sha256(
            (settings + folder_fingerprint(self.root, ENCODING)).encode()).hexdigest()

    def _latent_multiple(self, family: Family) -> int:
        """Latent cells per step of the denoiser: 2^(levels−1) for a UNet, the patch
        size for a transformer (Flux packs 2×2 on top)."""
        path = self.root / family.subfolder / "config.json"
        cfg = read_json(path) if path.exists() else {}
        if family.subfolder == "unet":
            return 2 ** (len(cfg.get("block_out_channels", [0] * 4)) - 1)
        patch = int(cfg.get("patch_size", 2 if family.name == "sd3" else 1))
        return patch * (2 if family.name == "flux" else 1)

    # -- images ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return ((dist.mean.float() - self.vae_shift) * self.vae_scale).cpu()

    def image_conditioning(self, original_hw: tuple[int, int], crop_tl: tuple[int, int],
                           target_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {}

    # -- captions -------------------------------------------------------------------
    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        from loraengine.core.data import stack_padded

        out: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(captions), self.caption_batch):
            part = self._encode(captions[i:i + self.caption_batch])
            for k, v in part.items():
                out.setdefault(k, []).append(v.detach().cpu())
        # token counts differ between batches where captions are padded to a batch's
        # longest (Qwen, Z-Image); their masks pad with zeros too
        return {k: stack_padded(v, dim=1) if v[0].ndim > 1 else torch.cat(v)
                for k, v in out.items()}

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class SDEncoder(PipelineEncoder):
    """SD 1.x / 2.x: one CLIP text encoder's last hidden state."""

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(captions, device=self.device,
                                            num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
        return {"cond": embeds}


class SDXLEncoder(PipelineEncoder):
    """SDXL: both CLIP encoders' penultimate states side by side, the second's pooled
    projection, and size/crop ``time_ids`` per image."""

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=captions, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False)
        return {"cond": embeds, "pooled": pooled}

    def image_conditioning(self, original_hw: tuple[int, int], crop_tl: tuple[int, int],
                           target_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        values = [*original_hw, *crop_tl, *target_hw]
        return {"time_ids": torch.tensor(values, dtype=torch.float32)}


class _ConfigOnly:
    """Stands in for a missing denoiser where a pipeline only reads its config."""

    def __init__(self, config: Mapping[str, Any]):
        from types import SimpleNamespace

        self.config = SimpleNamespace(**config)


class SD3Encoder(PipelineEncoder):
    """SD3: CLIP-L and CLIP-G penultimate states, padded to T5's width and followed by
    T5's sequence; the two pooled CLIP projections side by side."""

    def __init__(self, family: Family, root: Path, options: Mapping[str, Any]):
        super().__init__(family, root, options)
        if getattr(self.pipe, "text_encoder_3", None) is None:
            # Without T5 the pipeline fills zeros sized from the transformer's config.
            cfg = read_json(self.root / "transformer" / "config.json")
            self.pipe.transformer = _ConfigOnly(cfg)

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        extra = {}
        if self.max_sequence_length:
            extra["max_sequence_length"] = int(self.max_sequence_length)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False, **extra)
        return {"cond": embeds, "pooled": pooled}


class FluxEncoder(PipelineEncoder):
    """Flux: T5 hidden states, CLIP's pooled output and the text position ids."""

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        extra = {}
        if self.max_sequence_length:
            extra["max_sequence_length"] = int(self.max_sequence_length)
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=captions, prompt_2=None, device=self.device, num_images_per_prompt=1,
            **extra)
        ids = text_ids.float().unsqueeze(0).expand(len(captions), *text_ids.shape)
        return {"cond": embeds, "pooled": pooled, "txt_ids": ids.contiguous()}


ENCODERS: dict[str, Callable[[Family, Any, Any], PipelineEncoder]] = {
    "sd15": SDEncoder, "sd2": SDEncoder, "sdxl": SDXLEncoder, "sd3": SD3Encoder,
    "flux": FluxEncoder,
}


def make_encoder(family: Family, root: Path, options: Mapping[str, Any]) -> PipelineEncoder:
    from loraengine.plugins.models.flow_encoders import ENCODERS as FLOW_ENCODERS
    from loraengine.plugins.models.video_encoders import ENCODERS as VIDEO_ENCODERS

    makers: dict[str, Callable[[Family, Any, Any], PipelineEncoder]] = {
        **ENCODERS, **FLOW_ENCODERS, **VIDEO_ENCODERS}
    return makers[family.name](family, root, options)
