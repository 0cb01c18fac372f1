"""The ComfyUI node pack's functions with ComfyUI-shaped values, without ComfyUI.

The stand-in model has ComfyUI's call: ``apply_model(x, sigma, c_crossattn=..., **extra)``
scaling the input by 1/√(σ²+1), calling the network with the timestep ComfyUI's
discrete sampling gives σ (the nearest log-σ) and returning the denoised latent
``x − σ·out``; its ``model_sampling`` holds σ = √((1−ᾱ)/ᾱ) from diffusers' own SD
schedule (an independent source of ᾱ). ComfyUI's real loader and trainer are run on the
pack by ``integrations/comfyui/check_in_comfyui.py`` (docs/comfyui.md); the input list
here is pinned to the one ComfyUI's source declares (``comfyui_trainlora_inputs.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from loraengine.core.errors import ConfigError, DataError
from loraengine.integrations import comfyui as bridge
from loraengine.plugins.models.comfyui import ComfyCall, schedule_of

FIXTURE = Path(__file__).parent / "fixtures" / "interop" / "comfyui_trainlora_inputs.json"
U = 2.0 ** -24  # fp32 unit roundoff


class Cond:
    """ComfyUI's CONDRegular: the tensor under ``.cond``."""

    def __init__(self, cond: torch.Tensor):
        self.cond = cond


class Sampling(nn.Module):
    """ComfyUI's discrete eps sampling (ModelSamplingDiscrete + EPS), σ from diffusers."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        ac = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                           beta_end=0.012).alphas_cumprod
        self.register_buffer("sigmas", ((1 - ac) / ac).sqrt().float())

    @staticmethod
    def _b(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return sigma.reshape(-1, *([1] * (like.ndim - 1)))

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        return latent + noise * self._b(sigma, noise)

    def calculate_input(self, sigma, x):
        return x / (self._b(sigma, x) ** 2 + 1) ** 0.5

    def calculate_denoised(self, sigma, out, x):
        return x - out * self._b(sigma, out)

    def timestep(self, sigma):
        d = sigma.log().reshape(1, -1) - self.sigmas.log().reshape(-1, 1)
        return d.abs().argmin(dim=0)


class Net(nn.Module):
    """A small network with ComfyUI's UNet keywords (``context``, ``y``)."""

    def __init__(self, ctx: int = 16, pooled: int = 0) -> None:
        super().__init__()
        self.dtype = torch.float32
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.proj = nn.Linear(ctx, 8)
        self.time = nn.Linear(1, 8)
        self.add = nn.Linear(pooled, 8) if pooled else None
        self.norm = nn.GroupNorm(2, 8)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)
        self.seen: list[torch.Tensor] = []
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x, timesteps, context=None, y=None, **kwargs):
        self.seen.append(context.detach().clone())
        self.sizes.append((int(x.shape[-2]), int(x.shape[-1])))
        h = self.conv_in(x.to(self.dtype)) + self.proj(context).mean(1)[..., None, None]
        h = h + self.time(timesteps.float()[:, None] / 1000)[..., None, None]
        if self.add is not None:
            h = h + self.add(y)[..., None, None]
        return self.conv_out(torch.nn.functional.silu(self.norm(h)))


class StandIn(nn.Module):
    """ComfyUI's BaseModel as the pack sees it."""

    def __init__(self, pooled: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.diffusion_model = Net(pooled=pooled)
        self.model_sampling = Sampling()

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None,
                    transformer_options=None, **kwargs):
        xc = self.model_sampling.calculate_input(t, x)
        ts = self.model_sampling.timestep(t).float()
        out = self.diffusion_model(xc, ts, context=c_crossattn, **kwargs).float()
        return self.model_sampling.calculate_denoised(t, out, x)

    def extra_conds(self, **kw):
        out = {"c_crossattn": Cond(kw["cross_attn"])}
        if "pooled_output" in kw:
            out["y"] = Cond(kw["pooled_output"])
        return out


