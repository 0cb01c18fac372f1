"""Tiny, complete diffusers pipelines of every built-in family, for tests.

Each is built from small configs with seeded random weights — VAE, text encoders with
hand-made character-level tokenizers, denoiser and scheduler — and saved with
``save_pretrained``, so loading, ``loraengine prepare`` and training run end to end in
seconds without downloading anything. :func:`unet_to_original` writes a UNet in the
original (LDM) single-file layout, :func:`sd3_to_original` an SD3 transformer in the
original (MMDiT) one.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("sd15", "sd2", "sdxl", "sd3", "flux")
#: Record families: :func:`save_denoiser` saves a folder of their denoiser and
#: scheduler only, :func:`save_full` the whole pipeline (VAE, text encoders, tokenizers).
DENOISER_FAMILIES = ("flux2", "flux2_klein", "qwen_image", "z_image", "lumina2",
                     "chroma", "hidream")
_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def clip_tokenizer(length: int = 77) -> Any:
    """A CLIP BPE tokenizer over single characters (no merges), ``length`` tokens long
    (77; HiDream's long CLIPs read 248)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                             model_max_length=length)


def t5_tokenizer() -> Any:
    """A T5 (unigram) tokenizer whose pieces are single characters."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in _CHARS] + [("▁" + c, -2.5) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def clip_text(hidden: int, projection: int | None = None, seed: int = 0,
              length: int = 77) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=2 + 2 * len(_CHARS), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=length,
                         projection_dim=projection or hidden, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def t5_text(d_model: int = 32, seed: int = 0) -> Any:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=4 + 2 * len(_CHARS), d_model=d_model, d_kv=8, d_ff=2 * d_model,
                   num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                   # taken through the config's extra keys, which its signature omits
                   decoder_start_token_id=0,  # type: ignore[call-arg]
                   pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg).eval()


def vae(latent_channels: int = 4, scaling_factor: float = 0.18215,
        shift_factor: float | None = None, seed: int = 0,
        block_out_channels: tuple[int, ...] = (8, 16), sample_size: int = 32) -> Any:
    """An AutoencoderKL downsampling 2^(len(block_out_channels) − 1)× (2× by default;
    ``(8, 8, 16, 16)`` gives SD's 8×)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = len(block_out_channels)
    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                          block_out_channels=tuple(block_out_channels), layers_per_block=1,
                          norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * blocks,
                          up_block_types=("UpDecoderBlock2D",) * blocks,
                          sample_size=sample_size,
                          scaling_factor=scaling_factor, shift_factor=shift_factor)
    # mypy does not follow AutoencoderKL's mixin bases to nn.Module, which has eval()
    return model.eval()  # type: ignore[attr-defined]


def unet(cross_attention_dim: int, sdxl_pooled: int | None = None, linear_proj: bool = False,
         seed: int = 0) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra: dict[str, Any] = {}
    if sdxl_pooled is not None:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=sdxl_pooled + 6 * 8)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
        use_linear_projection=linear_proj, **extra)


def sd3_transformer(seed: int = 0) -> Any:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=32)


def sd3_comfyui_transformer(seed: int = 0) -> Any:
    """A tiny SD3 transformer ComfyUI can build too: ComfyUI reads an SD3 model's width
    as 64 · depth and matches 16 latent channels."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=128, pooled_projection_dim=16, pos_embed_max_size=32)


def comfyui_transformer(family: str, seed: int = 0) -> Any:
    """The tiny transformer of ``family`` as the ComfyUI fixtures build it (eval mode):
    ``flux``, ``chroma``, ``sd3``, ``lumina2``, ``qwen_image``, ``hidream``, ``flux2``,
    ``flux2_klein`` or ``z_image``. Flux.2's timestep and guidance embedders read 256
    sinusoid channels here, the width ComfyUI's model has at every size."""
    if family == "sd3":
        model = sd3_comfyui_transformer(seed)
    elif family == "flux":
        model = flux_transformer(seed)
    elif family in ("flux2", "flux2_klein"):
        model = flux2_transformer(seed, family == "flux2", timestep_channels=256)
    else:
        model = DENOISERS[family][1](seed)
    return model.eval()


