"""Front ends of ``loraengine prepare`` for the record families (FLUX.2, Qwen-Image,
Z-Image, Chroma, Lumina 2, HiDream): each pipeline's own VAE and ``encode_prompt``.

Latents are the posterior mean in the space the pipeline denoises in (FLUX.2: 2×2
patches normalised by the VAE's batch-norm statistics; Qwen-Image: the single frame
normalised by the per-channel mean and std). Captions whose token count varies (Qwen,
Z-Image) are zero-padded to the longest of a batch with a ``mask`` of the real tokens,
which the family's call gives the transformer; the others come padded as the pipeline
pads them. The Qwen-Image edit pipelines read each caption together with its reference
image (``captions_see_references``), with a stand-in for ``Qwen2VLProcessor`` where
transformers cannot build one (no torchvision).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loraengine.core.errors import DataError
from loraengine.plugins.models.common import Family, pipeline_class, read_json
from loraengine.plugins.models.encoders import PipelineEncoder


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L_i, D]`` rows -> (``[N, L, D]`` zero-padded to the longest, ``[N, L]`` mask
    of the real rows, int64 as a tokenizer's attention mask)."""
    length = max(int(r.shape[0]) for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], *r.shape[1:])])
                          for r in rows])
    mask = torch.stack([torch.arange(length, device=r.device) < r.shape[0] for r in rows])
    return embeds, mask.long()


def _patch_size(root: Any, family: Family, key: str = "patch_size") -> int:
    path = root / family.subfolder / "config.json"
    value = read_json(path).get(key, 1) if path.exists() else 1
    return int(value[0] if isinstance(value, (list, tuple)) else value)


class Flux2Encoder(PipelineEncoder):
    """FLUX.2 dev (Mistral 3) and Klein (Qwen3): the text encoder's chosen layers side
    by side, padded to the pipeline's sequence length; latents patchified 2×2 and
    normalised by the VAE's batch norm, ``[N, 4C, H/2, W/2]``."""

    def _latent_multiple(self, family: Family) -> int:
        return 2 * _patch_size(self.root, family)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean.float()
        b, c, h, w = z.shape
        z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        z = z.reshape(b, 4 * c, h // 2, w // 2)
        mean = vae.bn.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.float().view(1, -1, 1, 1)
                         + float(vae.config.batch_norm_eps))
        return ((z - mean) / std).cpu()

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        extra = {}
        if self.max_sequence_length:
            extra["max_sequence_length"] = int(self.max_sequence_length)
        embeds, _ = self.pipe.encode_prompt(captions, device=self.device,
                                            num_images_per_prompt=1, **extra)
        return {"cond": embeds}


class QwenImageEncoder(PipelineEncoder):
    """Qwen-Image: Qwen2.5-VL's last hidden states after the prompt template (its
    system turn dropped), with their mask; the VAE's single frame normalised by the
    config's ``latents_mean`` / ``latents_std``."""

    def __init__(self, family: Family, root: Any, options: Any):
        super().__init__(family, root, options)
        cfg = self.pipe.vae.config
        shape = (1, int(cfg.z_dim), 1, 1)
        self.latents_mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape)
        self.latents_std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape)
        self.bucket_multiple = 2 ** len(cfg.temperal_downsample) * \
            _patch_size(self.root, family)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        frames = pixels.to(self.device, vae.dtype).unsqueeze(2)
        z = vae.encode(frames).latent_dist.mean[:, :, 0].float().cpu()
        return (z - self.latents_mean) / self.latents_std

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        extra = {}
        if self.max_sequence_length:
            extra["max_sequence_length"] = int(self.max_sequence_length)
        embeds, mask = self.pipe.encode_prompt(captions, device=self.device,
                                               num_images_per_prompt=1, **extra)
        if mask is None:  # the pipeline drops a mask of all ones
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"cond": embeds, "mask": mask.long()}


