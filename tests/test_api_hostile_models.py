"""What the trainer does with a model that misbehaves: a prediction of the wrong shape
or type is refused at the first step with its shapes (never broadcast into the loss), and
a run whose every step was non-finite writes no file, so an earlier good LoRA of the same
name survives."""

from __future__ import annotations

import hashlib

import pytest
import torch

import loraengine
from loraengine.core.errors import LoraEngineError, NonFiniteError
from loraengine.testing.harness import tiny_data, tiny_train_config
from loraengine.testing.models import TinyDenoiser


class _NaN(TinyDenoiser):
    def forward(self, x, t, c):
        return super().forward(x, t, c) * float("nan")


class _FirstRowOnly(TinyDenoiser):
    def forward(self, x, t, c):
        return super().forward(x, t, c)[:1]


class _Pooled(TinyDenoiser):
    def forward(self, x, t, c):
        return super().forward(x, t, c).mean(dim=(2, 3), keepdim=True)


class _Pair(TinyDenoiser):
    def forward(self, x, t, c):
        return super().forward(x, t, c), None


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("steps", [3, 6])  # under and over training.max_bad_steps (5)
def test_an_all_nan_run_writes_nothing_and_keeps_the_earlier_file(tmp_path, steps):
    data = tiny_data()
    cfg = tiny_train_config({"training": {"steps": steps},
                             "output": {"dir": str(tmp_path), "plot": False}})
    loraengine.train(cfg, model=TinyDenoiser(), latents=data.latents,
                     conditioning=data.conditioning)
    lora = tmp_path / "lora.safetensors"
    before = _md5(lora), (tmp_path / "lora.loss.json").read_bytes()
    shown = steps if steps < 5 else 5  # the watchdog stops at the fifth in a row
    with pytest.raises(NonFiniteError) as err:
        loraengine.train(cfg, model=_NaN(), latents=data.latents,
                         conditioning=data.conditioning)
    assert str(err.value) == (
        f"every step (1-{shown}) was non-finite and skipped, so the adapter learned "
        f"nothing and no file is written; {lora} is left as it was (check the model's "
        "output, the data and optimizer.lr)")
    assert (_md5(lora), (tmp_path / "lora.loss.json").read_bytes()) == before


@pytest.mark.parametrize(("model", "problem"), [
    (_FirstRowOnly, "a prediction of shape [1, 4, 8, 8]"),
    (_Pooled, "a prediction of shape [2, 4, 1, 1]"),
])
def test_a_prediction_of_another_shape_is_refused_naming_both(model, problem):
    data = tiny_data()
    cfg = tiny_train_config({"training": {"batch_size": 2}})
    with pytest.raises(LoraEngineError) as err:
        loraengine.train(cfg, model=model(), latents=data.latents,
                         conditioning=data.conditioning)
    assert str(err.value) == (f"the model returned {problem}; it must be a floating-point "
                              "tensor of the noisy input's shape [2, 4, 8, 8], one value "
                              "per latent element")


def test_a_forward_that_returns_no_tensor_is_refused():
    data = tiny_data()
    with pytest.raises(LoraEngineError) as err:
        loraengine.train(tiny_train_config({"training": {"batch_size": 2}}), model=_Pair(),
                         latents=data.latents, conditioning=data.conditioning)
    assert str(err.value) == ("the model returned tuple, not a tensor: it must return its "
                              "prediction for x_t [2, 4, 8, 8]")


def test_the_shape_check_leaves_a_correct_model_training():
    data = tiny_data()
    torch.manual_seed(0)
    result = loraengine.train(tiny_train_config({"training": {"steps": 4}}),
                              model=TinyDenoiser(), latents=data.latents,
                              conditioning=data.conditioning)
    assert result.steps == 4 and not any(result.loss_map["skipped"])


class _Detached(TinyDenoiser):
    def forward(self, x, t, c):
        return super().forward(x, t, c).detach()


def test_a_detached_prediction_is_refused():
    data = tiny_data()
    with pytest.raises(LoraEngineError) as err:
        loraengine.train(tiny_train_config(), model=_Detached(), latents=data.latents,
                         conditioning=data.conditioning)
    assert str(err.value) == ("the model returned a prediction that no gradient reaches the "
                              "adapter through: its forward detaches its output or runs "
                              "under torch.no_grad/inference_mode")


