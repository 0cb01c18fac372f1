"""Built-in key formats of LoRA files.

- ``kohya``: ``lora_unet_<path with . as _>.<param>`` — ComfyUI, A1111/Forge and
  diffusers' ``load_lora_weights`` read it. For SDXL the path is the original (SAI)
  name, ``lora_unet_input_blocks_4_1_...``, as sd-scripts writes SDXL files; for FLUX.1
  and SD3 the original model's (``lora_unet_double_blocks_0_img_attn_qkv``), q/k/v
  fused, as sd-scripts writes them.
- ``comfyui``: ``diffusion_model.<path>.<param>`` — ComfyUI's own trained files; for a
  UNet the path is the checkpoint's (``diffusion_model.input_blocks.1.1.proj_in``).

Reading, every format also takes the other layouts the model's family names its layers
in (``ExporterSpec.layouts`` / ``ModelFamilySpec.layouts``), so a file in either naming
loads on the diffusers model.
- ``diffusers`` (alias ``peft``): ``<unet|transformer>.<path>.lora_A.weight`` — what
  diffusers' ``load_lora_weights`` and ComfyUI read for transformer models. For Flux.2,
  Lumina 2 and LTX-2 (``BOTH_READ``, where the file fits the rule) it is
  ``diffusion_model.<ComfyUI's name>.lora_A.weight`` instead, which the model's diffusers
  loader converts and ComfyUI reads whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

import torch

from loraengine.core.files import PEFT_MAGNITUDE
from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.plugins.specs import ExporterSpec
from loraengine.plugins.adapters.dora import NORM_KEY
from loraengine.plugins.models import comfy_names
from loraengine.plugins.models.unet_names import BLOCK_ROOTS, LDM, SAI, TOP_LEVEL

Modules = Mapping[str, Mapping[str, torch.Tensor]]


def _split_by_paths(rest: str, paths: set[str]) -> tuple[str, str] | None:
    parts = rest.split(".")
    for i in range(len(parts) - 1, 0, -1):
        cand = ".".join(parts[:i])
        if cand in paths:
            return cand, ".".join(parts[i:])
    return None


def _split_unknown(rest: str) -> tuple[str, str]:
    """(module, param) of a key whose module is no path of the model: the parameter is
    the last name, or the last two where they are a LoRA matrix (``lora_up.weight``)."""
    parts = rest.split(".")
    cut = 2 if len(parts) > 2 and parts[-2].startswith("lora_") and \
        parts[-1] in ("weight", "bias") else 1
    return ".".join(parts[:-cut]), ".".join(parts[-cut:])


#: a norm layer's channel deltas under LyCORIS's names (``diff`` -> ``w_norm``)
NORM_NAMES = {"diff": "w_norm", "diff_b": "b_norm"}


def norm_deltas_as_lycoris(params: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A module holding only a norm layer's deltas (a 1-D ``diff``, with or without
    ``diff_b``) under the names LyCORIS's and A1111's norm modules read, ``w_norm`` /
    ``b_norm`` (ComfyUI and Forge read them too); any other module as it is. The reader
    (``core.files.standard_names``) takes them back to ``diff`` / ``diff_b``."""
    diff = params.get("diff")
    if diff is None or diff.ndim != 1 or not set(params) <= set(NORM_NAMES):
        return params
    return {NORM_NAMES[k]: v for k, v in params.items()}


