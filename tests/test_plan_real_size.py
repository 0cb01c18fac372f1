"""``loraengine plan --real``: released models planned at real size from the config
values the package carries, on the meta device (nothing downloaded)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from loraengine.cli.main import cli
from loraengine.plugins import build_plugin_manager
from loraengine.tools.plan import real_size

GB = 1e9


@pytest.fixture(scope="module")
def host():
    return build_plugin_manager()


@pytest.mark.slow
def test_real_size_records_build_the_released_shapes_on_meta():
    qwen = real_size.real_model("qwen_image")
    params = sum(p.numel() for p in qwen.parameters())
    assert all(p.device.type == "meta" for p in qwen.parameters())
    assert 20.0e9 < params < 20.9e9  # Qwen-Image is a 20 B-parameter MMDiT
    assert len(qwen.transformer_blocks) == 60
    assert sum(p.numel() for p in real_size.real_model("z_image").parameters()) > 6.0e9
    chroma = sum(p.numel() for p in real_size.real_model("chroma").parameters())
    assert 8.85e9 < chroma < 8.95e9  # Chroma1 is an 8.9 B-parameter transformer


@pytest.mark.slow
def test_extrapolating_in_the_block_count_matches_a_direct_plan(host):
    """The plan at 5 blocks read off the plans at 2 and 3 equals the plan at 5."""
    sc = real_size.scenarios(5, 2)[1]  # bf16 + checkpointing
    args = (1024, 16, 1)
    pts = [([n], real_size._plan_at("qwen_image", host, sc, {"num_layers": n}, None, *args))
           for n in (2, 3)]
    direct = real_size._plan_at("qwen_image", host, sc, {"num_layers": 5}, None, *args)
    got = real_size._affine(pts, [5])
    assert abs(got.peak - direct.peak) <= 0.01 * direct.peak
    assert got.weights_device == pytest.approx(direct.weights_device, rel=1e-6)


@pytest.mark.slow
def test_qwen_image_at_1024_is_within_a_quarter_of_the_published_figures(host):
    """About 42 GB in bf16 (with checkpointing), 30 GB with an fp8 base, 24 GB with an
    fp8 base and 16 of the 60 blocks offloaded; batch 1, rank 16."""
    want = {"bf16 + checkpointing": 42,
            "fp8 base + checkpointing": 30,
            "fp8 base + checkpointing + 16/60 blocks offloaded": 24}
    rows = dict(real_size.plan_scenarios("qwen_image", host, labels=list(want)))
    assert set(rows) == set(want)
    for label, gb in want.items():
        plan = rows[label]
        assert plan is not None
        assert abs(plan.peak / GB - gb) <= 0.25 * gb, (label, plan.peak / GB)
    # the weights themselves: 20.4 B parameters, two bytes each in bf16
    assert rows["bf16 + checkpointing"].weights_device / GB == pytest.approx(40.9, rel=0.02)


def test_plan_real_unknown_name_and_missing_config_are_config_errors():
    result = CliRunner().invoke(cli, ["plan", "--real", "nope"])
    assert result.exit_code == 2
    assert "--real: unknown model 'nope'" in result.output and "qwen_image" in result.output
    result = CliRunner().invoke(cli, ["plan"])
    assert result.exit_code == 2 and "give a CONFIG file, or --real NAME" in result.output
    assert "Traceback" not in result.output