class VLPromptProcessor:
    """What ``Qwen2VLProcessor`` makes of prompts and images, without its video
    processor (whose class transformers will not even name without torchvision):
    Qwen2-VL's image processor (its PIL version) turns each image into patches and a
    grid ``(t, h, w)``; each image token of the text, in order, stands for
    ``t·h·w / merge²`` of them; the tokenizer reads the expanded text."""

    def __init__(self, folder: Path):
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            str(folder), local_files_only=True)
        self.image_token = str(getattr(self.tokenizer, "image_token", None)
                               or "<|image_pad|>")

    def __call__(self, text: str | list[str], images: Any = None, padding: bool = True,
                 return_tensors: str = "pt") -> Any:
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        features: dict[str, Any] = {}
        if images is not None:
            features = dict(self.image_processor(images=images, return_tensors="pt"))
            merge = int(self.image_processor.merge_size) ** 2
            counts = iter(int(g.prod()) // merge for g in features["image_grid_thw"])
            mark = "\0image\0"
            for i, line in enumerate(texts):
                while self.image_token in line:
                    line = line.replace(self.image_token, mark * next(counts), 1)
                texts[i] = line.replace(mark, self.image_token)
        tokens = self.tokenizer(texts, padding=padding, return_tensors=return_tensors)
        return BatchFeature({**tokens, **features})


def vl_processor(folder: Path) -> Any:
    """The pipeline's ``Qwen2VLProcessor`` where transformers can build it (with
    torchvision), else :class:`VLPromptProcessor` of the same folder."""
    try:
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # no torchvision: its video processor cannot be named
        return VLPromptProcessor(folder)


class QwenImageEditEncoder(QwenImageEncoder):
    """Qwen-Image-Edit (and Edit Plus, one reference): Qwen2.5-VL reads each caption
    together with its reference image, as the pipeline's ``encode_prompt`` does (Edit:
    the image itself; Plus: "Picture 1" resized to the pipeline's condition area); the
    reference's latents are the pipeline's ``_encode_vae_image``, the same as the
    target image's."""

    unused = ("processor",)
    #: ``loraengine prepare`` encodes each (caption, reference) pair
    captions_see_references = True

    def __init__(self, family: Family, root: Any, options: Any):
        super().__init__(family, root, options)
        folder = self.root / "processor"
        if not (folder / "preprocessor_config.json").exists():
            raise DataError(f"--model: {folder}: no preprocessor_config.json (the "
                            f"{self.pipeline_class} reads its reference image with it)")
        self.pipe.processor = vl_processor(folder)
        # the stand-in and transformers' own processor (with torchvision) may resize
        # differently: the cache keeps their encodings apart
        self.fingerprint = hashlib.sha256(
            (self.fingerprint + type(self.pipe.processor).__name__).encode()).hexdigest()

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        raise DataError(f"{self.pipeline_class} encodes each caption together with its "
                        f"reference image; prepare with --references, and sample with "
                        f"--prompts the conditioning.safetensors it writes")

    def condition_image(self, picture: Any) -> Any:
        """The image the pipeline's text encoder sees for a reference ``picture``."""
        if self.pipeline_class != "QwenImageEditPlusPipeline":
            return picture
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

        w, h = plus.calculate_dimensions(plus.CONDITION_IMAGE_SIZE, picture.width /
                                         picture.height)
        return [self.pipe.image_processor.resize(picture, h, w)]

    @torch.no_grad()
    def encode_captions_with(self, captions: list[str], pictures: list[Any]
                             ) -> dict[str, torch.Tensor]:
        """Each caption with its reference image (PIL, as its latents were made)."""
        rows = []
        for caption, picture in zip(captions, pictures, strict=True):
            embeds, mask = self.pipe.encode_prompt(
                [caption], image=self.condition_image(picture), device=self.device,
                num_images_per_prompt=1)
            if mask is None:  # the pipeline drops a mask of all ones
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            rows.append(embeds[0][mask[0].bool()].detach().float().cpu())
        embeds, mask = pad_rows(rows)
        return {"cond": embeds, "mask": mask}


def qwen_image_encoder(family: Family, root: Any, options: Any) -> PipelineEncoder:
    """The encoder of a Qwen-Image folder: the edit pipelines read captions together
    with the reference image."""
    if pipeline_class(Path(root)).startswith("QwenImageEdit"):
        return QwenImageEditEncoder(family, root, options)
    return QwenImageEncoder(family, root, options)


class ZImageEncoder(PipelineEncoder):
    """Z-Image: Qwen3's second-to-last hidden states of each caption's real tokens
    (the pipeline's list), zero-padded to the longest with their mask."""

    def _latent_multiple(self, family: Family) -> int:
        return _patch_size(self.root, family, "all_patch_size")

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        extra = {}
        if self.max_sequence_length:
            extra["max_sequence_length"] = int(self.max_sequence_length)
        rows, _ = self.pipe.encode_prompt(list(captions), device=self.device,
                                          do_classifier_free_guidance=False, **extra)
        embeds, mask = pad_rows(rows)
        return {"cond": embeds, "mask": mask}


class ChromaEncoder(PipelineEncoder):
    """Chroma: T5's hidden states and the pipeline's text mask (the prompt's tokens
    and its first padding token)."""

    def _latent_multiple(self, family: Family) -> int:
        return 2 * _patch_size(self.root, family)

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        extra = {}
        if self.max_sequence_length:
            extra["max_sequence_length"] = int(self.max_sequence_length)
        embeds, _, mask, *_ = self.pipe.encode_prompt(
            prompt=captions, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, **extra)
        return {"cond": embeds, "mask": mask}


class Lumina2Encoder(PipelineEncoder):
    """Lumina 2: Gemma's second-to-last hidden states of the system prompt and the
    caption, with the tokenizer's attention mask."""

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        extra = {}
        if self.max_sequence_length:
            extra["max_sequence_length"] = int(self.max_sequence_length)
        embeds, mask, _, _ = self.pipe.encode_prompt(
            captions, do_classifier_free_guidance=False, num_images_per_prompt=1,
            device=self.device, **extra)
        return {"cond": embeds, "mask": mask.long()}


class HiDreamEncoder(PipelineEncoder):
    """HiDream-I1: T5's hidden states (``cond``), every Llama layer's
    (``llama3``, ``[N, layers, L, D]``) and both CLIPs' pooled projections side by side
    (``pooled``)."""

    def _latent_multiple(self, family: Family) -> int:
        return _patch_size(self.root, family)

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        extra = {}
        if self.max_sequence_length:
            extra["max_sequence_length"] = int(self.max_sequence_length)
        t5, _, llama, _, pooled, _ = self.pipe.encode_prompt(
            prompt=captions, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, **extra)
        return {"cond": t5, "llama3": llama.transpose(0, 1), "pooled": pooled}


ENCODERS: dict[str, Callable[[Family, Any, Any], PipelineEncoder]] = {
    "flux2": Flux2Encoder, "qwen_image": qwen_image_encoder, "z_image": ZImageEncoder,
    "chroma": ChromaEncoder, "lumina2": Lumina2Encoder, "hidream": HiDreamEncoder,
}
