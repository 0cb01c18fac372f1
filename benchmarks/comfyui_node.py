"""The ComfyUI node pack run by ComfyUI's own code, and beside ComfyUI's TrainLoraNode.

Not part of CI (it needs a ComfyUI source tree and the packages its loader imports;
docs/comfyui.md says how it was run and what it measured)::

    PYTHONPATH=.:/tmp/e_extra python benchmarks/comfyui_node.py --comfyui /path/to/ComfyUI

1. ComfyUI's loader: ``nodes.init_extra_nodes`` (its own nodes, TrainLoraNode among
   them), then ``nodes.load_custom_node`` on a copy of ``integrations/comfyui`` in a
   ``custom_nodes`` folder; the three nodes must be in ComfyUI's registry.
2. A tiny UNet with SD1.5's block layout written in ComfyUI's checkpoint format
   (``model.diffusion_model.<name>``), read back by ComfyUI's ``load_torch_file``,
   ``detect_unet_config``, ``supported_models.SD15`` and ``load_model_weights`` (a
   small loader node here: ComfyUI's own loaders only match released sizes). Latents go
   through ComfyUI's ``LoadLatent`` (a ``.latent`` file), one conditioning per latent.
3. A workflow with TrainLoraNode, and the same workflow with TrainLoraNode swapped for
   ours, each validated by ``execution.validate_prompt`` and run by
   ``execution.PromptExecutor`` (the engine ``main.py`` runs), in its own process; both
   save with ComfyUI's ``SaveLoRANode`` and plot with ``LossGraphNode``. Reported: the
   loss (first and last tenth), seconds per step (between the first and last step) and
   the peak resident memory above the process's before training.
4. ComfyUI's ``LoraModelLoader`` applies our saved file: unloaded keys counted from its
   ``lora key not loaded`` warnings, and ComfyUI's patched weights against loraengine's
   merge of the same file into the diffusers UNet the checkpoint was written from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
N_LATENTS, STEPS, RANK, LR = 4, 40, 4, 1e-3


def comfy_setup(comfy_root: Path, work: Path):
    """Import ComfyUI as ``main.py --cpu`` would, folders under ``work``."""
    sys.path.insert(0, str(comfy_root))
    import diffusers  # noqa: F401  (before the placeholder goes in)
    import transformers  # noqa: F401

    # torchvision: the registry's build does not import beside the CPU torch; nothing
    # run here uses it (docs/compatibility.md)
    placeholder = types.ModuleType("torchvision")
    placeholder.transforms = types.ModuleType("torchvision.transforms")
    sys.modules.setdefault("torchvision", placeholder)
    sys.modules.setdefault("torchvision.transforms", placeholder.transforms)
    import comfy.options

    comfy.options.enable_args_parsing(True)
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.cli_args  # noqa: F401
    finally:
        sys.argv = argv
    import folder_paths

    for name in ("input", "output", "temp", "loras"):
        (work / name).mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(work / "input"))
    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.set_temp_directory(str(work / "temp"))
    folder_paths.add_model_folder_path("loras", str(work / "output" / "loras"))
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return nodes


def load_pack(nodes, work: Path) -> list[str]:
    target = work / "custom_nodes" / "loraengine-comfyui"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(ROOT / "integrations" / "comfyui", target)
    ok = asyncio.run(nodes.load_custom_node(str(target)))
    assert ok, "ComfyUI's load_custom_node refused the pack"
    ours = ["TrainLoraLoraEngine", "SaveLoraLoraEngine", "LoadLoraEngineConfig"]
    missing = [n for n in ours if n not in nodes.NODE_CLASS_MAPPINGS]
    assert not missing, missing
    return ours


def diffusers_unet():
    from diffusers import UNet2DConditionModel

    from loraengine.testing.models import sd15_structure_unet_config

    torch.manual_seed(0)
    return UNet2DConditionModel(**sd15_structure_unet_config()).eval()


def write_inputs(work: Path) -> None:
    """The tiny SD1.5 checkpoint (ComfyUI's format), latents and conditioning."""
    from loraengine.plugins.models.unet_names import ldm_names

    unet = diffusers_unet()
    names = ldm_names(unet)
    sd = {}
    for key, value in unet.state_dict().items():
        module, _, param = key.rpartition(".")
        sd[f"model.diffusion_model.{names[module]}.{param}"] = value.contiguous()
    save_file(sd, str(work / "tiny_sd15.safetensors"))
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(N_LATENTS, 4, 16, 16, generator=g)
    save_file({"latent_tensor": latents, "latent_format_version_0": torch.tensor([])},
              str(work / "input" / "tiny.latent"))
    save_file({"cond": torch.randn(N_LATENTS, 8, 16, generator=g)},
              str(work / "cond.safetensors"))


def helper_nodes(nodes, work: Path) -> None:
    """The tiny model's loader and the per-latent conditioning (ComfyUI's own code)."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    class TinySD15Loader:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("MODEL",)
        FUNCTION = "load"
        CATEGORY = "test"

        def load(self):
            sd = comfy.utils.load_torch_file(str(work / "tiny_sd15.safetensors"))
            prefix = "model.diffusion_model."
            unet = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            config = comfy.supported_models.SD15(
                comfy.model_detection.detect_unet_config(unet, ""))
            config.unet_config.update(num_heads=4, num_head_channels=-1)
            model = config.get_model({})
            model.load_model_weights(sd, prefix)
            device = comfy.model_management.get_torch_device()
            return (comfy.model_patcher.ModelPatcher(
                model, device, comfy.model_management.unet_offload_device()),)

    class TinyConditioning:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "load"
        CATEGORY = "test"

        def load(self):
            cond = comfy.utils.load_torch_file(str(work / "cond.safetensors"))["cond"]
            return ([[cond[i:i + 1], {}] for i in range(cond.shape[0])],)

    nodes.NODE_CLASS_MAPPINGS["TinySD15Loader"] = TinySD15Loader
    nodes.NODE_CLASS_MAPPINGS["TinyConditioning"] = TinyConditioning


def workflow_with_trainloranode() -> dict:
    return {
        "1": {"class_type": "TinySD15Loader", "inputs": {}},
        "2": {"class_type": "LoadLatent", "inputs": {"latent": "tiny.latent"}},
        "3": {"class_type": "TinyConditioning", "inputs": {}},
        "4": {"class_type": "TrainLoraNode", "inputs": {
            "model": ["1", 0], "latents": ["2", 0], "positive": ["3", 0],
            "batch_size": 1, "grad_accumulation_steps": 1, "steps": STEPS,
            "learning_rate": LR, "rank": RANK, "optimizer": "AdamW",
            "loss_function": "MSE", "seed": 0, "training_dtype": "fp32",
            "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": True,
            "existing_lora": "[None]"}},
        "5": {"class_type": "SaveLoRANode", "inputs": {
            "lora": ["4", 1], "prefix": "loras/run", "steps": ["4", 3]}},
        "6": {"class_type": "LossGraphNode", "inputs": {
            "loss": ["4", 2], "filename_prefix": "loss"}},
    }


def swapped(workflow: dict) -> dict:
    """TrainLoraNode replaced by ours: the same inputs; its outputs (model, lora, loss,
    steps at this ComfyUI commit) are ours (lora, loss, steps) one place earlier."""
    out = json.loads(json.dumps(workflow))
    train = [k for k, v in out.items() if v["class_type"] == "TrainLoraNode"]
    for key in train:
        out[key]["class_type"] = "TrainLoraLoraEngine"
    for node in out.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in train:
                node["inputs"][name] = [value[0], value[1] - 1]
    out["7"] = {"class_type": "SaveLoraLoraEngine", "inputs": {
        "lora": ["4", 0], "prefix": "loras/ours_meta", "steps": ["4", 2]}}
    return out


class Server:
    """What PromptExecutor asks of ComfyUI's server."""

    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self):
        pass


