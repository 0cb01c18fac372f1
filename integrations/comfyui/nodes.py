"""The nodes of the loraengine pack for ComfyUI. They only translate: every decision is
in ``loraengine.integrations.comfyui`` (importable and tested without ComfyUI)."""

from __future__ import annotations

import os

from loraengine.core.errors import PluginFailed
from loraengine.integrations import comfyui as bridge

try:  # inside ComfyUI
    import comfy.model_management as model_management
    import comfy.utils as comfy_utils
    import folder_paths
except ImportError:  # imported outside ComfyUI (packaging checks)
    model_management = comfy_utils = folder_paths = None


def _lora_files() -> list[str]:
    return list(folder_paths.get_filename_list("loras")) if folder_paths else []


class TrainLoraLoraEngine:
    """TrainLoraNode's inputs and outputs, trained by loraengine."""

    @classmethod
    def INPUT_TYPES(cls):
        return bridge.train_lora_input_types(_lora_files())

    RETURN_TYPES = bridge.RETURN_TYPES
    RETURN_NAMES = bridge.RETURN_NAMES
    # every input arrives as a list (as for ComfyUI's Train LoRA): several LATENTs and
    # CONDITIONINGs, e.g. ResolutionBucket's buckets, reach one run
    INPUT_IS_LIST = True
    FUNCTION = "train"
    CATEGORY = "training/loraengine"
    DESCRIPTION = ("Trains an adapter on ComfyUI's model with loraengine: each latent with "
                   "its own conditioning, exact resume, non-finite steps rolled back.")

    def train(self, **given):
        values = bridge.unwrap_list_inputs(given)
        model, latents, positive = values.pop("model"), values.pop("latents"), \
            values.pop("positive")
        existing_lora = values.pop("existing_lora", bridge.NO_LORA)
        validation_latents = values.pop("validation_latents", None)
        validation_positive = values.pop("validation_positive", None)
        config = values.pop("config", None)
        widgets = values
        path = None
        if existing_lora and existing_lora != bridge.NO_LORA:
            path = folder_paths.get_full_path_or_raise("loras", existing_lora)
        fields = set(bridge.NodeInputs.__dataclass_fields__)
        inputs = bridge.NodeInputs(existing_lora=path,
                                   **{k: v for k, v in widgets.items() if k in fields})
        patcher = model.clone()
        if model_management is not None:
            # the weights with the MODEL's own patches (an earlier LoRA) on the device
            model_management.load_models_gpu([patcher], memory_required=1e20,
                                             force_full_load=True)
        bar = comfy_utils.ProgressBar(inputs.steps) if comfy_utils else None

        def progress(step: int, total: int) -> None:
            if bar is not None:
                bar.update_absolute(step, total)
            if model_management is not None:
                model_management.throw_exception_if_processing_interrupted()

        try:
            out = bridge.train_lora(patcher.model, latents, positive, inputs, config=config,
                                    validation_latents=validation_latents,
                                    validation_positive=validation_positive,
                                    progress=progress)
        except PluginFailed as failed:  # ComfyUI's own interruption, raised in our hook
            if failed.__cause__ is not None and type(failed.__cause__).__name__ == \
                    "InterruptProcessingException":
                raise failed.__cause__ from None
            raise
        return (out.lora, out.loss_map, out.steps)


class SaveLoraLoraEngine:
    """Writes a LORA_MODEL with ComfyUI's keys and loraengine's metadata."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
                    "lora": ("LORA_MODEL", {"tooltip": "The adapter (Train LoRA's lora)."}),
                    "prefix": ("STRING", {"default": "loras/loraengine_lora",
                                          "tooltip": "File name prefix in the output "
                                                     "folder."})},
                "optional": {"steps": ("INT", {"forceInput": True,
                                                "tooltip": "Steps trained, for the name "
                                                           "and the metadata."})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "training/loraengine"

    def save(self, lora, prefix, steps=None):
        folder, name, counter, _, _ = folder_paths.get_save_image_path(
            prefix, folder_paths.get_output_directory())
        stem = f"{name}_{steps}_steps_{counter:05}_" if steps is not None else \
            f"{name}_{counter:05}_"
        bridge.save_lora_file(lora, os.path.join(folder, f"{stem}.safetensors"), steps)
        return {}


class LoadLoraEngineConfig:
    """A loraengine YAML config (a file, text laid over it) for Train LoRA's config."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "A YAML file."}),
                             "text": ("STRING", {"default": "", "multiline": True,
                                                 "tooltip": "YAML laid over the file."})}}

    RETURN_TYPES = ("LORAENGINE_CONFIG",)
    RETURN_NAMES = ("config",)
    FUNCTION = "load"
    CATEGORY = "training/loraengine"

    def load(self, path, text):
        return (bridge.load_config_text(text, path),)


NODE_CLASS_MAPPINGS = {
    "TrainLoraLoraEngine": TrainLoraLoraEngine,
    "SaveLoraLoraEngine": SaveLoraLoraEngine,
    "LoadLoraEngineConfig": LoadLoraEngineConfig,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TrainLoraLoraEngine": "Train LoRA (loraengine)",
    "SaveLoraLoraEngine": "Save LoRA (loraengine)",
    "LoadLoraEngineConfig": "Load loraengine config",
}
