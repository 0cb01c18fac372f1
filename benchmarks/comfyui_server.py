"""The ComfyUI node pack in a real ComfyUI server: ``main.py --cpu`` on localhost, a
workflow in ComfyUI's API format POSTed to ``/prompt``, ``/history`` polled.

Not part of CI (it needs a ComfyUI source tree and the packages its server imports;
docs/comfyui.md says how it was run and what it measured)::

    pip install --target /tmp/e_extra aiohttp yarl psutil einops scipy torchsde ...
    PYTHONPATH=.:/tmp/e_extra python benchmarks/comfyui_server.py --comfyui /path/to/ComfyUI

For each of a tiny SD1.5-structured and a tiny SDXL-structured model (ComfyUI's
checkpoint format, read by ComfyUI's own code through ``benchmarks/comfyui_check_nodes``):

1. The server is started with ``--cpu --base-directory WORK``; WORK's ``custom_nodes``
   holds a copy of ``integrations/comfyui`` and of ``comfyui_check_nodes``. Its
   ``/object_info`` must list our three nodes.
2. The workflow (loader -> LoadLatent -> conditioning -> Train LoRA (loraengine) ->
   Save LoRA (loraengine), ComfyUI's SaveLoRANode and LossGraphNode) is POSTed to
   ``/prompt`` and ``/history/<id>`` polled until it reports success.
3. In a separate process, ComfyUI's ``LoraModelLoader`` applies the saved file: keys
   not loaded (its warnings counted), ComfyUI's patched weights against loraengine's merge
   of the same file into the diffusers UNet the checkpoint was written from, and the
   training data's loss on one fixed set of draws before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
N_LATENTS, STEPS, RANK, LR = 4, 40, 4, 1e-3
POOLED = 16  # the tiny SDXL's pooled-output width (its label_emb takes POOLED + 6*256)


def diffusers_unet(kind: str):
    from diffusers import UNet2DConditionModel

    from loraengine.testing.models import sd15_structure_unet_config, sdxl_structure_unet_config

    if kind == "sd15":
        config = sd15_structure_unet_config()
    else:  # ComfyUI's SDXL embeds each of the six sizes in 256 channels
        config = dict(sdxl_structure_unet_config(), addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=POOLED + 6 * 256)
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def write_inputs(work: Path) -> None:
    from loraengine.plugins.models.unet_names import ldm_names

    (work / "input").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    for kind in ("sd15", "sdxl"):
        unet = diffusers_unet(kind)
        names = ldm_names(unet)
        sd = {}
        for key, value in unet.state_dict().items():
            module, _, param = key.rpartition(".")
            sd[f"model.diffusion_model.{names[module]}.{param}"] = value.contiguous()
        save_file(sd, str(work / f"tiny_{kind}.safetensors"))
        latents = torch.randn(N_LATENTS, 4, 16, 16, generator=g)
        save_file({"latent_tensor": latents, "latent_format_version_0": torch.tensor([])},
                  str(work / "input" / f"tiny_{kind}.latent"))
        cond = {"cond": torch.randn(N_LATENTS, 8, 16, generator=g)}
        if kind == "sdxl":
            cond["pooled"] = torch.randn(N_LATENTS, POOLED, generator=g)
        save_file(cond, str(work / f"cond_{kind}.safetensors"))
    # two resolution buckets for the SD1.5 model: 3 latents 16x16, 2 latents 16x24
    buckets = {}
    for i, (n, h, w) in enumerate(((3, 16, 16), (2, 16, 24))):
        buckets[f"latents.{i}"] = torch.randn(n, 4, h, w, generator=g)
        buckets[f"cond.{i}"] = torch.randn(n, 8, 16, generator=g)
    save_file(buckets, str(work / "buckets_sd15.safetensors"))


def prepare(work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    write_inputs(work)
    nodes = work / "custom_nodes"
    shutil.copytree(ROOT / "integrations" / "comfyui", nodes / "loraengine-comfyui")
    shutil.copytree(Path(__file__).parent / "comfyui_check_nodes",
                    nodes / "loraengine_check_nodes")
    # torchvision: the registry's build does not import beside the CPU torch, and
    # nothing run here uses it; an empty package stands in for it
    shim = work / "shim" / "torchvision"
    (shim / "transforms").mkdir(parents=True)
    (shim / "__init__.py").write_text("")
    (shim / "transforms" / "__init__.py").write_text("")
    # the browser front end is not needed headless; an empty one stands in for it
    (work / "frontend").mkdir()
    (work / "frontend" / "index.html").write_text("<html></html>")


def workflow(run: str) -> dict:
    """``sd15``/``sdxl``: one LATENT (ComfyUI's LoadLatent) and one conditioning per
    latent; ``sd15_buckets``: the SD1.5 model on two resolution buckets (list outputs,
    as ComfyUI's ResolutionBucket gives them) with ``bucket_mode`` on."""
    kind = run.split("_")[0]
    buckets = run.endswith("_buckets")
    data = ({"2": {"class_type": "TinyBuckets", "inputs": {}}} if buckets else {
        "2": {"class_type": "LoadLatent", "inputs": {"latent": f"tiny_{kind}.latent"}},
        "3": {"class_type": "TinyConditioning", "inputs": {"kind": kind}}})
    return {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": kind}},
        **data,
        "4": {"class_type": "TrainLoraLoraEngine", "inputs": {
            "model": ["1", 0], "latents": ["2", 0],
            "positive": ["2", 1] if buckets else ["3", 0], "bucket_mode": buckets,
            "batch_size": 1, "grad_accumulation_steps": 1, "steps": STEPS,
            "learning_rate": LR, "rank": RANK, "optimizer": "AdamW",
            "loss_function": "MSE", "seed": 0, "training_dtype": "fp32",
            "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": True,
            "existing_lora": "[None]"}},
        "5": {"class_type": "SaveLoraLoraEngine", "inputs": {
            "lora": ["4", 0], "prefix": f"loras/server_{run}", "steps": ["4", 2]}},
        "6": {"class_type": "SaveLoRANode", "inputs": {
            "lora": ["4", 0], "prefix": f"loras/server_native_{run}", "steps": ["4", 2]}},
        "7": {"class_type": "LossGraphNode", "inputs": {
            "loss": ["4", 1], "filename_prefix": f"loss_{run}"}},
    }


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as error:
        sys.exit(f"POST {url}: {error.code} {error.read().decode()[:3000]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_and_run(comfy_root: Path, work: Path, kinds: list[str]) -> dict:
    """Start ComfyUI's server, run each workflow through its HTTP API, stop it."""
    port = free_port()
    env = dict(os.environ, LORAENGINE_CHECK_WORK=str(work),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", ""),
                                           str(work / "shim")]))
    log = open(work / "server.log", "w")  # noqa: SIM115  (open while the server runs)
    command = [sys.executable, "main.py", "--cpu", "--base-directory", str(work),
               "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
               "--front-end-root", str(work / "frontend")]
    server = subprocess.Popen(command, cwd=comfy_root, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    out: dict = {"command": " ".join(command[1:])}
    try:
        started = time.perf_counter()
        while True:
            if server.poll() is not None:
                sys.exit(f"server exited {server.returncode}:\n"
                         f"{(work / 'server.log').read_text()[-4000:]}")
            try:
                info = _get(f"{base}/object_info")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        out["startup_s"] = time.perf_counter() - started
        ours = ["TrainLoraLoraEngine", "SaveLoraLoraEngine", "LoadLoraEngineConfig"]
        out["registered"] = [n for n in ours if n in info]
        assert out["registered"] == ours, out
        out["display_names"] = [info[n]["display_name"] for n in ours]
        for kind in kinds:
            client = str(uuid.uuid4())
            reply = _post(f"{base}/prompt", {"prompt": workflow(kind), "client_id": client})
            prompt_id = reply["prompt_id"]
            started = time.perf_counter()
            while True:
                history = _get(f"{base}/history/{prompt_id}")
                if prompt_id in history and history[prompt_id]["status"].get("completed") \
                        is not None and (history[prompt_id]["status"]["completed"]
                                         or history[prompt_id]["status"]["status_str"]
                                         == "error"):
                    break
                if server.poll() is not None:
                    sys.exit(f"server exited:\n{(work / 'server.log').read_text()[-4000:]}")
                time.sleep(1)
            status = history[prompt_id]["status"]
            if not status["completed"]:
                sys.exit(f"{kind}: {json.dumps(status['messages'])[-4000:]}")
            files = sorted(p.name for p in (work / "output" / "loras").glob(
                f"server_*{kind}_[0-9]*.safetensors"))
            out[kind] = {"status": status["status_str"], "seconds": time.perf_counter()
                         - started, "outputs": sorted(history[prompt_id]["outputs"]),
                         "files": files}
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    return out


def check(comfy_root: Path, work: Path, run: str, file: Path) -> dict:
    """ComfyUI's LoraModelLoader on ``file`` vs loraengine's merge, and the fixed-draw
    loss of the base and the patched model (ComfyUI's apply_model, its extra_conds)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from comfyui_node import comfy_setup, loader_against_merge

    kind, buckets = run.split("_")[0], run.endswith("_buckets")
    nodes = comfy_setup(comfy_root, work)
    os.environ["LORAENGINE_CHECK_WORK"] = str(work)
    sys.path.insert(0, str(work / "custom_nodes"))
    import loraengine_check_nodes as check_nodes
    from safetensors.torch import load_file

    base = check_nodes.load_tiny(kind)
    patched, out = loader_against_merge(nodes, base, file, diffusers_unet(kind))
    # the training data's loss on one fixed set of draws (8 per latent), each group of
    # one size at a time (one group, or the two buckets)
    if buckets:
        lat_groups, cond_groups = check_nodes.bucket_groups()
        groups = [(lg["samples"], cg) for lg, cg in zip(lat_groups, cond_groups,
                                                         strict=True)]
    else:
        groups = [(load_file(str(work / "input" / f"tiny_{kind}.latent"))["latent_tensor"],
                   check_nodes.TinyConditioning().load(kind)[0])]
    g = torch.Generator().manual_seed(1234)
    per = 8
    sigmas = base.model.model_sampling.sigmas
    draws = []
    for x0, conds in groups:
        idx = torch.randint(0, len(sigmas), (x0.shape[0] * per,), generator=g)
        noise = torch.randn(x0.shape[0] * per, *x0.shape[1:], generator=g)
        draws.append((x0, conds, sigmas[idx], noise))
    losses = {}
    for name, patcher in (("base", check_nodes.load_tiny(kind)), ("trained", patched)):
        patcher.patch_model()
        model = patcher.model
        x0_err, eps_err, count = 0.0, 0.0, 0
        for x0, conds, sigma, noise in draws:
            kwargs: dict[str, list[torch.Tensor]] = {}
            for i, (cond, extras) in enumerate(conds):
                made = model.extra_conds(cross_attn=cond, device=torch.device("cpu"),
                                         noise=x0[i:i + 1], input=x0[i:i + 1],
                                         width=x0.shape[-1] * 8, height=x0.shape[-2] * 8,
                                         **extras)
                for key, value in made.items():
                    kwargs.setdefault(key, []).append(value.cond)
            batched = {k: torch.cat(v).repeat_interleave(per, 0) for k, v in kwargs.items()}
            x = x0.repeat_interleave(per, 0)
            with torch.no_grad():
                noisy = model.model_sampling.noise_scaling(sigma, noise, x)
                denoised = model.apply_model(noisy, sigma, **batched).float()
            eps = (noisy - denoised) / sigma.reshape(-1, 1, 1, 1)
            x0_err += float(((denoised - x) ** 2).sum())
            eps_err += float(((eps - noise) ** 2).sum())
            count += x.numel()
        losses[name] = {"x0_mse": x0_err / count, "eps_mse": eps_err / count,
                        "model_inputs": sorted(batched)}
    out["fixed_draw_loss"] = losses
    return out


def check_v3(comfy_root: Path, work: Path) -> dict:
    """The pack's v3 form alone (a copy whose ``__init__`` exports only
    ``comfy_entrypoint``) through ComfyUI's loader, its inputs as ComfyUI converts the v3
    schema back against the classic ``INPUT_TYPES``, and a short SD1.5 workflow run by
    ComfyUI's executor on the v3 nodes."""
    import asyncio

    sys.path.insert(0, str(Path(__file__).parent))
    from comfyui_node import Server, comfy_setup

    nodes = comfy_setup(comfy_root, work)
    os.environ["LORAENGINE_CHECK_WORK"] = str(work)
    target = work / "custom_nodes_v3" / "loraengine-comfyui"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(ROOT / "integrations" / "comfyui", target)
    (target / "__init__.py").write_text("from .v3 import comfy_entrypoint\n")
    assert asyncio.run(nodes.load_custom_node(str(target))), "v3 pack refused"
    assert asyncio.run(nodes.load_custom_node(
        str(work / "custom_nodes" / "loraengine_check_nodes")))
    import execution
    from comfy_api.latest import io

    sys.path.insert(0, str(ROOT / "integrations"))
    import comfyui as classic_pack  # the classic classes, for comparison

    out: dict = {}
    for node_id, classic in classic_pack.NODE_CLASS_MAPPINGS.items():
        v3 = nodes.NODE_CLASS_MAPPINGS[node_id]
        assert issubclass(v3, io.ComfyNode), node_id
        theirs, ours = v3.INPUT_TYPES(), classic.INPUT_TYPES()
        for group in ("required", "optional"):
            a, b = theirs.get(group, {}), ours.get(group, {})
            assert list(a) == list(b), (node_id, group, list(a), list(b))
            for name in b:
                kind_a, kind_b = a[name][0], b[name][0]
                if isinstance(kind_b, list):  # a choice: v3 writes COMBO + its options
                    kind_a = a[name][1].get("options", kind_a) if kind_a == "COMBO" \
                        else kind_a
                assert kind_a == kind_b, (node_id, name, kind_a, kind_b)
                for key in ("default", "min", "max"):
                    if key in b[name][1]:
                        assert a[name][1].get(key) == b[name][1][key], (node_id, name, key)
        assert tuple(v3.RETURN_TYPES) == tuple(classic.RETURN_TYPES), node_id
        assert bool(v3.INPUT_IS_LIST) == bool(getattr(classic, "INPUT_IS_LIST", False))
        out[node_id] = {"inputs": len(theirs.get("required", {})) + len(theirs.get("optional", {})),
                        "outputs": list(v3.RETURN_TYPES)}
    prompt = workflow("sd15")
    prompt["4"]["inputs"]["steps"] = 4
    for node in prompt.values():
        if "prefix" in node["inputs"]:
            node["inputs"]["prefix"] += "_v3"
    valid = asyncio.run(execution.validate_prompt("v3", prompt, None))
    assert valid[0], valid
    executor = execution.PromptExecutor(Server(), cache_type=False)
    executor.execute(prompt, "v3", {}, valid[2])
    if not executor.success:
        event, data = executor.status_messages[-1]
        sys.exit(f"{event}: {data.get('exception_message')}")
    out["files"] = sorted(p.name for p in (work / "output" / "loras").glob("*_v3_*"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/loraengine_comfyui_server"))
    parser.add_argument("--runs", nargs="+", default=["sd15", "sdxl", "sd15_buckets"])
    parser.add_argument("--check", nargs=2, metavar=("KIND", "FILE"))
    parser.add_argument("--v3", action="store_true", help="only the v3-schema check")
    args = parser.parse_args()
    if args.v3:
        print("RESULT " + json.dumps(check_v3(args.comfyui, args.work)))
        return
    if args.check:
        print("RESULT " + json.dumps(check(args.comfyui, args.work, args.check[0],
                                           Path(args.check[1]))))
        return
    prepare(args.work)
    results = serve_and_run(args.comfyui, args.work, args.runs)
    for kind in args.runs:
        ours = [f for f in results[kind]["files"] if f.startswith(f"server_{kind}_")]
        native = [f for f in results[kind]["files"] if f.startswith("server_native")]
        for label, name in (("ours_saver", ours[-1]), ("comfyui_saver", native[-1])):
            file = args.work / "output" / "loras" / name
            run = subprocess.run([sys.executable, __file__, "--comfyui", str(args.comfyui),
                                  "--work", str(args.work), "--check", kind, str(file)],
                                 capture_output=True, text=True, check=False)
            line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
            if run.returncode or not line:
                sys.exit(f"{kind} check failed\n{run.stderr[-3000:]}")
            results[kind][label] = json.loads(line[-1][7:])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