def run_one(comfy_root: Path, work: Path, which: str) -> dict:
    import psutil

    nodes = comfy_setup(comfy_root, work)
    load_pack(nodes, work)
    helper_nodes(nodes, work)
    import comfy.utils
    import execution

    # the classes ComfyUI registered (its loader imports comfy_extras by file path)
    nodes_train = sys.modules[nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"].__module__]
    stamps: list[float] = []
    ticks: list[tuple[int, int]] = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview=None, node_id=None: ticks.append((value, total)))
    cls = nodes.NODE_CLASS_MAPPINGS["TrainLoraNode" if which == "theirs"
                                    else "TrainLoraLoraEngine"]
    peak = {"base": 0, "peak": 0}
    original = cls.train

    def timed(self, *args, **kwargs):
        proc, stop = psutil.Process(), threading.Event()
        peak["base"] = peak["peak"] = proc.memory_info().rss

        def watch():
            while not stop.is_set():
                peak["peak"] = max(peak["peak"], proc.memory_info().rss)
                time.sleep(0.002)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            return original(self, *args, **kwargs)
        finally:
            stop.set()
            thread.join()

    cls.train = timed
    # the loss map as ComfyUI's LossGraphNode receives it
    plotted: dict = {}
    plot = nodes_train.LossGraphNode.plot_loss

    def spied(self, loss, *args, **kwargs):
        plotted.update(loss)
        return plot(self, loss, *args, **kwargs)
    nodes_train.LossGraphNode.plot_loss = spied
    if which == "theirs":  # a time stamp at every step of ComfyUI's loop
        init = nodes_train.TrainSampler.__init__

        def stamped(self, *args, **kwargs):
            init(self, *args, **kwargs)
            inner = self.loss_callback

            def callback(loss):
                stamps.append(time.perf_counter())
                inner(loss)
            self.loss_callback = callback
        nodes_train.TrainSampler.__init__ = stamped
    else:
        hook = comfy.utils.PROGRESS_BAR_HOOK

        def stamped_hook(value, total, preview=None, node_id=None):
            stamps.append(time.perf_counter())
            hook(value, total, preview, node_id=node_id)
        comfy.utils.set_progress_bar_global_hook(stamped_hook)
    prompt = workflow_with_trainloranode()
    if which == "ours":
        prompt = swapped(prompt)
    for node in prompt.values():  # name the files for the trainer
        if "prefix" in node["inputs"]:
            node["inputs"]["prefix"] += f"_{which}"
    valid = asyncio.run(execution.validate_prompt("p1", prompt, None))
    assert valid[0], valid
    executor = execution.PromptExecutor(Server(), cache_type=False)
    executor.execute(prompt, "p1", {}, valid[2])
    if not executor.success:
        event, data = executor.status_messages[-1]
        sys.exit(f"{event}: {data.get('exception_type')}: {data.get('exception_message')}"
                 f"\n{''.join(data.get('traceback') or [])}")
    saved = sorted((work / "output" / "loras").glob(f"run_{which}_*.safetensors"))
    losses = [float(v) for v in plotted.get("loss", [])]
    steps = len(stamps)
    return {"trainer": which, "file": str(saved[-1]) if saved else "",
            "s_per_step": (stamps[-1] - stamps[0]) / (steps - 1) if steps > 1 else None,
            "steps_timed": steps, "peak_rss_mib": (peak["peak"] - peak["base"]) / 2**20,
            "progress_ticks": len(ticks), "loss": losses,
            "files": sorted(p.name for p in (work / "output" / "loras").iterdir())}


