"""Nodes for checking the loraengine pack inside a real ComfyUI server
(``benchmarks/comfyui_server.py`` copies this folder into the server's
``custom_nodes``): a loader for tiny checkpoints in ComfyUI's format, which ComfyUI's own
checkpoint loaders do not match (they only know released model sizes), and the
conditioning saved beside them. The files are read from ``$LORAENGINE_CHECK_WORK``.

Everything else is ComfyUI's own code: ``load_torch_file``, ``detect_unet_config``, the
``supported_models`` class of the family, ``load_model_weights`` and ``ModelPatcher``."""

import os

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.utils


def _work(name):
    return os.path.join(os.environ["LORAENGINE_CHECK_WORK"], name)


def load_tiny(kind):
    """A ``MODEL`` (ModelPatcher) read from ``tiny_<kind>.safetensors`` by ComfyUI."""
    sd = comfy.utils.load_torch_file(_work(f"tiny_{kind}.safetensors"))
    prefix = "model.diffusion_model."
    unet = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    family = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}
    config = family[kind](comfy.model_detection.detect_unet_config(unet, ""))
    # diffusers' attention_head_dim of these tiny configs is a head count
    config.unet_config.update(num_heads=4, num_head_channels=-1)
    model = config.get_model({})
    model.load_model_weights(sd, prefix)
    return comfy.model_patcher.ModelPatcher(
        model, comfy.model_management.get_torch_device(),
        comfy.model_management.unet_offload_device())


class TinyCheckpointLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (["sd15", "sdxl"], {"default": "sd15"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "loraengine_check"

    def load(self, kind):
        return (load_tiny(kind),)


class TinyConditioning:
    """One CONDITIONING entry per latent from ``cond_<kind>.safetensors``, with
    ``pooled_output`` when the file has one (SDXL)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (["sd15", "sdxl"], {"default": "sd15"})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "load"
    CATEGORY = "loraengine_check"

    def load(self, kind):
        tensors = comfy.utils.load_torch_file(_work(f"cond_{kind}.safetensors"))
        cond, pooled = tensors["cond"], tensors.get("pooled")
        out = []
        for i in range(cond.shape[0]):
            extras = {} if pooled is None else {"pooled_output": pooled[i:i + 1]}
            out.append([cond[i:i + 1], extras])
        return (out,)


class TinyBuckets:
    """Latents of two sizes as ComfyUI's ResolutionBucket hands them on: a list of
    LATENTs, one ``[B_i,C,H_i,W_i]`` per bucket, and a list of CONDITIONINGs, B_i
    entries each (from ``buckets_sd15.safetensors``)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("LATENT", "CONDITIONING")
    OUTPUT_IS_LIST = (True, True)
    FUNCTION = "load"
    CATEGORY = "loraengine_check"

    def load(self):
        return bucket_groups()


def bucket_groups():
    tensors = comfy.utils.load_torch_file(_work("buckets_sd15.safetensors"))
    latents, conds = [], []
    i = 0
    while f"latents.{i}" in tensors:
        latents.append({"samples": tensors[f"latents.{i}"]})
        cond = tensors[f"cond.{i}"]
        conds.append([[cond[j:j + 1], {}] for j in range(cond.shape[0])])
        i += 1
    return (latents, conds)


NODE_CLASS_MAPPINGS = {"TinyCheckpointLoader": TinyCheckpointLoader,
                       "TinyConditioning": TinyConditioning,
                       "TinyBuckets": TinyBuckets}