def comfy_data(n: int = 4, pooled: int = 0, one_cond: bool = False):
    g = torch.Generator().manual_seed(1)
    latents = {"samples": torch.randn(n, 4, 8, 8, generator=g)}
    rows = 1 if one_cond else n
    positive = []
    for _ in range(rows):
        extras = {"pooled_output": torch.randn(1, pooled, generator=g)} if pooled else {}
        positive.append([torch.randn(1, 5, 16, generator=g), extras])
    return latents, positive


FAST = dict(steps=4, training_dtype="fp32", lora_dtype="fp32", rank=2,
            gradient_checkpointing=False, learning_rate=0.01)


# -- the input list -----------------------------------------------------------------------

def test_inputs_are_train_lora_nodes():
    """Every TrainLoraNode input with its type, default, range, step and choices, in its
    order, as ComfyUI's source declares them (``existing_lora`` over an empty folder)."""
    fixture = json.loads(FIXTURE.read_text())
    ours = bridge.train_lora_input_types([])
    theirs = fixture["inputs"]["required"]
    assert list(ours["required"]) == fixture["order"]["required"]
    for name, spec in theirs.items():
        kind, options = ours["required"][name]
        assert kind == spec["type"], name
        assert {k: v for k, v in options.items() if k != "tooltip"} == spec["options"], name
    assert "optional" not in fixture["inputs"] or not set(fixture["inputs"]["optional"]) \
        - set(ours["optional"])
    # the inputs later releases added, with their defaults (all optional here)
    later = {"quantized_backward": False, "checkpoint_depth": 1, "offloading": False,
             "bucket_mode": False, "bypass_mode": False}
    for name, default in later.items():
        assert ours["optional"][name][1]["default"] == default, name
    # the outputs: TrainLoraNode's without its first (the patched model)
    assert list(bridge.RETURN_TYPES) == fixture["return_types"][1:]
    assert bridge.RETURN_NAMES[::2] == ("lora", "steps")


def test_lists_existing_loras():
    types = bridge.train_lora_input_types(["a.safetensors"])
    assert types["required"]["existing_lora"][0] == ["a.safetensors", bridge.NO_LORA]


def test_node_module_maps_the_three_nodes():
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "integrations"))
    try:
        import comfyui as pack  # the pack folder as ComfyUI imports it
    finally:
        sys.path.pop(0)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS.values()) == {
        "Train LoRA (loraengine)", "Save LoRA (loraengine)", "Load loraengine config"}
    node = pack.NODE_CLASS_MAPPINGS["TrainLoraLoraEngine"]
    assert node.RETURN_TYPES == ("LORA_MODEL", "LOSS_MAP", "INT")
    assert node.INPUT_TYPES()["required"]["existing_lora"][0] == [bridge.NO_LORA]


# -- ComfyUI's sampling in the engine ------------------------------------------------------

def test_schedule_is_comfyuis_sigmas():
    from diffusers import DDPMScheduler

    model = StandIn()
    schedule = schedule_of(model.model_sampling)
    assert schedule.prediction_type == "epsilon"
    want = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012).alphas_cumprod.double()
    # ᾱ went through σ in fp32: relative error of a few u
    assert torch.allclose(schedule.alphas_cumprod, want, rtol=8 * U, atol=0)


def test_prediction_is_the_networks_output_on_comfyuis_input():
    """The engine's x_t times √(1+σ²) is ComfyUI's noisy latent x0 + σ·n; ComfyUI's call
    on it, inverted, gives the network's own output on ComfyUI's scaled input."""
    model = StandIn()
    schedule = schedule_of(model.model_sampling)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 400, 999])
    x_t = schedule.add_noise(x0, noise, t).float()
    sigma = model.model_sampling.sigmas[t]
    comfy_x = model.model_sampling.noise_scaling(sigma, noise, x0)
    b = sigma.reshape(-1, 1, 1, 1)
    assert torch.allclose(x_t * (1 + b**2).sqrt(), comfy_x, rtol=0,
                          atol=float(8 * U * comfy_x.abs().max()))
    ctx = torch.randn(3, 5, 16, generator=g)
    pred = ComfyCall(model, schedule)(model.diffusion_model, x_t, t, {"cond": ctx})
    with torch.no_grad():
        direct = model.diffusion_model(model.model_sampling.calculate_input(sigma, comfy_x),
                                       t.float(), context=ctx)
    # out = (d − x)/(−σ): the rounding of d and x (≤ u·|x|) divided by σ, plus out's own
    bound = 4 * U * (comfy_x.abs() / b + direct.abs()) + 1e-6
    assert ((pred - direct).abs() <= bound).all()