def lokr_without_tucker(params: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A LoKr module with a Tucker core (``lokr_t2`` + ``lokr_w2_a``/``lokr_w2_b``) with
    its large factor written whole, ``lokr_w2``, which every LoKr reader reads (Forge's
    Tucker path fails on a convolution). The same ΔW: where the small factor is whole
    too, no factor is low rank and readers then apply no alpha/rank, so the scale moves
    into ``lokr_w1`` and ``alpha`` goes; any other module as it is."""
    t2 = params.get("lokr_t2")
    if t2 is None or "lokr_w2_a" not in params or "lokr_w2_b" not in params:
        return params
    from loraengine.plugins.adapters.common import tucker

    w2_a, w2_b = params["lokr_w2_a"], params["lokr_w2_b"]
    out = {k: v for k, v in params.items() if k not in ("lokr_t2", "lokr_w2_a", "lokr_w2_b")}
    out["lokr_w2"] = tucker(t2.float(), w2_a.float(), w2_b.float()).to(w2_a.dtype).contiguous()
    if "lokr_w1" in out:
        rank = int(w2_b.shape[0])
        scale = float(out.pop("alpha")) / rank if "alpha" in out else 1.0
        out["lokr_w1"] = (out["lokr_w1"].float() * scale).to(out["lokr_w1"].dtype)
    return out


class PrefixedFormat:
    """``<prefix><path>.<param>`` where ``path`` may be rewritten by ``encode``;
    ``norm_names``: norm deltas as ``w_norm``/``b_norm`` (``norm_deltas_as_lycoris``);
    ``whole_lokr``: LoKr's Tucker core written out (``lokr_without_tucker``).
    ``comfy_lokr``: a 3-D convolution's LoKr factors as ComfyUI computes them right
    (``comfy_names.lokr_kernel_flattened``)."""

    def __init__(self, name: str, prefix: str, underscore: bool, norm_names: bool = False,
                 whole_lokr: bool = False, comfy_lokr: bool = False):
        self.name, self.prefix, self.underscore = name, prefix, underscore
        self.norm_names, self.whole_lokr, self.comfy_lokr = norm_names, whole_lokr, comfy_lokr

    def encode(self, path: str) -> str:
        return self.prefix + (path.replace(".", "_") if self.underscore else path)

    def to_file(self, modules: Modules) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        fused: dict[str, list] = {}
        for path, params in modules.items():
            if self.whole_lokr:
                params = lokr_without_tucker(params)
            native, band = comfy_names.parse(path)
            if band == comfy_names.SWAP and not comfy_names.swappable(params):
                # no form with the halves swapped: under its own (diffusers) name
                native = comfy_names.own_path(path)
            elif band == comfy_names.SWAP:
                params = comfy_names.swapped(params, path)
            elif band is not None:
                fused.setdefault(native, []).append((band, path, params))
                continue
            stem = self.encode(native)
            if self.norm_names:
                params = norm_deltas_as_lycoris(params)
            if self.comfy_lokr:
                params = comfy_names.lokr_kernel_flattened(params)
            for param, tensor in params.items():
                out[f"{stem}.{param}"] = tensor
        for native, parts in fused.items():
            if not all(comfy_names.fusable(p) for _, _, p in parts):
                # no ComfyUI form: each part under its own (diffusers) name, as trained
                for _, name, params in parts:
                    stem = self.encode(comfy_names.own_path(name))
                    for param, tensor in params.items():
                        out[f"{stem}.{param}"] = tensor
                continue
            stem = self.encode(native)
            for param, tensor in comfy_names.fuse(parts, native).items():
                out[f"{stem}.{param}"] = tensor
        return out

    def from_file(self, tensors: Mapping[str, torch.Tensor], module_paths: Iterable[str]
                  ) -> dict[str, dict[str, torch.Tensor]] | None:
        keys = [k for k in tensors if k.startswith(self.prefix)]
        if not keys:
            return None
        paths = set(module_paths)
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        # layout names that are a band of a fused module, or its rows swapped: the
        # file holds the fused (or swapped) module under its own name
        bands: dict[str, list[tuple[str, tuple[int, int, int]]]] = {}
        for name in list(paths):
            native, band = comfy_names.parse(name)
            if isinstance(band, tuple):
                bands.setdefault(native, []).append((name, band))
            elif band is not None:
                paths.add(native)
        swapped = {comfy_names.parse(n)[0]: n for n in paths
                   if comfy_names.parse(n)[1] == comfy_names.SWAP}
        whole: dict[str, dict[str, torch.Tensor]] = {}
        by_stem = {self.encode(p): p for p in paths | set(bands)} if self.underscore \
            else {}
        for key in keys:
            if self.underscore:
                stem, _, param = key.partition(".")
                module = by_stem.get(stem, stem)
            else:
                rest = key[len(self.prefix):]
                found = _split_by_paths(rest, paths | set(bands))
                module, param = found if found else _split_unknown(rest)
                param = OURS.get(param, param)  # lora_A/lora_B (flux2_native_file)
            target = whole if module in bands or module in swapped else grouped
            target.setdefault(module, {})[param] = tensors[key]
        for native, params in whole.items():
            if native in swapped:
                grouped[swapped[native]] = comfy_names.swapped(params, native)
                continue
            for name, band in bands[native]:
                part = comfy_names.split(params, band, native)
                if part:
                    grouped[name] = part
        return grouped

    def spec(self, description: str, layouts: tuple[str, ...] = (), limits=None
             ) -> ExporterSpec:
        return ExporterSpec(self.name, self.to_file, self.from_file, description, layouts,
                            limits)


#: kohya files are read by sd-scripts' LyCORIS and by A1111, whose norm modules read
#: ``w_norm``/``b_norm`` only; ComfyUI's own files keep TrainLoraNode's ``diff``.
KOHYA = PrefixedFormat("kohya", "lora_unet_", underscore=True, norm_names=True)
#: ComfyUI's LoKr fails on a Tucker core over a convolution (``view`` of a non-contiguous
#: product, comfy/weight_adapter/lokr.py at a125cd8): its files hold the factor whole,
#: and a 3-D convolution's large factor as a matrix.
COMFYUI = PrefixedFormat("comfyui", "diffusion_model.", underscore=False, whole_lokr=True,
                         comfy_lokr=True)
#: Module layouts each format writes where the model has them (``unet_names``):
#: ComfyUI's own files name a UNet's layers as its checkpoints do (``input_blocks.*``);
#: sd-scripts does so for SDXL only, and writes diffusers' names for SD1.x/2.x; for
#: FLUX.1 and SD3 it writes its own models' (the original checkpoints') names, fused
#: q/k/v included (``lora_unet_double_blocks_0_img_attn_qkv``).
COMFYUI_LAYOUTS = (LDM, comfy_names.LAYOUT)
KOHYA_LAYOUTS = (SAI, comfy_names.SDSCRIPTS)

#: Top-level modules of a diffusers UNet2DConditionModel: their files say ``unet.``.
UNET_ROOTS = frozenset({"down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out",
                        "conv_norm_out", "time_embedding", "add_embedding",
                        "class_embedding", "encoder_hid_proj"})
#: LoRA parameter names: ours (kohya's) -> PEFT's.
PEFT_NAMES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
OURS = {v: k for k, v in PEFT_NAMES.items()}


def peft_magnitude(dora_scale: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """A LoRA module's ``dora_scale`` in PEFT's layout, or None when PEFT cannot hold it.

    PEFT keeps one magnitude per output channel, ``[out]`` for a Linear and
    ``[1, out, 1, ...]`` for a convolution (``up`` is ``lora_up``, ``[out, r(, 1…)]``).
    A ``dora_scale`` per input column (older LyCORIS files, ``[1, in, ...]``) has no
    PEFT form."""
    out = int(up.shape[0])
    # the rule the DoRA loader reads a dora_scale's axis by
    if dora_scale.numel() != out or (dora_scale.ndim > 1 and dora_scale.shape[0] != out):
        return None
    flat = dora_scale.reshape(-1)
    return flat if up.ndim == 2 else flat.reshape(1, out, *([1] * (up.ndim - 2)))


#: LoKr's tensors (LyCORIS names, which diffusers' LoKr loader keeps)
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def peft_lokr(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A LoKr module as diffusers' LoKr loader reads it (``load_lora_adapter`` builds a
    PEFT ``LoKrConfig`` with α = r from the factors' shapes), or None when the module is
    not a LoKr PEFT can hold (a Tucker core or a DoRA magnitude; other algorithms).

    PEFT's scale is then 1, so LoKr's own scale (α/r when a factor is low rank, else 1,
    r the low-rank factors' inner size) is folded into the small factor ``w1`` (or
    ``w1_a``) and no ``alpha`` is written: diffusers' own conversion of LyCORIS files
    does the same."""
    if not set(params) <= {*LOKR_FACTORS, "alpha"} or \
            not {"lokr_w1", "lokr_w1_a"} & set(params):
        return None
    out = {k: v for k, v in params.items() if k != "alpha"}
    low = params.get("lokr_w2_b", params.get("lokr_w1_b"))
    if low is not None and "alpha" in params:
        scale = float(params["alpha"]) / int(low.shape[0])
        key = "lokr_w1" if "lokr_w1" in out else "lokr_w1_a"
        out[key] = (out[key].float() * scale).to(out[key].dtype)
    return out


class PeftFormat:
    """diffusers/PEFT keys: ``<unet|transformer>.<path>.lora_A.weight`` / ``lora_B``.

    PEFT keeps no per-module alpha in the weights (a loader assumes α = r unless told
    otherwise), so a LoRA's scale α/r is folded into ``lora_B`` on writing: every PEFT
    reader then builds the same ΔW. A LoRA's DoRA magnitude is written as PEFT's
    ``lora_magnitude_vector`` (see ``peft_magnitude``); other algorithms keep their own
    parameter names. The reader (``core.files``) takes either magnitude name back.
    """

    prefixes = ("unet.", "transformer.")

    def __init__(self, name: str):
        self.name = name

    @staticmethod
    def prefix_for(paths: Iterable[str]) -> str:
        roots = {p.split(".", 1)[0] for p in paths}
        return "unet." if roots and roots <= UNET_ROOTS else "transformer."

    def to_file(self, modules: Modules) -> dict[str, torch.Tensor]:
        if both_read_rule(modules) is not None:
            return both_read_file(modules)
        prefix = self.prefix_for(modules)
        out: dict[str, torch.Tensor] = {}
        for path, params in modules.items():
            stem = f"{prefix}{path}"
            if "lora_down.weight" in params and "lora_up.weight" in params:
                down, up = params["lora_down.weight"], params["lora_up.weight"]
                rank = int(down.shape[0])
                alpha = float(params["alpha"]) if "alpha" in params else float(rank)
                out[f"{stem}.lora_A.weight"] = down
                out[f"{stem}.lora_B.weight"] = (up.float() * (alpha / rank)).to(up.dtype)
                rest = {k: v for k, v in params.items() if k not in PEFT_NAMES and
                        k != "alpha"}
                magnitude = peft_magnitude(rest["dora_scale"], up) if "dora_scale" in rest \
                    else None
                if magnitude is not None:
                    out[f"{stem}.{PEFT_MAGNITUDE}"] = magnitude
                    del rest["dora_scale"]
            elif peft_lokr(params) is not None:
                rest = peft_lokr(params) or {}
            else:
                rest = dict(params)
            for param, tensor in rest.items():
                out[f"{stem}.{param}"] = tensor
        return out

    def from_file(self, tensors: Mapping[str, torch.Tensor], module_paths: Iterable[str]
                  ) -> dict[str, dict[str, torch.Tensor]] | None:
        keys = [k for k in tensors if k.startswith(self.prefixes)]
        if not keys:
            return None
        paths = set(module_paths)
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key in keys:
            rest = key.split(".", 1)[1]
            found = _split_by_paths(rest, paths)
            if found is None:
                tail = next((n for n in (*OURS, *PEFT_NAMES) if rest.endswith("." + n)),
                            None)
                if tail:
                    found = rest[:-len(tail) - 1], tail
                else:
                    stem, _, last = rest.rpartition(".")
                    found = stem, last
            module, param = found
            grouped.setdefault(module, {})[OURS.get(param, param)] = tensors[key]
        return grouped

    def spec(self, description: str, limits=None) -> ExporterSpec:
        return ExporterSpec(self.name, self.to_file, self.from_file, description, (),
                            limits)


DIFFUSERS = PeftFormat("diffusers")
PEFT = PeftFormat("peft")

#: diffusers' names of the layers Flux.2 renamed from FLUX.1's (ComfyUI's FLUX.1 map of
#: diffusers' names lacks them)
_FLUX2_RENAMED_PATTERN = (
    r"(\.ff(_context)?\.linear_(in|out)$|^single_transformer_blocks\.\d+\.attn\."
    r"(to_qkv_mlp_proj|to_out)$|^time_guidance_embed\.|^double_stream_modulation_"
    r"|^single_stream_modulation)")

#: a module in the layout both a diffusers converter and ComfyUI read
#: (``flux2_native_file``): plain LoRA, plain LoHa, LoKr (as ``peft_lokr`` writes it)
_PLAIN_LORA = frozenset({"lora_down.weight", "lora_up.weight", "alpha"})
_PLAIN_LOHA = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"})


def _native_kind(params: Collection[str]) -> str | None:
    keys = set(params)
    if keys <= _PLAIN_LORA and {"lora_down.weight", "lora_up.weight"} <= keys:
        return "lora"
    if keys <= _PLAIN_LOHA and _PLAIN_LOHA - {"alpha"} <= keys:
        return "loha"
    if keys <= {*LOKR_FACTORS, "alpha"} and {"lokr_w1", "lokr_w1_a"} & keys:
        return "lokr"
    return None


def _rows(value: object) -> int:
    """Output rows of a tensor, or of a shape (``limits`` hands shapes over)."""
    shape = getattr(value, "shape", value)
    return int(shape[0]) if isinstance(shape, (tuple, list, torch.Size)) and shape else 0


def _module_rows(params: Collection[str] | Mapping[str, object]) -> int:
    """A LoRA/LoHa module's output rows where its tensors (or shapes) are given, else
    0; LoKr's are never a band (see the rules), 1."""
    if not isinstance(params, Mapping):
        return 0
    for key in ("lora_up.weight", "hada_w1_a"):
        if key in params:
            return _rows(params[key])
    return 1


FileModules = Mapping[str, Collection[str] | Mapping[str, object]]


@dataclass(frozen=True)
class BothReadRule:
    """How one model's default (``diffusers``) file is written so that its diffusers
    pipeline's ``load_lora_weights`` (through that pipeline's converter of
    ``diffusion_model.*`` files) and ComfyUI's loader both read it whole: in ComfyUI's
    names (``native``: a diffusers path and its output rows -> the layout name, a band
    of a fused layer included; None where the converter has no name for it), LoRA as
    ``lora_A``/``lora_B`` with α/r in ``lora_B`` and no ``alpha`` (no converter keeps
    ``alpha``), LoKr as ``peft_lokr`` writes it.

    ``marks``: a pattern only this model's diffusers names match (a file is this model's
    where one of its modules does); ``kinds``: the algorithms the converter takes
    (``_native_kind``), one per file; ``fits``: what else the converter needs of the
    whole file (module names -> tensor names, or tensors/shapes where known)."""

    model: str
    marks: re.Pattern[str]
    kinds: frozenset[str]
    native: Callable[[str, int], str | None]
    fits: Callable[[FileModules, str], bool] = lambda modules, kind: True


def _flux2_fits(modules: FileModules, kind: str) -> bool:
    """LoKr not on a q/k/v projection (a Kronecker product does not fuse into ComfyUI's
    ``qkv``, and diffusers' converter maps such a file's ``qkv`` onto a fused
    projection)."""
    return kind != "lokr" or not any(
        comfy_names.parse(comfy_names.flux2_native(p, 1) or "")[1] is not None
        for p in modules)


#: a Lumina 2 block's layers diffusers' converter takes, all of them (it pops each);
#: a context-refiner block has no modulation
_LUMINA2_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                  "feed_forward.linear_1", "feed_forward.linear_2", "feed_forward.linear_3",
                  "norm1.linear")