def test_conditioning_that_does_not_fit_the_model_names_the_shapes():
    data = tiny_data()
    narrow = data.conditioning[..., :5]  # the model's cross-attention takes 8 wide
    with pytest.raises(LoraEngineError) as err:
        loraengine.train(tiny_train_config(), model=TinyDenoiser(), latents=data.latents,
                         conditioning=narrow)
    message = str(err.value)
    assert message.startswith("the model's forward failed on x_t [2, 4, 8, 8] with cond "
                              "[2, 3, 5] float32: RuntimeError: "), message
    assert message.endswith("(does the data fit the model?)")


def test_what_no_run_can_use_is_refused_naming_the_argument():
    from loraengine.core.errors import ConfigError, DataError

    data = tiny_data()
    with pytest.raises(ConfigError, match=r"^model: expected a torch.nn.Module called as "
                                          r"model\(x_t, t, cond\), got function$"):
        loraengine.train(tiny_train_config(), model=lambda x, t, c: x, latents=data.latents,
                         conditioning=data.conditioning)
    with torch.inference_mode():
        frozen = TinyDenoiser()
    with pytest.raises(ConfigError, match=r"^model: \S+ is an inference tensor \(made under "
                                          r"torch.inference_mode\)"):
        loraengine.train(tiny_train_config(), model=frozen, latents=data.latents,
                         conditioning=data.conditioning)
    meta = torch.empty(data.latents.shape, device="meta")
    with pytest.raises(DataError, match=r"^latents: a tensor on the meta device holds no "
                                        r"values to train on$"):
        loraengine.train(tiny_train_config(), model=TinyDenoiser(), latents=meta,
                         conditioning=data.conditioning)


def test_two_d_conditioning_with_a_row_per_latent_is_warned_about():
    from loraengine.core.data import DataWarning

    data = tiny_data()  # 6 latents
    pooled = data.conditioning[:, 0]  # [6, 8]: looks like one vector per latent
    with pytest.warns(DataWarning, match=r"tensor 'cond' \[6, 8\] is 2-D, read as one "
                                         r"sequence of 6 tokens shared by every latent; "
                                         r"for one embedding per latent give \[N,1,D\]"):
        loraengine.train(tiny_train_config(), model=TinyDenoiser(), latents=data.latents,
                         conditioning=pooled)


def test_apply_refuses_a_non_finite_adapter_or_strength(tmp_path):
    from safetensors.torch import load_file, save_file

    from loraengine.core.errors import ConfigError, DataError

    data = tiny_data()
    cfg = tiny_train_config({"output": {"dir": str(tmp_path), "plot": False}})
    path = loraengine.train(cfg, model=TinyDenoiser(), latents=data.latents,
                            conditioning=data.conditioning).path
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if "lora_up" in k)[0]
    tensors[key][0] = float("inf")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    model = TinyDenoiser()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("bypass", "merge"):
        with pytest.raises(DataError) as err:
            loraengine.apply(model, bad, mode=mode)
        assert str(err.value) == (f"{bad}: tensor {key!r} holds NaN or inf values; the "
                                  "adapter is not applied")
    with pytest.raises(ConfigError, match=r"^strength: must be a finite number, got nan$"):
        loraengine.apply(model, path, strength=float("nan"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())


def test_settings_that_change_nothing_are_warned_about(tmp_path):
    import warnings

    data = tiny_data()
    cfg = tiny_train_config({
        "training": {"steps": 3},
        "output": {"dir": str(tmp_path), "plot": False, "save_every": 100},
        "lr_scheduler": {"name": "linear", "warmup_steps": 3},
        "early_stop": {"min_delta": 0.5}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loraengine.train(cfg, model=TinyDenoiser(), latents=data.latents,
                         conditioning=data.conditioning)
    said = [str(w.message) for w in caught]
    for line in ("output.save_every: 100 is more than training.steps (3); no checkpoint is "
                 "written",
                 "early_stop.min_delta: has no effect without early_stop.patience",
                 "lr_scheduler.warmup_steps: 3 is not below training.steps (3); the rate "
                 "never reaches optimizer.lr"):
        assert line in said, said
    assert not (tmp_path / "lora.checkpoints").exists()