def flux_transformer(seed: int = 0, guidance: bool = True) -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=16, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))


def flux2_transformer(seed: int = 0, guidance: bool = True, timestep_channels: int = 16
                      ) -> Any:
    """Flux.2 dev (``guidance``) or Klein (no guidance embedding), tiny."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
        timestep_guidance_channels=timestep_channels, mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=guidance)


def qwen_image_transformer(seed: int = 0) -> Any:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(2, 2, 4))


def z_image_transformer(seed: int = 0) -> Any:
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=24, axes_dims=[4, 6, 6],
        axes_lens=[1024, 32, 32])  # captions of a few hundred tokens come first


def lumina2_transformer(seed: int = 0) -> Any:
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    return Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
        axes_dim_rope=(4, 6, 6), axes_lens=(1024, 32, 32), cap_feat_dim=24)


def lumina2_released_width_transformer(seed: int = 0) -> Any:
    """Lumina 2 with the released model's attention widths (q 2304 rows, k and v 768:
    the split diffusers' LoRA converter hard-codes), 3 query heads and one key/value
    head of 768, a 192-wide feed-forward and one block of each kind (69M parameters)."""
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    return Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=2304, num_layers=1,
        num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=16,
        ffn_dim_multiplier=0.02, axes_dim_rope=(256, 256, 256), axes_lens=(1024, 32, 32),
        cap_feat_dim=24)


def chroma_transformer(seed: int = 0) -> Any:
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
        axes_dims_rope=(2, 2, 4), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=1)


def hidream_transformer(seed: int = 0) -> Any:
    """HiDream-I1, tiny: T5 width 24, two Llama layers of width 16, pooled width 12. In
    eval mode, as ``from_pretrained`` gives it: in train mode the model returns its
    output patch-major and its MoE gates add an auxiliary loss."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    model = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[24, 16], text_emb_dim=12,
        num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(2, 2, 4),
        max_resolution=(16, 16), llama_layers=[0, 1])
    # mypy does not follow the model's mixin bases to nn.Module, which has eval()
    return model.eval()  # type: ignore[attr-defined]


def _scheduler_configs() -> dict[str, dict[str, Any]]:
    from importlib import resources

    text = resources.files("loraengine.testing").joinpath("scheduler_configs.json").read_text(
        encoding="utf-8")
    return {k: v["config"] for k, v in json.loads(text).items() if not k.startswith("_")}


#: family -> the released pipeline's scheduler config (``scheduler_configs.json``, which
#: says where each value comes from)
SCHEDULERS = _scheduler_configs()

#: family -> (pipeline class, transformer builder, scheduler config, latent channels,
#: text width)
DENOISERS: dict[str, tuple[str, Any, dict[str, Any], int, int]] = {
    "flux2": ("Flux2Pipeline", lambda s: flux2_transformer(s, True), SCHEDULERS["flux2"],
              16, 24),
    "flux2_klein": ("Flux2KleinPipeline", lambda s: flux2_transformer(s, False),
                    SCHEDULERS["flux2_klein"], 16, 24),
    "qwen_image": ("QwenImagePipeline", qwen_image_transformer, SCHEDULERS["qwen_image"],
                   4, 24),
    "z_image": ("ZImagePipeline", z_image_transformer, SCHEDULERS["z_image"], 4, 24),
    "lumina2": ("Lumina2Pipeline", lumina2_transformer, SCHEDULERS["lumina2"], 4, 24),
    "chroma": ("ChromaPipeline", chroma_transformer, SCHEDULERS["chroma"], 4, 24),
    "hidream": ("HiDreamImagePipeline", hidream_transformer, SCHEDULERS["hidream"], 4, 24),
}


# -- whole pipelines of the record families (VAE, text encoder, tokenizer) ------------

#: Record families whose tiny folder can also be a whole pipeline (:func:`save_full`):
#: their own VAE class, text encoder class and tokenizer, so ``loraengine prepare`` and
#: ``loraengine sample --prompts FILE.txt`` run on them.
FULL_FAMILIES = ("flux2", "flux2_klein", "qwen_image", "z_image", "chroma", "lumina2",
                 "hidream")