def _lumina2_fits(modules: FileModules, kind: str) -> bool:
    """diffusers 0.42.1's Lumina 2 converter takes whole blocks only: in each of
    ``noise_refiner``/``context_refiner``/``layers`` that the file has, blocks 0..n-1
    each with every layer of ``_LUMINA2_BLOCK`` (no ``norm1.linear`` in a context
    refiner), and nothing else (it fails on a key left over); the q/k/v rows are
    checked by ``comfy_names.lumina2_native``."""
    blocks: dict[str, set[int]] = {}
    for path in modules:
        container, index, _ = path.split(".", 2)
        blocks.setdefault(container, set()).add(int(index))
    for container, found in blocks.items():
        if found != set(range(len(found))):
            return False
        want = _LUMINA2_BLOCK[:-1] if container == "context_refiner" else _LUMINA2_BLOCK
        for n in found:
            if any(f"{container}.{n}.{rest}" not in modules for rest in want):
                return False
    return True


#: LTX-2's self-attention (``attn1``: FLUX.1's, SD3's and HunyuanVideo's are ``attn``, and
#: SD3.5's second one ``attn2``; of loraengine's families only LTX-2 has it) and its
#: audio stream
_LTX2_NAMES = re.compile(r"^transformer_blocks\.\d+\.(attn1|audio_(attn[12]|ff)|"
                         r"(audio_to_video|video_to_audio)_attn)\.")
#: the models whose default file both their diffusers pipeline and ComfyUI read
BOTH_READ: tuple[BothReadRule, ...] = (
    # the released checkpoint's names (double_blocks.*, q/k/v fused); no
    # norm_out.linear, which diffusers' Flux.2 LoRA converter places without swapping
    # its (shift, scale) halves, where ComfyUI and diffusers' checkpoint converter swap
    # them (flux2_native names it #swap: no file gives both that layer)
    BothReadRule("Flux.2", re.compile(_FLUX2_RENAMED_PATTERN), frozenset({"lora", "loha",
                                                                          "lokr"}),
                 comfy_names.flux2_native, _flux2_fits),
    # ComfyUI's NextDiT names (attention.qkv fused; _convert_non_diffusers_lumina2_...)
    BothReadRule("Lumina 2", re.compile(r"^(noise_refiner|context_refiner|layers)\.\d+\."
                                        r"(attn\.to_|feed_forward\.linear_)"),
                 frozenset({"lora"}), comfy_names.lumina2_native, _lumina2_fits),
    # the original checkpoint's names, which _convert_non_diffusers_ltx2_... renames
    # back for every layer of the model; LoRA only (load_lora_weights takes keys
    # naming lora_ only, so no LoKr and no alpha)
    BothReadRule("LTX-2", _LTX2_NAMES, frozenset({"lora"}),
                 lambda path, rows: comfy_names.ltx2_name(path)),
)


def both_read_rule(modules: FileModules) -> BothReadRule | None:
    """The rule (``BOTH_READ``) under which a file of these modules (diffusers paths ->
    their tensor names, or tensors/shapes) is written in a layout both its diffusers
    pipeline and ComfyUI read whole, or None where there is none: another model, more
    than one algorithm or one the converter does not take (DoRA, norm deltas, ...), a
    layer the converter has no name for, a layer ComfyUI stores with its halves
    swapped, or a file the converter does not take whole (``fits``). Flux.2 also where
    ComfyUI would read it in diffusers' names: it lacks the layers Flux.2 renamed."""
    rule = next((r for r in BOTH_READ if any(r.marks.search(p) for p in modules)), None)
    if rule is None:
        return None
    kinds = {_native_kind(params) for params in modules.values()}
    if len(kinds) != 1 or not kinds <= rule.kinds:
        return None
    (kind,) = kinds
    for path, params in modules.items():
        rows = _module_rows(params)
        if not rows and rule.model == "Lumina 2":
            return None  # names only: the q/k/v rows are unknown
        name = rule.native(path, rows or 1)
        if name is None or comfy_names.parse(name)[1] == comfy_names.SWAP:
            return None
    return rule if rule.fits(modules, str(kind)) else None


def flux2_both_read(modules: FileModules) -> bool:
    """Whether ``both_read_rule`` writes a file of these modules as a Flux.2 one."""
    rule = both_read_rule(modules)
    return rule is not None and rule.model == "Flux.2"


