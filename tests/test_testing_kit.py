"""The kit for plugin authors: the pytest fixtures that the ``pytest11`` entry point
loads in every project with loraengine installed, and the harness behind them."""

from __future__ import annotations

import pytest
import torch

from loraengine import LossSpec, OptimizerSpec
from loraengine.plugins import build_plugin_manager
from loraengine.testing.harness import make_plugin, registered, tiny_train_config

pytest_plugins = ["pytester"]

SQUARED = LossSpec("kit_squared", lambda o: lambda p, t: (p - t) ** 2)


def test_fixtures_come_from_the_pytest11_entry_point(request):
    plugin = request.config.pluginmanager.get_plugin("loraengine")
    assert plugin is not None and plugin.__name__ == "loraengine.testing.pytest_plugin"


def test_register_plugin_wraps_spec_records_and_the_registry_sees_them(
        loraengine_host, register_plugin):
    name = register_plugin(SQUARED, name="kit")
    assert name == "kit"
    record = loraengine_host.registry.entries["loss"]["kit_squared"]
    assert record.plugin == "kit" and record.spec is SQUARED


def test_register_plugin_undoes_the_registration_when_the_test_ends(pytester):
    pytester.makeconftest("""
        import pytest
        from loraengine.plugins import build_plugin_manager

        @pytest.fixture(scope="module")
        def loraengine_host():
            return build_plugin_manager(entry_points=False)
    """)
    pytester.makepyfile("""
        from loraengine import LossSpec

        SPEC = LossSpec("kit_once", lambda o: lambda p, t: (p - t) ** 2)

        def test_a_registers(loraengine_host, register_plugin):
            register_plugin(SPEC)
            assert "kit_once" in loraengine_host.registry.names("loss")

        def test_b_sees_it_gone(loraengine_host):
            assert "kit_once" not in loraengine_host.registry.names("loss")
    """)
    pytester.runpytest_inprocess("-q").assert_outcomes(passed=2)


def test_registered_unregisters_even_when_the_block_raises():
    host = build_plugin_manager(entry_points=False)
    with pytest.raises(RuntimeError), registered(host, SQUARED):
        assert "kit_squared" in host.registry.names("loss")
        raise RuntimeError("boom")
    assert "kit_squared" not in host.registry.names("loss")


def test_make_plugin_refuses_something_that_is_not_a_spec():
    with pytest.raises(TypeError, match="not a spec record"):
        make_plugin(object())


def test_builtin_host_ignores_entry_points(loraengine_builtin_host):
    plugins = {p.plugin for p in loraengine_builtin_host.registry.all()}
    assert plugins and all(p.startswith("loraengine.plugins.") for p in plugins)


def test_tiny_model_runs_on_the_tiny_dataset(tiny_model, tiny_dataset, tiny_latents,
                                             tiny_conditioning):
    assert torch.equal(tiny_dataset.latents, tiny_latents)
    assert torch.equal(tiny_dataset.conditioning, tiny_conditioning)
    out = tiny_model(tiny_latents[:2], torch.tensor([1, 999]), tiny_conditioning[:2])
    assert out.shape == tiny_latents[:2].shape and torch.isfinite(out).all()


def test_tiny_dataset_saves_files_the_config_can_name(tiny_dataset, tmp_path, loraengine_host):
    import loraengine
    from loraengine.testing.models import TinyDenoiser

    lat, cond = tiny_dataset.save(tmp_path)
    config = tiny_train_config({"data": {"latents": str(lat), "conditioning": str(cond)}})
    result = loraengine.train(config, model=TinyDenoiser(), host=loraengine_host)
    assert result.steps == 2


def test_train_tiny_uses_the_registered_plugin(register_plugin, train_tiny):
    calls = []

    def factory(o):
        def loss(p, t):
            calls.append(p.shape)
            return (p - t) ** 2
        return loss

    register_plugin(LossSpec("kit_counting", factory))
    result = train_tiny({"loss": {"name": "kit_counting"}})
    assert len(result.loss_map["loss"]) == 2 and len(calls) == 2
    assert all(len(v) == 2 for v in result.loss_map.values())


def test_train_tiny_is_reproducible(train_tiny):
    first, second = train_tiny(), train_tiny()
    assert first.loss_map == second.loss_map
    assert all(torch.equal(first.lora[k], second.lora[k]) for k in first.lora)


def test_tiny_unet_dir_is_a_diffusers_pipeline_folder(tiny_unet_dir):
    assert (tiny_unet_dir / "unet" / "config.json").exists()
    assert (tiny_unet_dir / "scheduler" / "scheduler_config.json").exists()


def test_make_plugin_adds_lifecycle_hooks(loraengine_host, train_tiny):
    steps = []
    plugin = make_plugin(OptimizerSpec("kit_sgd", lambda p, lr, o: torch.optim.SGD(p, lr)),
                         loraengine_on_step_end=lambda run, step, metrics: steps.append(step))
    with registered(loraengine_host, plugin, name="kit_lifecycle"):
        train_tiny({"optimizer": {"name": "kit_sgd"}})
    assert steps == [1, 2]