#: Qwen's chat format as the released tokenizers' templates write it (system, user and
#: assistant turns; Qwen3's empty thinking block when thinking is switched off).
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}")


def qwen_tokenizer() -> Any:
    """A byte-level BPE tokenizer of the Qwen kind with no merges: every byte is one
    token, after Qwen's three special tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for char in bytes_to_unicode().values():
        vocab[char] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=4096,
                         additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


#: Mistral 3's instruction format: the system turn, then the user's text parts.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}[IMG]{% endif %}{% endfor %}"
    "[/INST]{% endif %}{% endfor %}")
_MISTRAL_SPECIAL = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]")


def char_tokenizer(specials: tuple[str, ...] = ()) -> Any:
    """A character-level fast tokenizer (``<s>`` first, ``<pad>`` to pad), with
    ``specials`` as whole tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for token in specials:
        vocab[token] = len(vocab)
    for c in _CHARS + string.ascii_uppercase + " \n:;()":
        vocab.setdefault(c, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=1024,
                                   additional_special_tokens=list(specials))


def llama_text(hidden: int = 16, layers: int = 2, seed: int = 0) -> Any:
    """A ``LlamaForCausalLM`` over :func:`char_tokenizer`'s tokens (HiDream's fourth
    text encoder, whose every layer's hidden states the transformer reads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(char_tokenizer()), hidden_size=hidden,
                      intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=512, pad_token_id=3, bos_token_id=1,
                      eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def mistral_tokenizer() -> Any:
    """A character-level tokenizer with Mistral 3's special tokens and chat format.
    FLUX.2 dev's pipeline only calls its ``apply_chat_template``, which a tokenizer
    has as a processor does (Pixtral's processor itself needs torchvision)."""
    tok = char_tokenizer(_MISTRAL_SPECIAL)
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


def mistral3_text(hidden: int = 8, layers: int = 30, seed: int = 0) -> Any:
    """A ``Mistral3ForConditionalGeneration`` (Mistral text model, one-layer Pixtral
    vision tower); FLUX.2 dev reads its hidden states 10, 20 and 30."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    vocab = len(mistral_tokenizer())
    cfg = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                         max_position_embeddings=1024, pad_token_id=3, bos_token_id=1,
                         eos_token_id=2),
        vision_config=dict(model_type="pixtral", hidden_size=8, intermediate_size=16,
                           num_hidden_layers=1, num_attention_heads=2, head_dim=4,
                           patch_size=4, image_size=32),
        image_token_index=8, spatial_merge_size=1)  # [IMG]
    return Mistral3ForConditionalGeneration(cfg).eval()


def gemma_tokenizer() -> Any:
    """A Gemma BPE tokenizer over single characters (spaces become ``▁``)."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in _CHARS + "<>▁" + string.ascii_uppercase:
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=512)


#: tokens of :func:`qwen_tokenizer`
QWEN_VOCAB = 259


def qwen3_text(hidden: int, layers: int, causal_lm: bool = False, seed: int = 0) -> Any:
    """A Qwen3 text model (``Qwen3ForCausalLM`` when ``causal_lm``, as Flux.2 Klein
    holds it; ``Qwen3Model`` as Z-Image does)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=QWEN_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=4, max_position_embeddings=1024, pad_token_id=0,
                      bos_token_id=0, eos_token_id=2, tie_word_embeddings=False)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg).eval()


def qwen25_vl_text(hidden: int = 24, seed: int = 0, vocab: int = QWEN_VOCAB) -> Any:
    """A ``Qwen2_5_VLForConditionalGeneration`` with a one-block vision tower (4-pixel
    patches, 2×2 merged); ``vocab`` covers the vision tokens where the model reads
    images (:func:`qwen_vl_tokenizer`)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=0,
                         eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 2, 2]}),
        vision_config=dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=2,
                           out_hidden_size=hidden, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=8, fullatt_block_indexes=[0]),
        image_token_id=QWEN_VOCAB, video_token_id=QWEN_VOCAB + 1,
        vision_start_token_id=QWEN_VOCAB + 2)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