# -- conditioning: one row per latent -----------------------------------------------------

def test_conditioning_pairs_row_i_with_latent_i():
    latents, positive = comfy_data(4)
    samples = bridge.latents_tensor(latents)
    cond = bridge.conditioning_tensors(positive, samples)
    assert cond["cond"].shape == (4, 5, 16)
    for i in range(4):
        assert torch.equal(cond["cond"][i], positive[i][0][0])


def test_conditioning_from_one_batched_entry_and_extras():
    latents, positive = comfy_data(3, pooled=6)
    batched = [[torch.cat([p[0] for p in positive]),
                {"pooled_output": torch.cat([p[1]["pooled_output"] for p in positive])}]]
    samples = bridge.latents_tensor(latents)
    cond = bridge.conditioning_tensors(batched, samples, StandIn(pooled=6).extra_conds)
    assert sorted(cond) == ["cond", "y"] and cond["y"].shape == (3, 6)
    for i in range(3):
        assert torch.equal(cond["y"][i], positive[i][1]["pooled_output"][0])


def test_conditioning_count_mismatch_names_it():
    latents, positive = comfy_data(4)
    with pytest.raises(DataError, match="positive: 3 conditioning rows for 4 latents"):
        bridge.conditioning_tensors(positive[:3], bridge.latents_tensor(latents))
    with pytest.raises(DataError, match="latents: expected a ComfyUI LATENT"):
        bridge.latents_tensor(torch.zeros(1, 4, 8, 8))


# -- widgets -> config ----------------------------------------------------------------------

def test_widgets_become_the_config():
    cfg = bridge.config_from_inputs(bridge.NodeInputs(
        optimizer="RMSprop", loss_function="SmoothL1", algorithm="LoKr",
        algorithm_options="factor: 4", offloading=True, lr_schedule="cosine"))
    assert cfg["optimizer"] == {"name": "rmsprop", "lr": 0.0005}
    assert cfg["loss"] == {"name": "smooth_l1", "target": "x0"}
    assert cfg["adapter"]["algorithm"] == "lokr" and cfg["adapter"]["factor"] == 4
    assert cfg["adapter"]["alpha"] == 1.0 and cfg["adapter"]["exporter"] == "comfyui"
    assert cfg["memory"]["offloading"] is True
    assert cfg["model"] == {"family": "comfyui"}


def test_yaml_config_wins_but_not_over_the_graph():
    cfg = bridge.config_from_inputs(bridge.NodeInputs(steps=16), {
        "training": {"steps": 3}, "model": {"family": "sd15"},
        "data": {"latents": "x.safetensors", "allow_nonfinite": True}})
    assert cfg["training"]["steps"] == 3 and cfg["training"]["batch_size"] == 1
    assert cfg["model"] == {"family": "comfyui"}
    assert cfg["data"] == {"allow_nonfinite": True}


def test_bad_widgets_name_the_input():
    with pytest.raises(ConfigError, match="optimizer: 'Lion' is not one of"):
        bridge.config_from_inputs(bridge.NodeInputs(optimizer="Lion"))
    with pytest.raises(ConfigError, match="algorithm_options: expected a YAML mapping"):
        bridge.config_from_inputs(bridge.NodeInputs(algorithm_options="- 1"))
    with pytest.raises(ConfigError, match="save_every: needs output_folder"):
        bridge.config_from_inputs(bridge.NodeInputs(save_every=2))


