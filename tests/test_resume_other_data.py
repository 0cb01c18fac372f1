"""A resume meets the run it continues: data of another size is refused naming the
checkpoint and both counts (the stream's saved order indexes the old data), before the
adapter or anything else is loaded; a checkpoint at or past training.steps says that
nothing is left to train."""

from __future__ import annotations

import hashlib

import pytest

import loraengine
from loraengine.core.errors import DataError
from loraengine.core.train.checkpoints import CheckpointWarning
from loraengine.testing.harness import tiny_data, tiny_train_config
from loraengine.testing.models import TinyDenoiser


def _run(out, n, steps):
    data = tiny_data(n=n)
    cfg = tiny_train_config({"training": {"steps": steps},
                             "output": {"dir": str(out), "save_every": 1, "plot": False}})
    return loraengine.train(cfg, model=TinyDenoiser(), latents=data.latents,
                            conditioning=data.conditioning, resume="latest")


@pytest.mark.parametrize(("before", "after"), [(6, 3), (2, 6)])
def test_resuming_on_data_of_another_size_is_refused(tmp_path, before, after):
    _run(tmp_path, before, 2)
    lora = tmp_path / "lora.safetensors"
    kept = hashlib.md5(lora.read_bytes()).hexdigest()
    with pytest.raises(DataError) as err:
        _run(tmp_path, after, 4)
    step = tmp_path / "lora.checkpoints" / "step_00000002"
    assert str(err.value) == (
        f"checkpoint {step} does not fit this run's data: it was made on {before} samples "
        f"and the data now has {after}; resume only with the data the run was made with "
        "(for a new run, choose another output folder or do not resume)")
    assert hashlib.md5(lora.read_bytes()).hexdigest() == kept


def test_a_checkpoint_past_the_steps_says_nothing_is_trained(tmp_path):
    _run(tmp_path, 6, 3)
    with pytest.warns(CheckpointWarning) as caught:
        result = _run(tmp_path, 6, 2)
    step = tmp_path / "lora.checkpoints" / "step_00000003"
    assert any(str(w.message) == (
        f"resuming {step}: the checkpoint is at step 3, past training.steps=2, so no step "
        "is trained; the result is the checkpoint's adapter (raise training.steps to train "
        "on)") for w in caught), [str(w.message) for w in caught]
    assert result.steps == 3


def test_a_fresh_run_among_an_earlier_runs_checkpoints_is_refused(tmp_path):
    _run(tmp_path, 6, 3)  # checkpoints at steps 1-3
    folder = tmp_path / "lora.checkpoints"
    before = sorted(p.name for p in folder.iterdir())
    data = tiny_data()
    cfg = tiny_train_config({"training": {"steps": 2}, "adapter": {"rank": 4},
                             "output": {"dir": str(tmp_path), "save_every": 1,
                                        "keep_last": 1, "plot": False}})
    from loraengine.core.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        loraengine.train(cfg, model=TinyDenoiser(), latents=data.latents,
                         conditioning=data.conditioning)
    assert str(err.value) == (
        f"output.save_every: {folder} holds the checkpoints of an earlier run (steps 1-3); "
        "continue that run with --resume (resume= in loraengine.train), or start afresh "
        "under another output.name or after removing the folder")
    assert sorted(p.name for p in folder.iterdir()) == before