def both_read_file(modules: Modules, rule: BothReadRule | None = None
                   ) -> dict[str, torch.Tensor]:
    """A file of ``both_read_rule`` modules as ``diffusion_model.<ComfyUI's name>``,
    fused layers (q/k/v into ``qkv``) fused as the ``comfyui`` format fuses them, with
    LoRA as ``lora_A``/``lora_B`` and its α/r folded into ``lora_B`` (no ``alpha``), LoKr
    as ``peft_lokr`` writes it (scale in the small factor).

    diffusers 0.42.1's converters (``_convert_non_diffusers_flux2_lora_to_diffusers`` /
    ``..._lokr_...``, ``..._lumina2_...``, ``..._ltx2_...``) map every key back (no
    ``alpha`` taken); a ``qkv`` LoRA gives each of q/k/v the whole stacked ``lora_A``
    and its band of the block-diagonal ``lora_B``, the same ΔW. ComfyUI reads
    ``lora_A``/``lora_B`` under its own names, with scale 1 where there is no
    ``alpha``."""
    rule = rule or both_read_rule(modules)
    assert rule is not None
    native: dict[str, Mapping[str, torch.Tensor]] = {}
    for path, params in modules.items():
        rows = _module_rows(params)
        if "lora_up.weight" not in params and "hada_w1_a" not in params:
            params = peft_lokr(params) or params
        name = rule.native(path, rows)
        assert name is not None
        native[name] = params
    out: dict[str, torch.Tensor] = {}
    tensors = COMFYUI.to_file(native)
    for key, tensor in tensors.items():
        stem, _, param = key.partition(".lora_")
        if param == "up.weight":
            down = tensors[f"{stem}.lora_down.weight"]
            rank = int(down.shape[0])
            alpha = float(tensors[f"{stem}.alpha"]) if f"{stem}.alpha" in tensors \
                else float(rank)
            out[f"{stem}.lora_B.weight"] = (tensor.float() * (alpha / rank)).to(tensor.dtype)
        elif param == "down.weight":
            out[f"{stem}.lora_A.weight"] = tensor
        elif key.endswith(".alpha") and f"{key[:-len('.alpha')]}.lora_down.weight" in tensors:
            continue
        else:
            out[key] = tensor
    return out


def flux2_native_file(modules: Modules) -> dict[str, torch.Tensor]:
    """``both_read_file`` under Flux.2's rule (whether or not the file fits it whole)."""
    return both_read_file(modules, BOTH_READ[0])


#: a LoRA module's tensors, as every LoRA reader knows them
LORA_PARAMS = frozenset({"lora_down.weight", "lora_up.weight", "alpha", "dora_scale",
                         "diff", "diff_b"})


def _count(modules: Mapping[str, tuple[str, Collection[str]]], test) -> int:
    return sum(1 for algorithm, params in modules.values() if test(algorithm, set(params)))


def dora_norm(metadata: Mapping[str, str] | None) -> str:
    """The DoRA norm a file's metadata records (``weight_decompose_norm``): ``standard``
    where it records none."""
    return (metadata or {}).get(NORM_KEY, "standard")


#: what ComfyUI's loader does differently from loraengine with any file it reads, per
#: module (checked against comfy/weight_adapter at a125cd8,
#: tests/fixtures/interop/make_comfyui_matrix_fixtures.py); the DoRA rule holds for the
#: standard norm only (``weight_decompose_norm: comfyui`` trains ComfyUI's)
COMFYUI_RULES: tuple[tuple[str, Callable[[str, Collection[str]], bool]], ...] = (
    ("ComfyUI has no IA3; these layers are not applied there", lambda a, p: a == "ia3"),
    ("ComfyUI's DoRA divides by the norm of W, not of W + ΔW (train with "
     "adapter.weight_decompose_norm: comfyui to match it)",
     lambda a, p: "dora_scale" in p),
    ("ComfyUI loads OFT's rescale and never applies it", lambda a, p: "rescale" in p))


def _comfyui_rules(modules: Mapping[str, tuple[str, Collection[str]]],
                   metadata: Mapping[str, str] | None = None) -> list[str]:
    standard = dora_norm(metadata) == "standard"
    out = []
    for text, test in COMFYUI_RULES:
        if not standard and text.startswith("ComfyUI's DoRA"):
            continue
        n = _count(modules, test)
        if n:
            out.append(f"{text} ({n} layer(s); loraengine convert --model measures it)")
    return out


def comfyui_limits(modules: Mapping[str, tuple[str, Collection[str]]],
                   metadata: Mapping[str, str] | None = None) -> list[str]:
    """What ComfyUI's loader cannot express (checked against comfy/weight_adapter); a
    file trained with ``weight_decompose_norm: comfyui`` (its ``metadata``) has DoRA as
    ComfyUI computes it."""
    return (_comfyui_rules(modules, metadata) + comfyui_fused_limits(modules)
            + forge_limits(modules, "comfyui", metadata))


def unfused_modules(modules: Mapping[str, tuple[str, Collection[str]]]) -> list[str]:
    """The layout names (``comfy_names``) of modules that the ``comfyui``/``kohya``
    writer keeps under diffusers' names and ComfyUI does not read under them: parts of a
    fused layer whose algorithm does not fuse, and modulations stored with halves
    swapped whose algorithm does not swap; sorted."""
    out = []
    for name, (_, params) in modules.items():
        band = comfy_names.parse(name)[1]
        if (isinstance(band, tuple) and not comfy_names.fusable(params)
                and not comfy_names.read_by_own_name(name)) or \
                (band == comfy_names.SWAP and not comfy_names.swappable(params)):
            out.append(name)
    return sorted(out)


def comfyui_fused_limits(modules: Mapping[str, tuple[str, Collection[str]]]) -> list[str]:
    """ComfyUI's lines for ``unfused_modules``: parts of a layer it fuses, and layers it
    stores with swapped halves, that keep diffusers' names; none where there are none."""
    kept = unfused_modules(modules)
    fused = [n for n in kept if isinstance(comfy_names.parse(n)[1], tuple)]
    unswapped = [n for n in kept if comfy_names.parse(n)[1] == comfy_names.SWAP]
    out = []
    if fused:
        out.append(f"ComfyUI's model fuses q/k/v (and FLUX.1's single-block MLP input) into "
                   f"one layer, and only LoRA, LoHa and full ΔW fuse exactly: {len(fused)} "
                   f"layer(s) are written under diffusers' names, which ComfyUI does not "
                   f"load (e.g. {comfy_names.own_path(fused[0])}); the diffusers exporter "
                   f"is read by ComfyUI for FLUX.1 and SD3")
    if unswapped:
        out.append(f"ComfyUI stores the final modulation of FLUX.1 and SD3 (and SD3's last "
                   f"context modulation) with its two halves swapped, and BOFT (or OFT with "
                   f"an odd block count, LoKr with an odd small factor) has no such form: "
                   f"{len(unswapped)} layer(s) are written under diffusers' names, which "
                   f"ComfyUI does not load (e.g. {comfy_names.own_path(unswapped[0])})")
    return out


#: diffusers' layer names ComfyUI's loader has no key for (checked with ComfyUI 0.8.0,
#: tests/fixtures/interop/make_comfyui_transformer_fixtures.py): (model, a pattern only
#: its names match, the pattern of the names ComfyUI does not read (None: all of the
#: file's), what ComfyUI does)
_FLUX2_RENAMED = re.compile(_FLUX2_RENAMED_PATTERN)
_CHROMA_APPROXIMATOR = re.compile(r"^distilled_guidance_layer\.")
COMFYUI_UNREAD_DIFFUSERS: tuple[tuple[str, re.Pattern[str], re.Pattern[str] | None, str],
                                ...] = (
    ("Flux.2", _FLUX2_RENAMED, _FLUX2_RENAMED,
     "reads Flux.2's diffusers names through its FLUX.1 map, which lacks the layers "
     "Flux.2 renamed (the diffusers exporter writes the released names both read for "
     "LoRA, LoHa, and LoKr off q/k/v, without norm_out.linear)"),
    ("Chroma", _CHROMA_APPROXIMATOR, _CHROMA_APPROXIMATOR,
     "has no diffusers names for Chroma's modulation approximator"),
    ("Lumina 2", re.compile(r"^(time_caption_embed\.|(layers|noise_refiner|context_refiner)"
                            r"\.\d+\.(attn\.|feed_forward\.linear_|norm1\.linear$))"), None,
     "reads no diffusers names for Lumina 2 (the diffusers exporter writes ComfyUI's "
     "names, which both read, for LoRA on whole blocks of the released model's size)"),
    ("LTX-2", _LTX2_NAMES, None,
     "reads no diffusers names for LTX-2 (the diffusers exporter writes the original "
     "names, which both read, for LoRA)"))