def test_load_config_checks_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  steps: 7\n")
    assert bridge.load_config_text("optimizer:\n  lr: 0.001\n", path) == {
        "training": {"steps": 7}, "optimizer": {"lr": 0.001}}
    with pytest.raises(ConfigError, match="trainig"):
        bridge.load_config_text("trainig:\n  steps: 7\n")


# -- a run ----------------------------------------------------------------------------------

def test_train_returns_comfyuis_three_outputs():
    model = StandIn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    latents, positive = comfy_data(4)
    ticks: list[tuple[int, int]] = []
    out = bridge.train_lora(model, latents, positive, bridge.NodeInputs(**FAST),
                            progress=lambda s, n: ticks.append((s, n)))
    lora, loss_map, steps = out.lora, out.loss_map, out.steps
    assert isinstance(lora, dict) and isinstance(steps, int) and steps == 4
    assert ticks == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len(loss_map["loss"]) == 4 and all(isinstance(v, float) for v in loss_map["loss"])
    # ComfyUI's keys: diffusion_model.<the network's own path>.<param>
    assert lora["diffusion_model.proj.lora_down.weight"].shape == (2, 16)
    assert lora["diffusion_model.proj.lora_up.weight"].shape == (8, 2)
    assert lora["diffusion_model.conv_in.lora_down.weight"].shape == (2, 4, 3, 3)
    assert lora["diffusion_model.norm.diff"].shape == (8,)
    assert lora["diffusion_model.proj.diff_b"].shape == (8,)
    assert float(lora["diffusion_model.proj.alpha"]) == 1.0
    assert all(v.dtype == torch.float32 for v in lora.values())
    assert lora.metadata["loraengine.algorithm"] == "lora"
    # trained: the up factors moved off zero; the model came back as it was
    assert lora["diffusion_model.proj.lora_up.weight"].abs().sum() > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # every context the network saw is one caption's rows, never an average
    rows = torch.cat([p[0] for p in positive])
    for ctx in model.diffusion_model.seen:
        for row in ctx:
            assert any(torch.equal(row, r) for r in rows)


def test_loss_falls_on_one_sample():
    model = StandIn()
    latents, positive = comfy_data(1)
    out = bridge.train_lora(model, latents, positive, bridge.NodeInputs(
        **{**FAST, "steps": 30, "learning_rate": 0.05, "loss_target": "native"}))
    losses = out.loss_map["loss"]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


def test_resume_continues_exactly(tmp_path):
    latents, positive = comfy_data(4)
    straight = bridge.train_lora(StandIn(), latents, positive, bridge.NodeInputs(**FAST))
    first = bridge.NodeInputs(**{**FAST, "steps": 2}, output_folder=tmp_path, save_every=2)
    bridge.train_lora(StandIn(), latents, positive, first)
    again = bridge.NodeInputs(**FAST, output_folder=tmp_path, save_every=2)
    resumed = bridge.train_lora(StandIn(), latents, positive, again)
    assert resumed.steps == 4
    assert resumed.loss_map["loss"][2:] == straight.loss_map["loss"][2:]
    for k, v in straight.lora.items():
        assert torch.equal(resumed.lora[k], v), k


def test_save_lora_writes_keys_and_metadata(tmp_path):
    from safetensors import safe_open

    latents, positive = comfy_data(2)
    out = bridge.train_lora(StandIn(), latents, positive,
                            bridge.NodeInputs(**{**FAST, "steps": 1}))
    path = bridge.save_lora_file(out.lora, tmp_path / "x.safetensors", steps=out.steps)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(out.lora)
        meta = f.metadata()
    assert meta["loraengine.steps"] == "1" and meta["loraengine.format"] == "comfyui"
    assert meta["ss_network_dim"] == "2"


def test_nonfinite_data_is_refused_naming_the_sample():
    latents, positive = comfy_data(2)
    latents["samples"][1, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="latents"):
        bridge.train_lora(StandIn(), latents, positive, bridge.NodeInputs(**FAST))