#: Qwen2.5-VL's vision tokens, after the tiny Qwen vocabulary: the image, video and
#: vision-start ids are those :func:`qwen25_vl_text` configures
QWEN_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def qwen_vl_tokenizer() -> Any:
    """:func:`qwen_tokenizer` with Qwen2.5-VL's vision tokens as special tokens."""
    tok = qwen_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", *QWEN_VISION_TOKENS]})
    return tok


def qwen_vl_image_processor() -> Any:
    """Qwen2-VL's image processor (its PIL version) for :func:`qwen25_vl_text`'s vision
    tower: 4-pixel patches, 2 frames, 2×2 merged, between 16² and 48² pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2,
                                    min_pixels=16 * 16, max_pixels=48 * 48)


def gemma2_text(hidden: int = 24, seed: int = 0) -> Any:
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    vocab = len(gemma_tokenizer())
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=8, max_position_embeddings=512, pad_token_id=0,
                       eos_token_id=1, bos_token_id=2, sliding_window=64)
    return Gemma2Model(cfg).eval()


def flux2_vae(seed: int = 0) -> Any:
    """An ``AutoencoderKLFlux2`` (2× down, 4 channels, 2×2 patches batch-normalised over
    16) whose batch-norm statistics are not the identity's."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(
        block_out_channels=(8, 16), latent_channels=4, layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
    g = torch.Generator().manual_seed(seed + 1)
    bn = model.get_submodule("bn")  # type: ignore[attr-defined]
    with torch.no_grad():
        bn.running_mean.copy_(0.2 * torch.randn(16, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(16, generator=g))
    return model.eval()  # type: ignore[attr-defined]


def qwen_image_vae(seed: int = 0) -> Any:
    """An ``AutoencoderKLQwenImage`` (8× down, 4 channels) with per-channel statistics."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    model = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1],
                                   num_res_blocks=1, temperal_downsample=[False, True, True],
                                   latents_mean=[0.1, -0.2, 0.3, 0.0],
                                   latents_std=[1.5, 0.8, 2.0, 1.0])
    return model.eval()  # type: ignore[attr-defined]


def build_full(family: str, seed: int = 0) -> Any:
    """A tiny whole pipeline of a record family (see :data:`FULL_FAMILIES`)."""
    import diffusers as d

    pipe_cls, make, sched_cfg, _, _ = DENOISERS[family]
    parts: dict[str, Any] = dict(transformer=make(seed),
                                 scheduler=d.FlowMatchEulerDiscreteScheduler(**sched_cfg))
    if family == "flux2":  # three Mistral layers of width 8 side by side: 24
        parts.update(vae=flux2_vae(seed), tokenizer=mistral_tokenizer(),
                     text_encoder=mistral3_text(8, 30, seed))
    elif family == "flux2_klein":  # three Qwen3 layers of width 8 side by side: 24
        parts.update(vae=flux2_vae(seed), tokenizer=qwen_tokenizer(),
                     text_encoder=qwen3_text(8, 27, causal_lm=True, seed=seed))
    elif family == "qwen_image":
        parts.update(vae=qwen_image_vae(seed), tokenizer=qwen_tokenizer(),
                     text_encoder=qwen25_vl_text(24, seed))
    elif family == "z_image":
        parts.update(vae=vae(4, 0.3611, 0.1159, seed, sample_size=16),
                     tokenizer=qwen_tokenizer(), text_encoder=qwen3_text(24, 2, seed=seed))
    elif family == "chroma":
        parts.update(vae=vae(4, 0.3611, 0.1159, seed, sample_size=16),
                     tokenizer=t5_tokenizer(), text_encoder=t5_text(24, seed))
    elif family == "lumina2":
        parts.update(vae=vae(4, 0.3611, 0.1159, seed, sample_size=16),
                     tokenizer=gemma_tokenizer(), text_encoder=gemma2_text(24, seed))
    elif family == "hidream":  # two long CLIPs (pooled 6 + 6), T5 of 24, Llama of 16
        parts.update(vae=vae(4, 0.3611, 0.1159, seed, sample_size=16),
                     text_encoder=clip_text(8, 6, seed, length=248),
                     tokenizer=clip_tokenizer(248),
                     text_encoder_2=clip_text(8, 6, seed + 1, length=248),
                     tokenizer_2=clip_tokenizer(248), text_encoder_3=t5_text(24, seed),
                     tokenizer_3=t5_tokenizer(), text_encoder_4=llama_text(16, 2, seed),
                     tokenizer_4=char_tokenizer())
    else:
        raise ValueError(f"no whole tiny pipeline of {family!r}; choose from "
                         f"{', '.join(FULL_FAMILIES)}")
    cls = getattr(d, pipe_cls)
    extra = {"image_encoder": None, "feature_extractor": None} if family == "chroma" else {}
    return cls(**parts, **extra)


#: The Qwen-Image edit pipelines :func:`save_edit` writes.
EDIT_FAMILIES = {"qwen_image_edit": "QwenImageEditPipeline",
                 "qwen_image_edit_plus": "QwenImageEditPlusPipeline"}


def save_edit(name: str, folder: Path, seed: int = 0) -> Path:
    """A tiny whole Qwen-Image edit pipeline (``QwenImageEditPipeline`` or
    ``QwenImageEditPlusPipeline``, see :data:`EDIT_FAMILIES`) saved into ``folder`` as
    the released ones are laid out: a ``processor`` folder with Qwen2-VL's image
    processor config and the tokenizer, which ``model_index.json`` names as a
    ``Qwen2VLProcessor``. (The processor object itself is not built here: transformers
    checks its video processor's class, which needs torchvision.)"""
    import diffusers as d

    folder = Path(folder)
    _, make, sched_cfg, _, _ = DENOISERS["qwen_image"]
    tok = qwen_vl_tokenizer()
    pipe = getattr(d, EDIT_FAMILIES[name])(
        transformer=make(seed), scheduler=d.FlowMatchEulerDiscreteScheduler(**sched_cfg),
        vae=qwen_image_vae(seed), tokenizer=tok, processor=None,
        text_encoder=qwen25_vl_text(24, seed, vocab=len(tok)))
    pipe.save_pretrained(str(folder))
    tok.save_pretrained(str(folder / "processor"))
    qwen_vl_image_processor().save_pretrained(str(folder / "processor"))
    index = json.loads((folder / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def save_full(family: str, folder: Path, seed: int = 0) -> Path:
    """:func:`build_full` saved with ``save_pretrained`` into ``folder``."""
    folder = Path(folder)
    build_full(family, seed).save_pretrained(str(folder))
    return folder


def denoiser_pipeline(family: str, transformer: Any, scheduler: Any) -> Any:
    """The family's real pipeline object holding only ``transformer`` and
    ``scheduler`` (no VAE or text encoder): enough for its ``load_lora_weights``."""
    import diffusers as d

    cls = getattr(d, DENOISERS[family][0])
    names = [n for n in cls.__init__.__code__.co_varnames[1:cls.__init__.__code__.co_argcount]]
    parts = {n: None for n in names}
    parts.update(transformer=transformer, scheduler=scheduler)
    return cls(**parts)


def save_denoiser(family: str, folder: Path, seed: int = 0) -> Path:
    """A pipeline folder of ``family`` with its tiny transformer and its scheduler only
    (``model_index.json`` names the pipeline class and those two parts)."""
    import diffusers as d

    pipe_cls, make, sched_cfg, _, _ = DENOISERS[family]
    folder = Path(folder)
    model = make(seed)
    model.save_pretrained(str(folder / "transformer"))
    scheduler = d.FlowMatchEulerDiscreteScheduler(**sched_cfg)
    scheduler.save_pretrained(str(folder / "scheduler"))  # type: ignore[attr-defined]
    index = {"_class_name": pipe_cls, "_diffusers_version": d.__version__,
             "transformer": ["diffusers", type(model).__name__],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def build(family: str, seed: int = 0) -> Any:
    """A tiny pipeline object of ``family`` (random weights from ``seed``)."""
    import diffusers as d

    if family in ("sd15", "sd2"):
        v = family == "sd2"
        ddpm = d.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                               beta_end=0.012, steps_offset=1, clip_sample=False,
                               prediction_type="v_prediction" if v else "epsilon")
        return d.StableDiffusionPipeline(
            vae=vae(seed=seed), text_encoder=clip_text(32, seed=seed),
            tokenizer=clip_tokenizer(), unet=unet(32, linear_proj=v, seed=seed),
            scheduler=ddpm, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    if family == "sdxl":
        euler = d.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                         beta_end=0.012)
        return d.StableDiffusionXLPipeline(
            vae=vae(scaling_factor=0.13025, seed=seed), text_encoder=clip_text(16, seed=seed),
            text_encoder_2=clip_text(16, projection=16, seed=seed + 1),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
            unet=unet(32, sdxl_pooled=16, linear_proj=True, seed=seed), scheduler=euler)
    if family == "sd3":
        return d.StableDiffusion3Pipeline(
            vae=vae(scaling_factor=1.5305, shift_factor=0.0609, seed=seed),
            text_encoder=clip_text(8, projection=8, seed=seed), tokenizer=clip_tokenizer(),
            text_encoder_2=clip_text(8, projection=8, seed=seed + 1),
            tokenizer_2=clip_tokenizer(), text_encoder_3=t5_text(32, seed=seed),
            tokenizer_3=t5_tokenizer(), transformer=sd3_transformer(seed),
            scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0))
    if family == "flux":
        flow = d.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                 base_shift=0.5, max_shift=1.15)
        return d.FluxPipeline(
            vae=vae(scaling_factor=0.3611, shift_factor=0.1159, seed=seed),
            text_encoder=clip_text(16, seed=seed), tokenizer=clip_tokenizer(),
            text_encoder_2=t5_text(32, seed=seed), tokenizer_2=t5_tokenizer(),
            transformer=flux_transformer(seed), scheduler=flow)
    raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def save(family: str, folder: Path, seed: int = 0) -> Path:
    """Build a tiny ``family`` pipeline and ``save_pretrained`` it into ``folder``."""
    folder = Path(folder)
    build(family, seed).save_pretrained(str(folder))
    return folder


# -- the original (LDM) single-file layout of a UNet -----------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def _block_part(parts: list[str], per: int, blocks: str, first: int) -> str | None:
    """The original name of a resnet or attention of ``down_blocks``/``up_blocks``
    (``parts``: the dotted key split) in ``blocks``, whose block ``i``'s ``j``-th layer
    sits at ``per·i + j + first``; ``None`` for the block's down/upsampler."""
    i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if kind == "resnets":
        return f"{blocks}.{per * i + j + first}.0.{_resnet(rest)}"
    if kind == "attentions":
        return f"{blocks}.{per * i + j + first}.1.{rest}"
    return None


def unet_to_original(state_dict: dict[str, torch.Tensor], config: Any,
                     prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to the original layout
    (``input_blocks`` / ``middle_block`` / ``output_blocks``)."""
    per = int(config["layers_per_block"]) + 1
    ups_with_attn = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        new = None
        for src, dst in _TOP.items():
            if key.startswith(src + "."):
                new = dst + key[len(src):]
        if new is None and parts[0] == "down_blocks":
            i = int(parts[1])
            new = _block_part(parts, per, "input_blocks", 1) or \
                f"input_blocks.{per * (i + 1)}.0.op.{'.'.join(parts[5:])}"  # downsamplers.0.conv
        elif new is None and parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else \
                f"middle_block.1.{rest}"
        elif new is None and parts[0] == "up_blocks":
            i = int(parts[1])
            # the upsampler follows the resnet, and the attention when the block has one
            slot = 2 if i in ups_with_attn else 1
            new = _block_part(parts, per, "output_blocks", 0) or \
                f"output_blocks.{per * i + per - 1}.{slot}.{'.'.join(parts[4:])}"
        if new is None:
            raise KeyError(f"no original-layout name for {key}")
        out[prefix + new] = tensor
    return out


# -- the original (MMDiT) single-file layout of an SD3 transformer ---------------------

#: inside joint block i, besides the adapted modules of ``comfy_names.SD3_BLOCK``: the
#: qk-norms (diffusers module -> original module)
_SD3_NORMS = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q",
              "attn.norm_added_k": "context_block.attn.ln_k",
              "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}


def _halves_swapped(tensor: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0: diffusers' AdaLayerNormContinuous reads (scale,
    shift) where the original stores (shift, scale). Its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_to_original(state_dict: dict[str, torch.Tensor],
                    prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """Rename a diffusers SD3Transformer2DModel state dict to the original MMDiT layout
    (``joint_blocks.<i>.x_block`` / ``context_block``, fused ``qkv``, ``final_layer``),
    the layout SD3/3.5 single files use. Covers SD3.5's qk-norm and dual attention."""
    from loraengine.plugins.models.comfy_names import SD3_BLOCK, SD3_FUSED, SD3_TOP

    src = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    blocks = sorted({int(k.split(".")[1]) for k in src if k.startswith("transformer_blocks.")})
    last = blocks[-1] if blocks else -1

    def take(key: str) -> torch.Tensor:
        try:
            return src.pop(key)
        except KeyError:
            raise KeyError(f"{key} is missing from the SD3 state dict") from None

    out["pos_embed"] = take("pos_embed.pos_embed")
    for old, new in SD3_TOP.items():
        for kind in ("weight", "bias"):
            out[f"{new}.{kind}"] = take(f"{old}.{kind}")
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _halves_swapped(
            take(f"norm_out.linear.{kind}"))
    for i in blocks:
        here, there = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for fused, parts in SD3_FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"{here}{part}.{kind}" for part in parts]
                if all(n in src for n in names):
                    out[f"{there}{fused}.{kind}"] = torch.cat([src.pop(n) for n in names])
        for old, new in (_SD3_NORMS | SD3_BLOCK).items():
            for kind in ("weight", "bias"):
                key = f"{here}{old}.{kind}"
                if key not in src:
                    continue
                tensor = src.pop(key)
                if i == last and old == "norm1_context.linear":
                    tensor = _halves_swapped(tensor)  # the last block's context is pre-only
                out[f"{there}{new}.{kind}"] = tensor
    if src:
        raise KeyError(f"no original-layout name for {sorted(src)}")
    return {prefix + k: v for k, v in out.items()}


# -- a small image folder ------------------------------------------------------------

def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0,
                 captions: bool = True) -> list[Path]:
    """PNG images of the given (width, height) — smooth colour gradients with a bright
    square, different per image — each with ``NAME.txt`` holding its caption."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        ys = torch.linspace(0, 1, h)[:, None, None]
        xs = torch.linspace(0, 1, w)[None, :, None]
        colour = torch.rand(2, 3, generator=g)
        img = colour[0] * xs + colour[1] * ys
        top, left = int(torch.randint(0, max(1, h // 2), (), generator=g)), \
            int(torch.randint(0, max(1, w // 2), (), generator=g))
        img[top:top + h // 3, left:left + w // 3] = 1.0
        data = (img.clamp(0, 1) * 255).to(torch.uint8).numpy()
        path = folder / f"image_{i:02d}.png"
        Image.fromarray(data, "RGB").save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"picture {i} of a square", encoding="utf-8")
        paths.append(path)
    return paths


def fixed_draw_loss(pipe: Any, seed: int = 11, levels: tuple[float, ...] = (0.2, 0.5, 0.8)
                    ) -> float:
    """A built pipeline's mean loss over its whole data set at fixed noise (``seed``) and
    fixed noise levels spread over the schedule (σ for flow models, the same fraction of
    the timesteps for DDPM ones): the number "the loss fell" tests compare with the
    adapter on and off (``pipe.network.set_multiplier(0.0)``)."""
    sched = pipe.loaded.schedule
    g = torch.Generator().manual_seed(seed)
    x0, cond = pipe.dataset.batch(torch.arange(len(pipe.dataset)))
    x0 = x0.float()
    total = 0.0
    for level in levels:
        noise = torch.randn(x0.shape, generator=g)
        if sched.is_flow:
            t = torch.full((x0.shape[0],), level, dtype=torch.float64)
        else:
            t = torch.full((x0.shape[0],), int(level * (sched.num_timesteps - 1)))
        with torch.no_grad():
            pred = pipe.loaded.predict(pipe.model, sched.add_noise(x0, noise, t),
                                       sched.model_timesteps(t), cond)
        total += float(((pred.float() - sched.target(x0, noise, t)) ** 2).mean())
    return total / len(levels)
