"""Offloading on a CPU-only machine: the frozen weights leave the model, come back one
unit (block) at a time with the next one prefetched, are released after use, are not
pinned by autograd between the forward and the backward pass, and return intact when
the pipeline closes."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch

from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.train.loop import Trainer
from loraengine.plugins.memory import offload
from loraengine.testing.models import tiny_unet_train_config


@pytest.fixture
def offload_config(tmp_path, unet_dir, data_files) -> dict:
    return tiny_unet_train_config(unet_dir, data_files, {
        "training": {"steps": 2},
        "memory": {"offloading": True},
        "output": {"dir": str(tmp_path / "out"), "plot": False},
    })


def _offloaded_params(pipe) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in pipe.model.named_parameters()]


def test_weights_leave_the_model_and_come_back_unit_by_unit(host, offload_config):
    pipe = build_pipeline(parse_config(offload_config, host.registry), host)
    try:
        off = pipe.offloader
        # between uses every frozen tensor is an empty placeholder
        assert all(p.numel() == 0 for _, p in _offloaded_params(pipe))
        assert off.host_bytes > 0 and len(off.units) >= 5
        unit_of = {id(s.module): i for i, u in enumerate(off.units) for s in u.slots}
        seen: list[tuple[int, bool, int]] = []

        def record(mod, args, out):
            # the layer ran with its real weight; at most its unit and the next resident
            w = getattr(mod, "weight", None)
            full = w is not None and w.numel() > 0
            seen.append((unit_of[id(mod)], full, len(off.resident)))

        handles = [s.module.register_forward_hook(record) for u in off.units for s in u.slots
                   if s.name == "weight"]
        trainer = Trainer(pipe, write_files=False)
        for _ in range(2):
            seen.clear()
            loss = trainer.micro_step(trainer.indices.take(2))
            # after the forward pass nothing is resident
            assert off.resident == set()
            assert all(p.numel() == 0 for _, p in _offloaded_params(pipe))
            loss.backward()
        for h in handles:
            h.remove()
        assert seen and all(full for _, full, _ in seen)
        assert max(n for _, _, n in seen) <= 2
        order = list(dict.fromkeys(u for u, _, _ in seen))
        assert len(order) == len(off.units)  # every unit visited
        # the second pass prefetched the unit that followed each one in the first
        assert all(off.successor["forward"][a] == b for a, b in zip(order[:-1], order[1:], strict=True))
        assert off.stats["prefetches"] > 0 and off.stats["releases"] > 0
        assert off.stats["fetches"] > 0  # the backward pass fetched weights again
    finally:
        pipe.close()
    # closing puts the original tensors back, bit for bit
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(
        str(Path(offload_config["model"]["path"]) / "unet")).state_dict()
    restored = pipe.model.state_dict()
    assert set(restored) == set(reference)
    assert all(torch.equal(restored[k], reference[k]) for k in reference)


def test_device_copies_are_not_pinned_by_autograd_between_passes(host, offload_config):
    """The saved-tensor hook keeps a note instead of the device copy, so every copy made
    during the forward pass is freed before the backward pass starts."""
    pipe = build_pipeline(parse_config(offload_config, host.registry), host)
    try:
        off = pipe.offloader
        copies: list[weakref.ref] = []
        real_load = off._load

        def tracking_load(idx, prefetch=False):
            real_load(idx, prefetch)
            copies.extend(weakref.ref(c) for c in off.units[idx].copies or ())

        off._load = tracking_load
        trainer = Trainer(pipe, write_files=False)
        loss = trainer.micro_step(trainer.indices.take(2))
        assert copies
        alive = [r for r in copies if r() is not None]
        assert alive == []
        before = off.stats["fetches"]
        loss.backward()
        assert off.stats["fetches"] > before
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in pipe.trainable_parameters())
    finally:
        pipe.close()


def test_offloading_with_checkpointing_reloads_blocks_in_the_backward_pass(host,
                                                                           offload_config):
    offload_config["memory"].update(gradient_checkpointing=True, checkpoint_depth=1)
    pipe = build_pipeline(parse_config(offload_config, host.registry), host)
    try:
        off = pipe.offloader
        trainer = Trainer(pipe, write_files=False)
        for _ in range(2):
            loss = trainer.micro_step(trainer.indices.take(2))
            loads = off.stats["loads"] + off.stats["prefetches"]
            loss.backward()
            # recomputing the checkpointed blocks loaded them again
            assert off.stats["loads"] + off.stats["prefetches"] > loads
        # the recomputation order was learned and is prefetched on the second pass
        assert off.successor["backward"]
        assert len(off.resident) <= 2
    finally:
        pipe.close()


def test_offload_units_are_the_blocks_and_the_layers_around_them():
    from diffusers import UNet2DConditionModel

    from loraengine.plugins.models.diffusers_folder import unet_blocks
    from loraengine.testing.models import tiny_unet_config

    unet = UNet2DConditionModel(**tiny_unet_config())
    units = offload.offload_units(unet, unet_blocks(unet))
    names = [n for n, _ in units]
    assert {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0",
            "up_blocks.1"} <= set(names)
    assert {"conv_in", "time_embedding", "conv_out"} <= set(names)
    assert "time_proj" not in names  # no tensors
    covered = {id(p) for _, m in units for p in m.parameters()}
    assert covered == {id(p) for p in unet.parameters()}


@pytest.mark.slow  # seconds a run: kept out of the fast default
def test_offloaded_training_writes_the_same_lora_as_plain(host, offload_config, tmp_path):
    from loraengine.api import train

    plain = dict(offload_config, memory={"gradient_checkpointing": False},
                 output={"dir": str(tmp_path / "plain"), "plot": False})
    a = train(offload_config, host=host)
    b = train(plain, host=host)
    assert set(a.lora) == set(b.lora)
    assert all(torch.equal(a.lora[k], b.lora[k]) for k in a.lora)
    assert a.loss_map["loss"] == b.loss_map["loss"]