class VSampling(Sampling):
    """ComfyUI's V_PREDICTION: denoised = x/(σ²+1) − out·σ/√(σ²+1)."""

    def calculate_denoised(self, sigma, out, x):
        b = self._b(sigma, out)
        return x / (b**2 + 1) - out * b / (b**2 + 1) ** 0.5


class FlowSampling(nn.Module):
    """ComfyUI's CONST (rectified flow) with a shift."""

    shift, multiplier = 3.0, 1000.0

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        b = sigma.reshape(-1, *([1] * (noise.ndim - 1)))
        return b * noise + (1 - b) * latent

    def calculate_denoised(self, sigma, out, x):
        return x - out * sigma.reshape(-1, *([1] * (out.ndim - 1)))


class X0Sampling(Sampling):
    def calculate_denoised(self, sigma, out, x):
        return out


def test_prediction_kind_is_read_from_comfyuis_maps():
    assert schedule_of(VSampling()).prediction_type == "v_prediction"
    flow = schedule_of(FlowSampling())
    assert flow.is_flow and flow.shift == 3.0 and flow.timestep_scale == 1000.0
    with pytest.raises(ConfigError, match="X0Sampling is none of eps, v-prediction"):
        schedule_of(X0Sampling())


def test_v_prediction_is_the_engines_v():
    """With ComfyUI's V map, the network's output inverted from ComfyUI's denoised is
    the engine's v = √ᾱ·ε − √(1−ᾱ)·x0 when the network predicts that v."""
    model = StandIn()
    model.model_sampling = VSampling()
    schedule = schedule_of(model.model_sampling)
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    target = schedule.target(x0, noise, t).float()

    class Oracle(nn.Module):  # outputs the true v for these samples
        dtype = torch.float32

        def forward(self, x, timesteps, context=None, **kw):
            return target

    model.diffusion_model = Oracle()
    x_t = schedule.add_noise(x0, noise, t).float()
    pred = ComfyCall(model, schedule)(model.diffusion_model, x_t, t,
                                      {"cond": torch.zeros(2, 1, 16)})
    # out = (d − c_i·x)/c_o: fp32 rounding of d and c_i·x (a few u·|x|) over |c_o| =
    # σ/√(1+σ²), plus the output's own rounding
    sigma = model.model_sampling.sigmas[t].double()
    c_o = sigma / (1 + sigma**2).sqrt()
    x = x_t.double() * (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()
    bound = float(8 * U * (x.abs().max() / c_o.min() + target.abs().max()))
    assert float((pred - target).abs().max()) <= bound
    # and the clean latent the engine derives from it is x0
    x0_back = schedule.predicted_x0(pred.double(), x_t.double(), t).float()
    assert float((x0_back - x0).abs().max()) <= 4 * bound


def test_family_names_what_the_model_lacks():
    from loraengine.plugins.models.comfyui import load

    with pytest.raises(ConfigError, match="without diffusion_model, model_sampling"):
        load(None, {"module": nn.Linear(1, 1)})


def test_validation_latents_give_a_validation_loss():
    latents, positive = comfy_data(2)
    val_latents, val_positive = comfy_data(2)
    out = bridge.train_lora(StandIn(), latents, positive,
                            bridge.NodeInputs(**FAST, validation_every=2),
                            validation_latents=val_latents,
                            validation_positive=val_positive)
    assert out.loss_map["val_loss_step"] == [2, 4]
    assert len(out.loss_map["val_loss"]) == 2
    with pytest.raises(DataError, match="validation_positive: needed"):
        bridge.train_lora(StandIn(), latents, positive, bridge.NodeInputs(**FAST),
                          validation_latents=val_latents)


# -- bucket_mode: one LATENT per bucket (ComfyUI's ResolutionBucket output) ----------------

def bucketed_data(sizes=((3, 8, 8), (2, 8, 12)), pooled: int = 0):
    """ResolutionBucket's outputs as a list-input node receives them: one LATENT
    ``[B_i,4,H_i,W_i]`` per bucket and one CONDITIONING per bucket (B_i entries)."""
    g = torch.Generator().manual_seed(2)
    latents, positive = [], []
    for n, h, w in sizes:
        latents.append({"samples": torch.randn(n, 4, h, w, generator=g)})
        entries = []
        for _ in range(n):
            extras = {"pooled_output": torch.randn(1, pooled, generator=g)} if pooled else {}
            entries.append([torch.randn(1, 5, 16, generator=g), extras])
        positive.append(entries)
    return latents, positive


def test_bucket_mode_draws_each_batch_within_one_size_with_its_own_captions():
    model = StandIn()
    latents, positive = bucketed_data()
    out = bridge.train_lora(model, latents, positive, bridge.NodeInputs(
        **{**FAST, "steps": 8, "batch_size": 2}, bucket_mode=True))
    assert out.steps == 8 and len(out.loss_map["loss"]) == 8
    assert out.lora["diffusion_model.proj.lora_up.weight"].abs().sum() > 0
    net = model.diffusion_model
    seen_sizes = set(net.sizes)
    assert seen_sizes <= {(8, 8), (8, 12)} and len(seen_sizes) == 2  # both buckets drawn
    captions = {size: torch.cat([e[0] for e in cond]) for size, cond in
                zip([(8, 8), (8, 12)], positive, strict=True)}
    for size, ctx in zip(net.sizes, net.seen, strict=True):
        assert ctx.shape[0] <= 2
        for row in ctx:  # a caption of that bucket's latents, never another's
            assert any(torch.equal(row, r) for r in captions[size]), size


def test_bucket_tensors_pair_rows_in_order_and_build_inputs_for_each_size():
    latents, positive = bucketed_data(pooled=3)
    made: list[tuple[int, int]] = []

    def extra_conds(**kw):
        made.append((kw["width"], kw["height"]))
        size = torch.tensor([[float(kw["width"]), float(kw["height"])]])
        return {"c_crossattn": Cond(kw["cross_attn"]),
                "y": Cond(torch.cat([kw["pooled_output"], size], 1))}

    parts = bridge.latent_list(latents)
    lat, cond = bridge.bucket_tensors(parts, positive, extra_conds)
    assert sorted(lat) == ["latents.0", "latents.1"]
    assert torch.equal(lat["latents.1"], latents[1]["samples"])
    assert sorted(cond) == ["cond.0", "cond.1", "y.0", "y.1"]
    assert torch.equal(cond["cond.1"][1], positive[1][1][0][0])
    assert torch.equal(cond["y.0"][2, :3], positive[0][2][1]["pooled_output"][0])
    # the size inputs are those of each bucket's latents (pixels = 8 x latent)
    assert cond["y.0"][:, 3:].tolist() == [[64.0, 64.0]] * 3
    assert cond["y.1"][:, 3:].tolist() == [[96.0, 64.0]] * 2
    # one conditioning for every latent of every bucket: one row each, which the
    # engine's dataset repeats for every latent of the bucket
    _, one = bridge.bucket_tensors(parts, [positive[0][0]], None)
    assert one["cond.0"].shape == (1, 5, 16) and one["cond.1"].shape == (1, 5, 16)
    assert torch.equal(one["cond.1"][0], positive[0][0][0][0])


def test_bucket_mode_count_mismatch_and_mixed_sizes_without_it_name_them():
    latents, positive = bucketed_data()
    with pytest.raises(DataError, match=r"positive: 4 conditioning rows for 5 latents in "
                                        r"2 buckets \(3, 2\)"):
        bridge.bucket_tensors(bridge.latent_list(latents), positive[0] + positive[1][:1])
    with pytest.raises(DataError, match="latents: 2 LATENTs of 2 sizes .*turn on "
                                        "bucket_mode"):
        bridge.train_lora(StandIn(), latents, positive, bridge.NodeInputs(**FAST))


def test_latents_of_one_size_in_a_list_are_one_set():
    latents, positive = bucketed_data(((2, 8, 8), (3, 8, 8)))
    model = StandIn()
    out = bridge.train_lora(model, latents, positive, bridge.NodeInputs(**FAST))
    assert out.steps == 4
    assert bridge.latent_list(latents)[1].shape == (3, 4, 8, 8)
    assert len(bridge.flat_conditioning(positive)) == 5


def test_node_takes_comfyuis_list_inputs():
    """The node has INPUT_IS_LIST (as ComfyUI's Train LoRA): ComfyUI hands it every
    input as a list; widgets are single values, data inputs lists of LATENTs."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "integrations"))
    try:
        import comfyui as pack
    finally:
        sys.path.pop(0)
    node = pack.NODE_CLASS_MAPPINGS["TrainLoraLoraEngine"]
    assert node.INPUT_IS_LIST is True

    class Patcher:  # ComfyUI's ModelPatcher: clone() and the BaseModel under .model
        def __init__(self) -> None:
            self.model = StandIn()

        def clone(self):
            return self

    latents, positive = bucketed_data()
    widgets = {k: [v] for k, v in {**FAST, "steps": 2, "bucket_mode": True}.items()}
    lora, loss_map, steps = node().train(model=[Patcher()], latents=latents,
                                         positive=positive, existing_lora=[bridge.NO_LORA],
                                         **widgets)
    assert steps == 2 and len(loss_map["loss"]) == 2
    assert lora["diffusion_model.proj.lora_down.weight"].shape == (2, 16)
    with pytest.raises(ConfigError, match="steps: got 2 values; this input takes one"):
        bridge.unwrap_list_inputs({"steps": [2, 3]})


def test_bucket_mode_resumes_exactly(tmp_path):
    latents, positive = bucketed_data()
    fast = {**FAST, "batch_size": 2}
    straight = bridge.train_lora(StandIn(), latents, positive,
                                 bridge.NodeInputs(**fast, bucket_mode=True))
    first = bridge.NodeInputs(**{**fast, "steps": 2}, bucket_mode=True,
                              output_folder=tmp_path, save_every=2)
    bridge.train_lora(StandIn(), latents, positive, first)
    again = bridge.NodeInputs(**fast, bucket_mode=True, output_folder=tmp_path,
                              save_every=2)
    resumed = bridge.train_lora(StandIn(), latents, positive, again)
    assert resumed.steps == 4
    assert resumed.loss_map["loss"][2:] == straight.loss_map["loss"][2:]
    for k, v in straight.lora.items():
        assert torch.equal(resumed.lora[k], v), k


def test_an_apply_model_answer_of_another_shape_is_refused():
    # ComfyUI's denoised output is combined with x by broadcasting: a model that answers
    # for the first row only must stop the run, not train on a broadcast loss
    from loraengine.core.errors import LoraEngineError

    class FirstRow(StandIn):
        def apply_model(self, x, t, **kw):
            return super().apply_model(x, t, **kw)[:1]

    with pytest.raises(LoraEngineError) as err:
        bridge.train_lora(FirstRow(), *comfy_data(4), bridge.NodeInputs(**{**FAST,
                                                                           "batch_size": 2}))
    assert str(err.value).startswith("the ComfyUI model's apply_model returned a prediction "
                                     "of shape [1, 4, 8, 8]; it must be a floating-point "
                                     "tensor of the noisy input's shape [2, 4, 8, 8]")


@pytest.mark.parametrize(("change", "message"), [
    (dict(algorithm_options="exporter: diffusers"),
     "algorithm_options: 'exporter' is set by the node (ComfyUI's keys); this field takes "
     "the algorithm's own options"),
    (dict(algorithm_options="algorithm: loha"),
     "algorithm_options: 'algorithm' is set by the algorithm widget; this field takes the "
     "algorithm's own options"),
    (dict(optimizer=["AdamW"]), "optimizer: ['AdamW'] is not one of "),
    (dict(algorithm_options="a: " + "[" * 200 + "]" * 200),
     "algorithm_options:1: nested deeper than "),
])
def test_widget_values_that_cannot_work_name_the_input(change, message):
    with pytest.raises(ConfigError) as err:
        bridge.config_from_inputs(bridge.NodeInputs(**{**FAST, **change}))
    assert str(err.value).startswith(message), str(err.value)


def test_the_config_input_keeps_comfyuis_keys_and_takes_yaml_text():
    with pytest.raises(ConfigError, match=r"^config: adapter.exporter: 'kohya' would give "):
        bridge.config_from_inputs(bridge.NodeInputs(**FAST), {"adapter": {"exporter": "kohya"}})
    with pytest.raises(ConfigError, match=r"^config: data: expected a mapping of data "
                                          r"options, got str$"):
        bridge.config_from_inputs(bridge.NodeInputs(**FAST), {"data": "x"})
    cfg = bridge.config_from_inputs(bridge.NodeInputs(**FAST), "training: {steps: 7}")
    assert cfg["training"]["steps"] == 7


def test_load_config_names_a_folder_or_a_file_that_is_not_text(tmp_path):
    with pytest.raises(ConfigError, match=r"is a folder, not a config file$"):
        bridge.load_config_text("", tmp_path)
    binary = tmp_path / "c.yaml"
    binary.write_bytes(b"\xff\xfe training: {}")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0\)$"):
        bridge.load_config_text("", binary)


@pytest.mark.parametrize(("extras", "message"), [
    ([1, 2], "positive: entry 0's second item is list; it must be the dict of the "
             "conditioning's extras"),
    ("x", "positive: entry 0's second item is str; it must be the dict of the "
          "conditioning's extras"),
])
def test_conditioning_extras_that_are_no_dict_are_named(extras, message):
    latents, _ = comfy_data(2)
    with pytest.raises(DataError) as err:
        bridge.train_lora(StandIn(), latents, [[torch.randn(2, 5, 16), extras]],
                          bridge.NodeInputs(**FAST))
    assert str(err.value) == message


def test_save_lora_names_a_bad_entry_and_stores_shared_tensors(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "s.safetensors"
    with pytest.raises(DataError, match=r"^lora: a.alpha is float; a LORA_MODEL maps key "):
        bridge.save_lora_file({"a.alpha": 1.0}, path)
    with pytest.raises(DataError, match=r"^lora: key 5 is int; "):
        bridge.save_lora_file({5: torch.ones(1)}, path)
    assert not path.exists()
    alpha = torch.tensor(2.0)  # one tensor under two keys, as a state dict may hold it
    bridge.save_lora_file({"a.alpha": alpha, "b.alpha": alpha}, path)
    saved = load_file(str(path))
    assert sorted(saved) == ["a.alpha", "b.alpha"]
    assert all(torch.equal(v, alpha) for v in saved.values())


def test_a_failing_progress_callback_is_named_as_one():
    from loraengine.core.errors import PluginFailed

    def cancel(step, total):
        raise RuntimeError("user pressed cancel")

    with pytest.raises(PluginFailed) as err:
        bridge.train_lora(StandIn(), *comfy_data(4), bridge.NodeInputs(**FAST), progress=cancel)
    assert str(err.value) == ("plugin 'ProgressCallback' (distribution 'unknown') failed in "
                              "loraengine_on_step_end: RuntimeError: user pressed cancel")


@pytest.mark.parametrize(("latent", "got"), [
    ({"samples": [[1.0]]}, "a dict whose 'samples' is list"),
    ({"samples": None}, "a dict whose 'samples' is NoneType"),
    ({"noise_mask": torch.ones(1)}, "dict without 'samples'"),
    (torch.ones(1, 4, 8, 8), "Tensor"),
])
def test_a_latent_without_a_samples_tensor_says_what_came(latent, got):
    with pytest.raises(DataError) as err:
        bridge.latents_tensor(latent)
    assert str(err.value) == ("latents: expected a ComfyUI LATENT, a dict with a 'samples' "
                              f"tensor; got {got}")