#: models (by ``ss_base_model_version``) whose diffusers names ComfyUI 0.8.0 maps none
#: of, whose layers are named as other models' are (HunyuanVideo 1.5's as SD3's): its
#: loader reads their own names only (comfy/lora.py; measured in
#: tests/test_interop_comfyui_video.py)
COMFYUI_NO_DIFFUSERS_MAP = {"wan": "Wan", "hunyuan_video15": "HunyuanVideo 1.5"}


def comfyui_unread(modules: Iterable[str], metadata: Mapping[str, str] | None = None
                   ) -> list[str]:
    """What ComfyUI does not load of a file in diffusers' names (module paths): one
    line per model whose names ComfyUI lacks, known by the names or by the model the
    ``metadata`` says the file is for."""
    names = list(modules)
    out = []
    for model, marks, unread, what in COMFYUI_UNREAD_DIFFUSERS:
        if not any(marks.search(n) for n in names):
            continue
        hit = sorted(n for n in names if unread is None or unread.search(n))
        out.append(f"ComfyUI {what}: {len(hit)} layer(s) of this {model} file are not "
                   f"loaded there (e.g. {hit[0]}); the comfyui exporter is, with every "
                   f"layer")
    base = (metadata or {}).get("ss_base_model_version", "").split(":")[0]
    unmapped = COMFYUI_NO_DIFFUSERS_MAP.get(base)
    if unmapped and names and not out:
        out.append(f"ComfyUI reads no diffusers names for {unmapped}: {len(names)} "
                   f"layer(s) of this {unmapped} file are not loaded there (e.g. "
                   f"{sorted(names)[0]}); the comfyui exporter is, with every layer")
    return out


#: attention q/k RMSNorms of FLUX.1/SD3 (diffusers' names): the original models call
#: their weight ``scale``, which no kohya/ComfyUI-name key map of Forge reaches
QK_NORM = re.compile(r"(^|\.)attn\.norm_(added_)?[qk]$")
#: the same norms under the original FLUX.1 names (ComfyUI's, which the ``comfyui`` and
#: sd-scripts layouts give them: ``….norm.query_norm.scale``): Forge's and LyCORIS's
#: readers of kohya names have no layer for those either (a ``.scale`` is not a weight)
QK_NORM_NATIVE = re.compile(r"(^|\.)norm\.(query|key)_norm\.scale$")
#: diffusers layers Forge reaches as a band of a fused layer or with its halves swapped
#: (its FLUX.1 map): its loader drops their bias deltas, and applies a full ΔW or GLoRA
#: of the swapped one unswapped
FORGE_BANDS = re.compile(r"(attn\.(to_[qkv]|add_[qkv]_proj)|single_transformer_blocks\.\d+"
                         r"\.proj_mlp|(^|\.)norm_out\.linear)$")


#: ``ss_base_model_version`` of the files Forge's FLUX.1 and SD3 models read (Chroma's
#: names are FLUX.1's)
FORGE_BASES = frozenset({"flux1", "sd3", "chroma"})


def forge_models(names: Iterable[str]) -> set[str]:
    """Which of Forge's transformer models (``SD3``, ``FLUX.1``) module ``names`` (of a
    file, in any layout) look made for: both where they fit either."""
    from loraengine.plugins.models import family_marks, flux, sd3

    plain = [comfy_names.parse(n)[0] for n in names]
    found = family_marks.looks_like_among((sd3.SD3, flux.FLUX))(plain) or ""
    return {m for m in ("SD3", "FLUX.1") if m in found}


def forge_limits(modules: Mapping[str, tuple[str, Collection[str]]], layout: str,
                 metadata: Mapping[str, str] | None = None) -> list[str]:
    """What Forge's loader (backend/patcher/lora.py, with its key maps for its own
    FLUX.1 and SD3 models) cannot express of a ``comfyui`` or ``diffusers`` file's
    modules made for those models, as measured with its code
    (tests/fixtures/interop/make_webui_lycoris_transformer_fixtures.py; the ``kohya``
    file's are in ``kohya_limits``); nothing for other models."""
    if any(_LTX2_NAMES.search(n) for n in modules):
        return []  # LTX-2's names, which SD3's marks also fit
    base = (metadata or {}).get("ss_base_model_version", "").split(":")[0]
    if base and base not in FORGE_BASES:
        # made for a model Forge has no transformer of (HunyuanVideo 1.5's diffusers
        # names are SD3's and FLUX.1's too)
        return []
    models = forge_models(modules) if modules else set()
    if not models:
        return []
    out = _rule_lines(modules, (FORGE,), metadata)
    if layout == "comfyui":
        # written without a Tucker core (the format's ``whole_lokr``)
        out = [line for line in out if FORGE_TUCKER not in line]
        fused = unfused_modules(modules)
        if fused:
            out.append(f"{FORGE}: {UNFUSED} ({len(fused)} layer(s), e.g. "
                       f"{comfy_names.own_path(fused[0])})")
        norms = [n for n in modules if QK_NORM.search(n)]
        if norms:
            out.append(f"{FORGE}: {QK_NORMS} ({len(norms)} layer(s))")
        return out
    if "SD3" in models:
        out.append(f"{FORGE}: reads no diffusers names for SD3 (its SD3 map is disabled): "
                   f"an SD3 file in them does not load there ({len(modules)} layer(s)); "
                   f"the kohya and comfyui exports do")
    if "FLUX.1" not in models:
        return out
    # LoRA's DoRA is written as PEFT's lora_magnitude_vector (the other algorithms keep
    # dora_scale, which Forge reads)
    dora = _count(modules, lambda a, p: a == "lora" and "dora_scale" in p)
    if dora:
        out.append(f"{FORGE}: reads no lora_magnitude_vector (PEFT's DoRA) ({dora} layer(s))")
    banded = [(n, a, set(p)) for n, (a, p) in modules.items() if FORGE_BANDS.search(n)]
    bias = sum(1 for _, a, p in banded if "diff_b" in p)
    if bias:
        out.append(f"{FORGE}: drops the bias delta (diff_b) of layers it maps onto a band of "
                   f"a fused layer ({bias} layer(s))")
    swapped = sum(1 for n, a, p in banded if n.endswith("norm_out.linear")
                  and ("diff" in p or a == "glora"))
    if swapped:
        out.append(f"{FORGE}: applies a full ΔW or GLoRA of the final modulation, which it "
                   f"stores with halves swapped, unswapped ({swapped} layer(s))")
    magnitudes = sum(1 for n, a, p in banded if n.endswith("norm_out.linear")
                     and a != "lora" and "dora_scale" in p)
    if magnitudes:
        out.append(f"{FORGE}: {SWAPPED_DORA} of the final modulation, which it stores with "
                   f"halves swapped ({magnitudes} layer(s))")
    return out


UNFUSED = ("layers that its FLUX.1/SD3 model joins into one (q/k/v) or stores with "
           "halves swapped, whose algorithm has no such form, are written under "
           "diffusers' names, which are not loaded there")
QK_NORMS = "attention q/k norm deltas (norm_q/norm_k) are not loaded"


#: Layer names only the models whose diffusers pipeline reads LoKr have (its
#: ``lora_state_dict`` lets ``.lokr_`` keys through): Flux.2's and Z-Image's.
LOKR_PIPELINE_MARKERS = {
    "Flux.2": (".to_qkv_mlp_proj", ".ff.linear_in", ".ff_context.linear_in",
               "double_stream_modulation_", "single_stream_modulation", "time_guidance_embed"),
    "Z-Image": (".attention.to_", ".feed_forward.w1", "cap_embedder", "all_x_embedder")}