def loader_against_merge(nodes, base, file: Path, unet) -> tuple[object, dict]:
    """ComfyUI's LoraModelLoader (the training node module's) on ``file`` over the
    ``base`` patcher, left patched, against loraengine's merge of it into the diffusers
    ``unet``: the patcher and a report of unloaded keys and the worst relative error."""
    import comfy.utils

    import loraengine

    nodes_train = sys.modules[nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"].__module__]
    lora = comfy.utils.load_torch_file(str(file))
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Capture(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        patched = nodes_train.LoraModelLoader().load_lora_model(base, lora, 1.0)[0]
        patched.patch_model()
    finally:
        logging.getLogger().removeHandler(handler)
    not_loaded = [line for line in lines if "not loaded" in line.lower()]
    theirs = {k: v.detach().clone() for k, v in
              patched.model.diffusion_model.state_dict().items()}
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    loraengine.apply(unet, file, mode="merge")
    merged = unet.state_dict()
    comfy_map = comfy.utils.unet_to_diffusers(patched.model.model_config.unet_config)
    worst, where, changed, compared = 0.0, "", 0, 0
    for key, ldm in comfy_map.items():
        if key not in merged or ldm not in theirs:
            continue
        compared += 1
        if not torch.equal(merged[key], before[key]):
            changed += 1
        err = float((theirs[ldm] - merged[key]).abs().max()
                    / merged[key].abs().max().clamp_min(1e-30))
        if err >= worst:
            worst, where = err, key
    return patched, {"file_keys": len(lora), "keys_not_loaded": len(not_loaded),
                     "first_not_loaded": not_loaded[:3], "tensors_compared": compared,
                     "tensors_changed_by_merge": changed, "max_rel_error": worst,
                     "worst": where}


def check_loader(comfy_root: Path, work: Path, file: Path) -> dict:
    """ComfyUI's LoraModelLoader on our file vs loraengine's merge of it."""
    nodes = comfy_setup(comfy_root, work)
    helper_nodes(nodes, work)
    patcher = nodes.NODE_CLASS_MAPPINGS["TinySD15Loader"]().load()[0]
    return loader_against_merge(nodes, patcher, file, diffusers_unet())[1]


def fixed_draw_losses(comfy_root: Path, work: Path, files: dict[str, str]) -> dict:
    """The training data's loss on one fixed set of draws (8 noise levels and noises per
    latent, the same for every model), through ComfyUI's apply_model on the base model
    and on the base with each file applied by ComfyUI's LoraModelLoader: the denoised
    latent against the clean one (x0, what both trainers minimise by default) and the
    implied noise against the noise (eps)."""
    nodes = comfy_setup(comfy_root, work)
    helper_nodes(nodes, work)
    import comfy.utils
    from safetensors.torch import load_file

    nodes_train = sys.modules[nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"].__module__]
    x0 = load_file(str(work / "input" / "tiny.latent"))["latent_tensor"]
    cond = load_file(str(work / "cond.safetensors"))["cond"]
    g = torch.Generator().manual_seed(1234)
    per = 8
    base = nodes.NODE_CLASS_MAPPINGS["TinySD15Loader"]().load()[0]
    sigmas = base.model.model_sampling.sigmas
    idx = torch.randint(0, len(sigmas), (x0.shape[0] * per,), generator=g)
    noise = torch.randn(x0.shape[0] * per, *x0.shape[1:], generator=g)
    x = x0.repeat_interleave(per, 0)
    c = cond.repeat_interleave(per, 0)
    sigma = sigmas[idx]
    out = {}
    for name, file in [("base", ""), *files.items()]:
        patcher = nodes.NODE_CLASS_MAPPINGS["TinySD15Loader"]().load()[0]
        if file:
            lora = comfy.utils.load_torch_file(file)
            patcher = nodes_train.LoraModelLoader().load_lora_model(patcher, lora, 1.0)[0]
        patcher.patch_model()
        with torch.no_grad():
            noisy = patcher.model.model_sampling.noise_scaling(sigma, noise, x)
            denoised = patcher.model.apply_model(noisy, sigma, c_crossattn=c).float()
        eps = (noisy - denoised) / sigma.reshape(-1, 1, 1, 1)
        out[name] = {"x0_mse": float(((denoised - x) ** 2).mean()),
                     "eps_mse": float(((eps - noise) ** 2).mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/loraengine_comfyui_check"))
    parser.add_argument("--run", choices=("ours", "theirs"))
    parser.add_argument("--check-loader", type=Path)
    parser.add_argument("--eval", nargs=2, metavar=("THEIRS", "OURS"))
    args = parser.parse_args()
    if args.run:
        print("RESULT " + json.dumps(run_one(args.comfyui, args.work, args.run)))
        return
    if args.eval:
        files = dict(zip(("TrainLoraNode", "ours"), args.eval, strict=True))
        print("RESULT " + json.dumps(fixed_draw_losses(args.comfyui, args.work, files)))
        return
    if args.check_loader:
        print("RESULT " + json.dumps(check_loader(args.comfyui, args.work,
                                                  args.check_loader)))
        return
    if args.work.exists():
        shutil.rmtree(args.work)
    (args.work / "input").mkdir(parents=True)
    write_inputs(args.work)
    results = {}
    for which in ("theirs", "ours"):
        out = subprocess.run([sys.executable, __file__, "--comfyui", str(args.comfyui),
                              "--work", str(args.work), "--run", which],
                             capture_output=True, text=True, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{which}: failed\n{out.stderr[-3000:]}")
        results[which] = json.loads(line[-1][7:])
    out = subprocess.run([sys.executable, __file__, "--comfyui", str(args.comfyui),
                          "--work", str(args.work), "--check-loader",
                          results["ours"]["file"]], capture_output=True, text=True,
                         check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"loader check failed\n{out.stderr[-3000:]}")
    results["loader"] = json.loads(line[-1][7:])
    out = subprocess.run([sys.executable, __file__, "--comfyui", str(args.comfyui),
                          "--work", str(args.work), "--eval", results["theirs"]["file"],
                          results["ours"]["file"]], capture_output=True, text=True,
                         check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"fixed-draw losses failed\n{out.stderr[-3000:]}")
    results["fixed_draw_loss"] = json.loads(line[-1][7:])
    for which in ("theirs", "ours"):
        r = results[which]
        loss = r["loss"]
        tenth = max(1, len(loss) // 10)
        r["loss_first_tenth"] = sum(loss[:tenth]) / tenth
        r["loss_last_tenth"] = sum(loss[-tenth:]) / tenth
        r.pop("loss")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
