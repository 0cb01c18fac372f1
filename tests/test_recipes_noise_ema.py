"""Noise offset and input perturbation against their formulas, drawn per sample from the
seeded noise stream; the EMA of the adapter weights after k updates, its file, and the
``recipe`` section's validation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import loraengine
from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.errors import ConfigError
from loraengine.core.files import read_metadata
from loraengine.core.seeding import make_generator
from loraengine.core.train.loop import Trainer
from loraengine.testing.models import TinyDenoiser, tiny_conditioning, tiny_latents

SEED = 5


def config(host, recipe: dict | None = None, **extra):
    data = {"model": {"family": "module"},
            "training": {"steps": 4, "batch_size": 2, "dtype": "fp32", "seed": SEED},
            "optimizer": {"name": "adamw", "lr": 0.01},
            "adapter": {"rank": 2, "dtype": "fp32"},
            "memory": {"gradient_checkpointing": False}, **extra}
    if recipe is not None:
        data["recipe"] = recipe
    return parse_config(data, host.registry)


def trainer(host, recipe: dict | None = None, write_files: bool = False, **extra) -> Trainer:
    pipe = build_pipeline(config(host, recipe, **extra), host, model=TinyDenoiser(),
                          latents=tiny_latents(), conditioning=tiny_conditioning())
    return Trainer(pipe, write_files=write_files)


X0 = tiny_latents()[:4]
SHAPE = X0.shape[1:]  # [C, H, W]


def test_recipes_are_off_by_default(host):
    tr = trainer(host)
    assert tr.pipe.recipes == []
    noise, t, xt_noise = tr._noise_and_timesteps(X0)
    assert torch.equal(noise, xt_noise)


def test_noise_offset_adds_one_offset_per_channel(host):
    noise, t, xt_noise = trainer(host, {"noise_offset": 0.1})._noise_and_timesteps(X0)
    g = make_generator(SEED, "noise")
    for i in range(4):  # per sample: noise, timestep, then the channel offsets
        eps = torch.randn(SHAPE, generator=g)
        assert int(t[i]) == int(torch.randint(0, 1000, (), generator=g))
        offset = torch.randn(SHAPE[0], generator=g)
        want = eps + 0.1 * offset[:, None, None]
        torch.testing.assert_close(noise[i], want)
        torch.testing.assert_close(xt_noise[i], want)  # x_t and target share it


def test_noise_offset_random_strength_draws_a_uniform_first(host):
    noise, _, _ = trainer(host, {"noise_offset": 0.2, "noise_offset_random_strength": True}
                          )._noise_and_timesteps(X0[:2])
    g = make_generator(SEED, "noise")
    for i in range(2):
        eps = torch.randn(SHAPE, generator=g)
        torch.randint(0, 1000, (), generator=g)
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        offset = torch.randn(SHAPE[0], generator=g)
        torch.testing.assert_close(noise[i], eps + 0.2 * u * offset[:, None, None])


def test_input_perturbation_changes_x_t_but_not_the_target(host):
    noise, _, xt_noise = trainer(host, {"noise_offset": 0.1, "input_perturbation": 0.3}
                                 )._noise_and_timesteps(X0)
    g = make_generator(SEED, "noise")
    for i in range(4):  # offset first (order 10), then the perturbation (order 20)
        eps = torch.randn(SHAPE, generator=g)
        torch.randint(0, 1000, (), generator=g)
        eps = eps + 0.1 * torch.randn(SHAPE[0], generator=g)[:, None, None]
        xi = torch.randn(SHAPE, generator=g)
        torch.testing.assert_close(noise[i], eps)
        torch.testing.assert_close(xt_noise[i], eps + 0.3 * xi)


def test_tweaked_draws_of_one_batch_equal_those_of_smaller_batches(host):
    recipe = {"noise_offset": 0.1, "noise_offset_random_strength": True,
              "input_perturbation": 0.2, "input_perturbation_random_strength": True}
    whole = trainer(host, recipe)._noise_and_timesteps(X0)
    halves = trainer(host, recipe)
    first, second = halves._noise_and_timesteps(X0[:2]), halves._noise_and_timesteps(X0[2:])
    for a, b, c in zip(whole, first, second, strict=True):
        torch.testing.assert_close(a, torch.cat([b, c]))


def test_noise_tweaks_leave_the_global_rng_alone(host):
    tr = trainer(host, {"noise_offset": 0.1, "input_perturbation": 0.1})
    torch.manual_seed(0)
    state = torch.get_rng_state()
    tr.step()
    assert torch.equal(torch.get_rng_state(), state)


def test_input_perturbation_reaches_the_model_input(host):
    """x_t is built from the perturbed noise: the same step with and without it differs,
    and the loss without it matches a run with perturbation 0."""
    with torch.no_grad():
        a = float(trainer(host).micro_step(torch.tensor([0, 1])))
        b = float(trainer(host, {"input_perturbation": 0.0}).micro_step(torch.tensor([0, 1])))
        c = float(trainer(host, {"input_perturbation": 0.5}).micro_step(torch.tensor([0, 1])))
    assert a == b and c != a


# -- EMA --------------------------------------------------------------------------------

class Recorder:
    """Keeps the adapter weights at the start and after every optimizer step."""

    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []

    def _take(self, run) -> None:
        self.weights.append([p.detach().clone() for p in run.network.parameters()
                             if p.requires_grad])

    @loraengine.hookimpl
    def loraengine_on_train_start(self, run) -> None:
        self._take(run)

    @loraengine.hookimpl
    def loraengine_on_step_end(self, run, step, metrics) -> None:
        self._take(run)


def expected_average(weights: list[list[torch.Tensor]], decays: dict[int, float]
                     ) -> list[torch.Tensor]:
    """avg_0 = θ_0; after step k (1-based) in ``decays``: avg = d·avg + (1 - d)·θ_k."""
    avg = [w.clone() for w in weights[0]]
    for k, d in decays.items():
        avg = [d * a + (1 - d) * w for a, w in zip(avg, weights[k], strict=True)]
    return avg


@pytest.mark.parametrize("ema,decays", [
    ({"decay": 0.6}, {1: 0.6, 2: 0.6, 3: 0.6, 4: 0.6}),
    ({"decay": 0.6, "every": 2, "on_cpu": True}, {2: 0.6, 4: 0.6}),
    ({"decay": 0.99, "warmup": True}, {1: 1 / 10, 2: 2 / 11, 3: 3 / 12, 4: 4 / 13}),
])
def test_ema_after_k_updates_and_its_file(host, tmp_path, ema, decays):
    rec = Recorder()
    host.register(rec, name="recorder")
    tr = trainer(host, {"ema": ema}, write_files=True,
                 output={"dir": str(tmp_path), "name": "run", "plot": False})
    result = tr.run()
    (recipe,) = tr.pipe.recipes
    want = expected_average(rec.weights, decays)
    for got, w in zip(recipe.average, want, strict=True):
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)
    assert recipe.updates == len(decays)
    # the file holds the average, through the exporter's keys; the LoRA holds the weights
    ema_path = tmp_path / "run.ema.safetensors"
    assert result.files["ema"] == ema_path
    saved = load_file(str(ema_path))
    final = {k: v.clone() for k, v in tr.lora_tensors().items()}
    with torch.no_grad():
        for p, avg in zip(tr.pipe.trainable_parameters(), recipe.average, strict=True):
            p.copy_(avg)
    averaged = tr.lora_tensors()
    assert saved.keys() == averaged.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], averaged[k], rtol=0, atol=0)
    lora = load_file(str(result.path))
    for k in lora:
        torch.testing.assert_close(lora[k], final[k], rtol=0, atol=0)
    assert any(not torch.equal(lora[k], saved[k]) for k in lora)
    assert read_metadata(ema_path)["loraengine.steps"] == "4"


def test_ema_state_round_trips(host):
    tr = trainer(host, {"ema": {"decay": 0.5, "every": 3}})
    tr.step()
    tr.step()
    (ema,) = tr.pipe.recipes
    state = ema.state_dict()
    other = trainer(host, {"ema": {"decay": 0.5, "every": 3}}).pipe.recipes[0]
    other.load_state_dict(state)
    assert (other.steps, other.updates) == (2, 0)
    for a, b in zip(other.average, ema.average, strict=True):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_skipped_steps_do_not_update_the_ema(host, monkeypatch):
    from loraengine.core.train import step

    tr = trainer(host, {"ema": {"decay": 0.5}})
    original = step.micro_step
    monkeypatch.setattr(step, "micro_step",
                        lambda *args, **kw: original(*args, **kw) * float("nan"))
    metrics = tr.step()
    assert metrics["skipped"] == 1.0
    assert tr.pipe.recipes[0].steps == 0


@pytest.mark.parametrize("recipe,message", [
    ({"ema": {"decay": 0.9, "beta": 1}}, "recipe.ema.beta: unknown key"),
    ({"ema": {"decay": 1.0}}, "recipe.ema.decay: Input should be less than 1"),
    ({"noise_ofset": 0.1}, "recipe.noise_ofset: unknown key"),
    ({"noise_offset": -0.1}, "recipe.noise_offset: Input should be greater than or equal"),
])
def test_recipe_options_are_validated(host, recipe, message):
    with pytest.raises(ConfigError) as err:
        config(host, recipe)
    assert message in str(err.value)