def lokr_pipeline(paths: Iterable[str]) -> str | None:
    """The model whose diffusers pipeline reads LoKr files that module ``paths`` (of a
    file, in diffusers' names) belong to, or None."""
    names = list(paths)
    return next((model for model, marks in LOKR_PIPELINE_MARKERS.items()
                 if any(m in name for name in names for m in marks)), None)


def diffusers_limits(modules: Mapping[str, tuple[str, Collection[str]]],
                     metadata: Mapping[str, str] | None = None) -> list[str]:
    """diffusers' ``load_lora_weights`` reads LoRA (and DoRA) only, and LoKr (without a
    Tucker core or DoRA, see ``peft_lokr``) for Flux.2 and Z-Image: modules whose
    tensors are not such (by name, whichever algorithm wrote them); the layers ComfyUI,
    the format's other reader, has no diffusers name for (``comfyui_unread``). Its
    (PEFT's) DoRA is the standard one: a file trained with ComfyUI's norm reads
    differently there."""
    dora = [] if dora_norm(metadata) == "standard" else [
        f"diffusers: {COMFYUI_NORM_AS_STANDARD} ({n} layer(s))"
        for n in [_count(modules, lambda a, p: "dora_scale" in p and p <= LORA_PARAMS)] if n]
    reads_lokr = lokr_pipeline(modules) is not None
    lokr_ok = {*LOKR_FACTORS, "alpha"}

    def not_read(algorithm: str, params: set[str]) -> bool:
        if algorithm == "deltas" or params <= LORA_PARAMS:
            return False
        return not (reads_lokr and params <= lokr_ok)

    other = sorted({a for a, p in modules.values() if not_read(a, set(p))})
    n = _count(modules, not_read)
    both = both_read_rule({name: params for name, (_, params) in modules.items()}) \
        is not None
    own = [f"diffusers reads only LoRA (and LoKr for Flux.2 and Z-Image); {n} "
           f"layer(s) of {', '.join(other)} are not applied there"] if n else []
    return dora + own + _diffusers_deltas(modules) + \
        ([] if both else comfyui_unread(modules, metadata)) + \
        forge_limits(modules, "diffusers", metadata)


def _diffusers_deltas(modules: Mapping[str, tuple[str, Collection[str]]]) -> list[str]:
    """Full ΔW and bias/norm deltas (``diff``/``diff_b``), which diffusers' LoRA loader
    does not read (measured, tests/test_interop_diffusers_matrix.py: on the SD1.5, SDXL
    and SD3 pipelines ``load_lora_weights`` then refuses the whole file; FLUX.1's loads
    the LoRA and skips them)."""
    n = _count(modules, lambda a, p: bool({"diff", "diff_b"} & p))
    return [f"diffusers reads no full ΔW or bias/norm delta (diff, diff_b): {n} layer(s) "
            f"are not applied there, and on most pipelines load_lora_weights refuses the "
            f"whole file"] if n else []


#: what diffusers' kohya-file converter reads of a module
KOHYA_LORA_FOR_DIFFUSERS = frozenset({"lora_down.weight", "lora_up.weight", "alpha",
                                      "dora_scale"})


def diffusers_kohya_limits(modules: Mapping[str, tuple[str, Collection[str]]],
                           metadata: Mapping[str, str] | None = None) -> list[str]:
    """What diffusers' ``load_lora_weights`` does with a ``kohya`` file, as measured
    (tests/test_interop_diffusers_matrix.py): it converts LoRA only, refusing the whole
    file when any module is something else (another algorithm, a full ΔW, bias or norm
    deltas), and drops DoRA's magnitude (``dora_scale``), loading such layers as plain
    LoRA."""
    other = _count(modules, lambda a, p: not p <= KOHYA_LORA_FOR_DIFFUSERS)
    dora = _count(modules, lambda a, p: "dora_scale" in p and p <= KOHYA_LORA_FOR_DIFFUSERS)
    out = []
    if other:
        kinds = sorted({a for a, p in modules.values() if not set(p) <=
                        KOHYA_LORA_FOR_DIFFUSERS})
        out.append(f"diffusers reads only LoRA from a kohya file: load_lora_weights refuses "
                   f"the whole file ({other} layer(s) of {', '.join(kinds)})")
    if dora:
        out.append(f"diffusers drops DoRA's magnitude (dora_scale) of a kohya file: {dora} "
                   f"layer(s) load as plain LoRA there (the diffusers exporter writes PEFT's "
                   f"lora_magnitude_vector, which it reads)")
    if not other:
        out += _diffusers_kohya_flux_outside(modules)
    return out


#: FLUX.1's layers outside the double and single blocks, in the original checkpoint's
#: names: diffusers' converter of sd-scripts FLUX.1 files names their LoRA without the
#: ``transformer.`` prefix, so the transformer never receives it
DIFFUSERS_KOHYA_FLUX_OUTSIDE = re.compile(
    r"^(img_in|txt_in|time_in|vector_in|guidance_in|final_layer)(\.|$)")


def _diffusers_kohya_flux_outside(modules: Mapping[str, tuple[str, Collection[str]]]
                                  ) -> list[str]:
    """LoRA on a FLUX.1 kohya file's input embedders and final layer, which diffusers'
    ``load_lora_weights`` converts but never applies, without a warning (measured with
    diffusers 0.42.1, tests/test_interop_sdscripts_transformers.py)."""
    outside = sorted(n for n, (a, _) in modules.items() if a == "lora" and
                     DIFFUSERS_KOHYA_FLUX_OUTSIDE.search(comfy_names.parse(n)[0]))
    if not outside or forge_models(modules) != {"FLUX.1"}:
        return []
    return [f"diffusers applies no LoRA on FLUX.1's input embedders and final layer "
            f"from a kohya file (img_in, txt_in, time_in, vector_in, guidance_in, "
            f"final_layer): {len(outside)} layer(s) are left unchanged there, without a "
            f"warning (the diffusers exporter's file loads them)"]


A1111, FORGE, LYCORIS = "A1111 1.8", "Forge", "LyCORIS"
#: sd-scripts' own LoRA loader (networks/lora.py, and lora_flux.py / lora_sd3.py for
#: FLUX.1 and SD3; its other algorithms load through LyCORIS), measured at 48d368f
#: (tests/fixtures/interop/make_sdscripts_matrix_fixtures.py, SD1.5;
#: make_sdscripts_sdxl_fixtures.py, SDXL at its real size;
#: make_sdscripts_transformer_fixtures.py, FLUX.1 and SD3)
SD_SCRIPTS = "sd-scripts"
#: FLUX.1's layers outside the blocks and input embedders that sd-scripts' FLUX.1
#: network (lora_flux.py) makes modules for, in the original checkpoint's names
SDSCRIPTS_FLUX_OUTSIDE = re.compile(r"^final_layer\.")
#: what sd-scripts' LoRANetwork does with a UNet's LoRA outside the blocks it makes
#: modules in (Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D)
SDSCRIPTS_OUTSIDE = ("LoRA outside the UNet blocks its network adapts (conv_in, conv_out, "
                     "time and label embeddings) is not placed")
#: Forge's LoKr on a Tucker core (its ComfyUI-derived weight adapter, as ComfyUI's); the
#: ``comfyui`` exporter writes that factor whole, which Forge reads
FORGE_TUCKER = "LoKr with Tucker factors (lokr_t2) fails: the file does not load"
#: a DoRA trained with ComfyUI's norm, read by the standard formula (PEFT, LyCORIS;
#: ComfyUI and Forge compute ComfyUI's, A1111 1.8 none)
COMFYUI_NORM_AS_STANDARD = ("DoRA trained with weight_decompose_norm: comfyui (divided "
                            "by the norm of W) is read with the norm of W + ΔW")
#: (consumers, what they do, which modules) for a ``kohya`` file, as measured with their
#: own loaders (tests/fixtures/interop/make_webui_lycoris_fixtures.py; LyCORIS is what
#: sd-scripts loads every algorithm but LoRA with). ``full`` keeps its ``diff_b`` (both
#: read it with the ``diff``); a norm layer's deltas are ``w_norm``/``b_norm``, which
#: all of them read.
KOHYA_RULES: tuple[tuple[tuple[str, ...], str, Callable[[str, Collection[str]], bool]], ...] = (
    ((A1111,), "no DoRA (dora_scale is not read)", lambda a, p: "dora_scale" in p),
    ((SD_SCRIPTS,), "no DoRA (dora_scale is not read)",
     lambda a, p: a == "lora" and "dora_scale" in p),
    ((SD_SCRIPTS,), "norm and bias deltas (diff, diff_b, w_norm, b_norm) are not placed",
     lambda a, p: a == "deltas" or (a == "lora" and "diff_b" in p)),
    ((FORGE,), "DoRA normalised by the norm of W, not of W + ΔW",
     lambda a, p: "dora_scale" in p),
    ((A1111, LYCORIS), "diff_b (the bias delta) of a layer that has an adapter is ignored",
     lambda a, p: a not in ("deltas", "full") and "diff_b" in p),
    ((FORGE,), "no OFT, BOFT or IA3 (these layers are left unchanged)",
     lambda a, p: a in ("oft", "boft", "ia3")),
    ((FORGE,), FORGE_TUCKER, lambda a, p: "lokr_t2" in p),
    ((A1111,), "GLoRA fails (these layers are left unchanged)",
     lambda a, p: a == "glora"),
    ((A1111,), "IA3 scaling a convolution's output channels fails",
     lambda a, p: a == "ia3"),
    ((LYCORIS,), "IA3 cannot be rebuilt from a file", lambda a, p: a == "ia3"),
    ((LYCORIS,), "LoHa/LoKr merged with alpha/rank applied twice (exact where alpha "
     "equals the rank)", lambda a, p: a in ("loha", "lokr") and "alpha" in p),
    ((LYCORIS,), "LoKr rebuilt by its own factor rules, failing where the file's "
     "differ (factor -1, decompose_both, use_tucker on convolutions)",
     lambda a, p: a == "lokr"),
    ((LYCORIS,), "BOFT rebuilt with its own stage count, failing for other stages",
     lambda a, p: a == "boft"),
    ((LYCORIS,), "OFT reloaded only where the block size is at most the block count",
     lambda a, p: a == "oft" and _blocks_wider_than_count(p)),
)


def _blocks_wider_than_count(params: Collection[str]) -> bool:
    """An OFT module whose ``oft_blocks`` ``[n, b, b]`` has b > n (needs the shapes:
    ``params`` a mapping of name -> shape)."""
    shape = params.get("oft_blocks") if isinstance(params, Mapping) else None
    return shape is not None and len(shape) == 3 and shape[1] > shape[0]


#: the DoRA rules of a file trained with ``weight_decompose_norm: comfyui``: Forge reads
#: it exactly (its formula is ComfyUI's), LyCORIS with the standard norm
COMFYUI_NORM_RULES: tuple[tuple[tuple[str, ...], str, Callable[[str, Collection[str]], bool]], ...] = (
    ((LYCORIS,), COMFYUI_NORM_AS_STANDARD, lambda a, p: "dora_scale" in p),
)


def kohya_rules(norm: str = "standard"
                ) -> tuple[tuple[tuple[str, ...], str, Callable[[str, Collection[str]], bool]], ...]:
    """``KOHYA_RULES`` for a file whose DoRA was trained with ``norm``."""
    if norm == "standard":
        return KOHYA_RULES
    return tuple(rule for rule in KOHYA_RULES if not rule[1].startswith("DoRA normalised")
                 ) + COMFYUI_NORM_RULES


def _rule_lines(modules: Mapping[str, tuple[str, Collection[str]]],
                consumers: Collection[str], metadata: Mapping[str, str] | None = None
                ) -> list[str]:
    """The ``kohya_rules`` lines of ``consumers`` that ``modules`` hit (``metadata``: the
    file's, for its DoRA norm)."""
    out = []
    for who, text, test in kohya_rules(dora_norm(metadata)):
        names = [c for c in who if c in consumers]
        n = sum(1 for algorithm, params in modules.values() if test(algorithm, params))
        if names and n:
            out.append(f"{' and '.join(names)}: {text} ({n} layer(s))")
    return out


def kohya_limits(modules: Mapping[str, tuple[str, Collection[str]]],
                 consumers: Collection[str] = (A1111, FORGE, LYCORIS, SD_SCRIPTS), *,
                 metadata: Mapping[str, str] | None = None) -> list[str]:
    """What A1111 1.8, Forge, LyCORIS and sd-scripts (the readers of kohya files besides
    ComfyUI and diffusers) cannot express of the modules, one line per limit. Each
    module is ``(algorithm, its tensor names)``; where the names map to shapes, the
    limits that depend on a shape are checked too. ``metadata``: the file's (its DoRA
    norm)."""
    out = _rule_lines(modules, consumers, metadata)
    if SD_SCRIPTS in consumers:
        out += _sdscripts_flux_outside(modules)
        outside = _sdscripts_outside(modules)
        if outside:
            out.append(f"{SD_SCRIPTS}: {SDSCRIPTS_OUTSIDE} ({len(outside)} layer(s), e.g. "
                       f"{outside[0]})")
    # FLUX.1/SD3 in sd-scripts' names: what stays under diffusers' names
    names = [c for c in (FORGE, LYCORIS) if c in consumers]
    fused = unfused_modules(modules)
    if names and fused:
        out.append(f"{' and '.join(names)}: {UNFUSED} ({len(fused)} layer(s), e.g. "
                   f"{comfy_names.own_path(fused[0])})")
    norms = [n for n in modules if QK_NORM.search(n) or QK_NORM_NATIVE.search(n)]
    if names and norms and forge_models(modules):
        out.append(f"{' and '.join(names)}: {QK_NORMS} ({len(norms)} layer(s))")
    return out


def _sdscripts_flux_outside(modules: Mapping[str, tuple[str, Collection[str]]]
                            ) -> list[str]:
    """LoRA on FLUX.1's final layer (``final_layer.linear`` and its modulation), for
    which sd-scripts' FLUX.1 network builds no module: merged or applied there, those
    layers stay as they were (measured, make_sdscripts_transformer_fixtures.py)."""
    outside = sorted(n for n, (a, _) in modules.items()
                     if a == "lora" and SDSCRIPTS_FLUX_OUTSIDE.search(comfy_names.parse(n)[0]))
    if not outside or forge_models(modules) != {"FLUX.1"}:
        return []
    return [f"{SD_SCRIPTS}: LoRA on FLUX.1's final layer is not placed (its FLUX.1 network "
            f"has no module there) ({len(outside)} layer(s), e.g. "
            f"{comfy_names.own_path(outside[0])})"]


def _sdscripts_outside(modules: Mapping[str, tuple[str, Collection[str]]]) -> list[str]:
    """The LoRA modules of a UNet's file (diffusers' or the original names) on a layer
    outside its down, mid and up blocks, which sd-scripts' LoRANetwork has no module for
    (measured: tests/test_interop_sdscripts_matrix.py, SD1.5, and
    tests/test_interop_sdscripts_sdxl.py, SDXL)."""
    if not any(n.split(".", 1)[0] in BLOCK_ROOTS for n in modules):
        return []
    return sorted(n for n, (a, _) in modules.items() if a == "lora" and n in TOP_LEVEL)


def kohya_file_limits(modules: Mapping[str, tuple[str, Collection[str]]],
                      metadata: Mapping[str, str] | None = None) -> list[str]:
    """``kohya_limits``, and what ComfyUI, which reads kohya files too, does differently
    with them: ``COMFYUI_RULES``, and LoKr's Tucker core, on which ComfyUI's LoKr fails
    (the ``comfyui`` exporter writes that factor whole); and what diffusers, which reads
    them too, does not read (``diffusers_kohya_limits``)."""
    return (kohya_limits(modules, metadata=metadata) + _comfyui_rules(modules, metadata)
            + _comfyui_tucker(modules) + _comfyui_kohya_mmdit(modules)
            + diffusers_kohya_limits(modules, metadata))


def _comfyui_kohya_mmdit(modules: Mapping[str, tuple[str, Collection[str]]]) -> list[str]:
    """What ComfyUI does not load of a FLUX.1/SD3 file in sd-scripts' names (measured,
    tests/fixtures/interop/make_comfyui_matrix_fixtures.py, the ``kohya`` columns): the
    modules kept under diffusers' names (``comfyui_fused_limits``, as for the comfyui
    export), and FLUX.1's q/k RMSNorm deltas: its key map gives ``lora_unet_*`` names to
    ``….weight`` tensors only, and those norms' weight is ``….scale``."""
    if not forge_models(modules):
        return []
    out = comfyui_fused_limits(modules)
    norms = sorted(n for n in modules if QK_NORM_NATIVE.search(n))
    if norms:
        out.append(f"ComfyUI has no lora_unet_* key for FLUX.1's attention q/k norms "
                   f"(their weight is ….scale): {len(norms)} norm delta(s) are not loaded "
                   f"(e.g. {norms[0]}; the comfyui exporter writes them under ComfyUI's "
                   f"names, which it reads)")
    return out


def _comfyui_tucker(modules: Mapping[str, tuple[str, Collection[str]]]) -> list[str]:
    n = _count(modules, lambda a, p: "lokr_t2" in p)
    return [f"ComfyUI's LoKr fails on Tucker factors (lokr_t2): these layers are left "
            f"unchanged ({n} layer(s); the comfyui exporter, or loraengine convert --to "
            f"comfyui, writes the factor whole)"] if n else []


#: diffusers' names of the layers ComfyUI's FLUX.1 and SD3 models fuse (q/k/v, and
#: FLUX.1's single-block MLP input)
FUSED_IN_COMFYUI = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.add_q_proj",
                    ".attn.add_k_proj", ".attn.add_v_proj", ".proj_mlp")


def comfyui_mmdit(names: Collection[str]) -> str | None:
    """Which of the models ComfyUI maps diffusers' names onto its own fused layers for
    (FLUX.1, SD3) the diffusers module ``names`` of a file belong to, or None."""
    if lokr_pipeline(names) is not None:  # Flux.2, Z-Image
        return None
    if any("single_transformer_blocks." in n for n in names) and \
            any(n.startswith("time_text_embed.") for n in names):
        return "FLUX.1"
    if any(n.startswith("pos_embed.") or n.endswith(".norm1_context.linear") for n in names) \
            and not any("single_transformer_blocks." in n for n in names) \
            and not any(".img_mod." in n or ".txt_mod." in n for n in names):
        return "SD3"
    return None


def _swapped_in_comfyui(names: Collection[str]) -> list[str]:
    """Of a FLUX.1 or SD3 file's diffusers module names, the layers ComfyUI stores with
    their two row halves swapped: the final modulation, and SD3's last context
    modulation."""
    model = comfyui_mmdit(names)
    out = [n for n in names if n == "norm_out.linear"] if model else []
    if model == "SD3":
        context = [n for n in names if n.endswith(".norm1_context.linear")
                   and n.split(".")[-3].isdigit()]
        if context:
            out.append(max(context, key=lambda n: int(n.split(".")[-3])))
    return out


def diffusers_file_limits(modules: Mapping[str, tuple[str, Collection[str]]],
                          metadata: Mapping[str, str] | None = None) -> list[str]:
    """``diffusers_limits``, and what ComfyUI, which reads diffusers files of FLUX.1 and
    SD3 too, does differently with them: ``COMFYUI_RULES``, DoRA's magnitude under PEFT's
    name (which it does not load), bias deltas of the layers it fuses or stores with
    swapped halves (not applied), and OFT/BOFT/GLoRA on a swapped layer (it reorders a
    module's ΔW, but theirs is computed from its own weight, in its own order)."""
    peft_dora = {n for n, (a, p) in modules.items() if a == "lora" and "dora_scale" in p}
    out = diffusers_limits(modules, metadata) + _comfyui_rules(
        {n: m for n, m in modules.items() if n not in peft_dora}, metadata) + \
        _comfyui_tucker(modules)
    if peft_dora:
        out.append(f"ComfyUI does not load DoRA's magnitude under PEFT's name "
                   f"(lora_magnitude_vector): {len(peft_dora)} layer(s) are plain LoRA "
                   f"there (the comfyui exporter writes dora_scale)")
    out += _comfyui_unet_attention(modules)
    model = comfyui_mmdit(modules)
    swapped = _swapped_in_comfyui(list(modules))
    if model is None:
        return out
    biases = [n for n, (a, p) in modules.items() if "diff_b" in p and
              (n.endswith(FUSED_IN_COMFYUI) or n in swapped)]
    if biases:
        out.append(f"ComfyUI applies no bias delta (diff_b) under diffusers' names of a "
                   f"{model} layer it fuses or stores with swapped halves ({len(biases)} "
                   f"layer(s), e.g. {sorted(biases)[0]})")
    weight_based = [n for n in swapped if {"oft_blocks", "a1.weight"} & set(modules[n][1])]
    if weight_based:
        out.append(f"ComfyUI applies OFT/BOFT/GLoRA to its own row order of a {model} layer "
                   f"it stores with swapped halves ({len(weight_based)} layer(s), e.g. "
                   f"{weight_based[0]})")
    magnitudes = [n for n in swapped if n not in peft_dora and "dora_scale" in modules[n][1]]
    if magnitudes:
        out.append(f"ComfyUI {SWAPPED_DORA} of a {model} layer it stores with swapped "
                   f"halves ({len(magnitudes)} layer(s), e.g. {magnitudes[0]})")
    return out


#: a UNet's attention projections under diffusers' names (UNet2DConditionModel's)
UNET_ATTENTION = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+"
                            r"\.transformer_blocks\.\d+\.attn[12]\.(to_[qkv]|to_out\.0)$")


def _comfyui_unet_attention(modules: Iterable[str]) -> list[str]:
    """ComfyUI maps a UNet's diffusers names (comfy/lora.py ``model_lora_keys_unet``)
    with the attention projections in the old attention-processor spelling only
    (``….attn1.processor.to_q``, ``….processor.to_out``): the diffusers/PEFT names of
    those layers are not loaded there, every other layer is (measured,
    make_comfyui_matrix_fixtures.py, the SD1.5/SDXL ``diffusers`` columns)."""
    hit = sorted(n for n in modules if UNET_ATTENTION.search(n))
    if not hit:
        return []
    return [f"ComfyUI reads a UNet's attention projections under diffusers' names only "
            f"in the attention-processor spelling (….attn1.processor.to_q): {len(hit)} "
            f"layer(s) are not loaded there (e.g. {hit[0]}); the comfyui and kohya "
            f"exporters are read with every layer"]


#: ComfyUI and Forge swap a diffusers-named module's ΔW into their row order, and not
#: its DoRA magnitude (``weight_decompose`` scales by ``dora_scale`` as it is)
SWAPPED_DORA = "applies DoRA's magnitude (dora_scale) in diffusers' row order"


@hookimpl
def loraengine_exporters():
    return [
        KOHYA.spec("kohya keys (lora_unet_*) as sd-scripts writes them (SAI names, "
                   "input_blocks_*, for SDXL; double_blocks_*/joint_blocks_* for FLUX.1/"
                   "SD3): ComfyUI, A1111/Forge, diffusers.",
                   KOHYA_LAYOUTS, kohya_file_limits),
        COMFYUI.spec("ComfyUI keys (diffusion_model.*) as its own trainer writes them "
                     "(the checkpoint's input_blocks.* names for UNets).", COMFYUI_LAYOUTS,
                     comfyui_limits),
        DIFFUSERS.spec("diffusers/PEFT keys (unet.* / transformer.* with lora_A/lora_B; "
                       "for Flux.2, Lumina 2 and LTX-2 ComfyUI's names, diffusion_model.*, "
                       "which their diffusers loaders convert): diffusers' "
                       "load_lora_weights, ComfyUI (a UNet's but for its attention "
                       "projections).", diffusers_file_limits),
        PEFT.spec("Same keys as diffusers (the PEFT spelling).", diffusers_file_limits),
    ]
