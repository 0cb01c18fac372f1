"""``loraengine plan --real``: released models planned at real size from the config
values the package carries, on the meta device (nothing downloaded)."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner

from loraengine.cli.main import cli
from loraengine.plugins import build_plugin_manager
from loraengine.tools.plan import real_size

GB = 1e9


@pytest.fixture(scope="module")
def host():
    return build_plugin_manager()


@pytest.fixture(scope="module", autouse=True)
def plans_once():
    """Each dry run of this module once: ``plan_scenarios`` plans the fit's points with
    ``_plan_at``, and several tests plan the same points (Qwen-Image with checkpointing
    at 2 and 3 blocks, for one)."""
    done: dict = {}
    plan_at = real_size._plan_at

    def once(name, host, sc, blocks, offload, resolution, rank, batch, frames=None):
        latent = real_size.latent_shape(name, resolution, frames)  # None: the default
        key = (name, id(host), sc.label, repr(sc.model), repr(sc.memory),
               tuple(sorted(blocks.items())), offload, tuple(latent), rank, batch)
        if key not in done:
            done[key] = plan_at(name, host, sc, blocks, offload, resolution, rank, batch,
                                frames)
        return copy.deepcopy(done[key])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(real_size, "_plan_at", once)
        yield


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


# -- video: Wan at real size ------------------------------------------------------------

def test_video_latents_follow_the_wan_vae_and_bad_sizes_are_one_line_errors():
    # Wan's VAE: the first frame, then one latent frame per 4; 8× in space
    assert real_size.latent_shape("wan2.1_t2v_14b") == [16, 21, 60, 104]  # 81×480×832
    assert real_size.latent_shape("wan2.1_t2v_1.3b", (720, 1280), 33) == [16, 9, 90, 160]
    assert real_size.latent_shape("qwen_image") == [16, 128, 128]
    assert real_size.parse_resolution("480x832") == (480, 832)
    assert real_size.parse_resolution("768") == (768, 768)
    for args, message in (
            (["--real", "qwen_image", "--frames", "5"], "--frames: qwen_image is an image"),
            (["--real", "wan2.1_t2v_14b", "--frames", "80"], "--frames: 80 is not 1 + a "
             "multiple of 4"),
            (["--real", "wan2.1_t2v_14b", "--resolution", "480xq"], "--resolution: '480xq' "
             "is neither"),
            (["--real", "wan2.1_t2v_14b", "--resolution", "484x832"], "--resolution: "
             "484x832 is not a multiple of 8")):
        result = CliRunner().invoke(cli, ["plan", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


def test_a_wan_2_2_record_plans_one_expert_with_its_timestep_range(host):
    """The record's model options pick the low-noise expert: one transformer, drawing
    only timesteps below the boundary, as a two-expert pipeline folder would."""
    from loraengine.core.build import load_model
    from loraengine.core.config.root import parse_config

    rec = real_size.record("wan2.2_t2v_a14b")
    assert rec["experts"] == 2
    cfg = parse_config({"model": {"family": "wan", "path": "<real:wan2.2_t2v_a14b>",
                                  **rec["model"]}}, host.registry)
    module = real_size.real_model("wan2.2_t2v_a14b", {"num_layers": 2})
    loaded = load_model(cfg, host, module)
    assert loaded.module is module and len(loaded.blocks) == 2
    assert loaded.schedule.timestep_range == (0.0, 0.875)
    assert loaded.base_model_version == "wan:low_noise" and not loaded.file_parts
    assert loaded.latent_channels == 16 and loaded.cond_widths == {"cond": 4096}


def test_wan_records_have_the_published_parameter_counts():
    # Wan 2.1 is published as a 14B and a 1.3B model; 2.2 A14B as two 14B experts
    for name, low, high in (("wan2.1_t2v_14b", 13.5e9, 15e9),
                            ("wan2.1_t2v_1.3b", 1.2e9, 1.6e9),
                            ("wan2.2_t2v_a14b", 13.5e9, 15e9)):
        model = real_size.real_model(name)
        assert all(p.device.type == "meta" for p in model.parameters())
        assert low < sum(p.numel() for p in model.parameters()) < high, name
        assert len(model.blocks) == real_size.record(name)["config"]["num_layers"]


@pytest.mark.slow
def test_wan_14b_plans_read_off_small_models_equal_the_40_block_plans(host):
    """81×480×832, batch 1, rank 16: the fitted plan with 10 of the 40 blocks offloaded
    (the fit in two block counts, resident and offloaded) equals a dry run of the whole
    40-block model, and with checkpointing alone the base weights are the model's
    parameters at two bytes each (bf16). (The fit in one block count is checked against
    a direct plan by test_extrapolating_in_the_block_count_matches_a_direct_plan.)"""
    name = "wan2.1_t2v_14b"
    labels = ["bf16 + checkpointing", "bf16 + checkpointing + 10/40 blocks offloaded"]
    rows = dict(real_size.plan_scenarios(name, host, labels=labels))
    params = sum(p.numel() for p in real_size.real_model(name).parameters())
    for sc in real_size.scenarios(40, 10):
        if sc.label != labels[1]:
            continue
        offload = 10 if "offload_blocks" in sc.memory else None
        direct = real_size._plan_at(name, host, sc, {}, offload, None, 16, 1)
        got = rows[sc.label]
        assert got is not None
        assert abs(got.peak - direct.peak) <= 0.01 * direct.peak, sc.label
        assert got.weights_device == pytest.approx(direct.weights_device, rel=1e-3)
        assert got.activations == pytest.approx(direct.activations, rel=0.01)
    # all 40 blocks' weights resident without offloading (the few float32 norms
    # and embeddings are cast to bf16 as well)
    assert rows[labels[0]].weights_device == pytest.approx(2 * params, rel=1e-3)


def test_the_video_table_names_the_clip_and_the_expert_planned():
    text = real_size.format_scenarios("wan2.2_t2v_a14b", [], None, 16, 1, frames=33)
    head = text.splitlines()[0]
    assert "33 frames of 480×832 (latent [16, 9, 60, 104])" in head
    params = sum(p.numel() for p in real_size.real_model("wan2.2_t2v_a14b").parameters())
    assert f"{params / 1e9:.2f} B parameters" in head
    assert "2 experts" in text and "model.expert: low_noise" in text
    assert "model.expert: both) holds 2× the weights" in text


# -- image families beyond the 2026 set: FLUX.1, SD3/3.5, Lumina 2, HiDream, SDXL, SD1.5 ----

#: name -> (published size, where it is published, relative slack of the rounding). The
#: count is of the tensors the released file holds (parameters and saved buffers: SD3's
#: positional table is a buffer), as the model hubs count them.
PUBLISHED = {
    "flux1_dev": (12e9, "BFL model card: a 12 billion parameter rectified flow transformer",
                  0.01),
    "sd3.5_large": (8.1e9, "Stability's SD3.5 release: 8.1 billion parameters", 0.01),
    "sd3.5_medium": (2.47e9, "the hub's safetensors count of the released file, 2.47B "
                             "(Stability's release rounds to 2.5 billion)", 0.01),
    "sd3_medium": (2e9, "Stability's SD3 Medium card: 2 billion parameters", 0.05),
    "lumina2": (2.6e9, "Lumina-Image 2.0 paper (arXiv 2503.21758): 2.6B parameters "
                       "(its model card rounds to 2 billion)", 0.01),
    "hidream_i1": (17e9, "HiDream-I1 README: 17B parameters", 0.01),
    "sdxl_base_1.0": (2.567e9, "SDXL report: a 2.6B-parameter UNet (2,567,463,684 in "
                               "diffusers' count)", 1e-3),
    "sd15": (860e6, "SD v1 model card: an 860M UNet", 0.001),
}


def _file_count(model) -> int:
    return sum(t.numel() for t in model.state_dict().values())


@pytest.mark.slow  # 1.5–3.4 s: the full suite runs it
def test_image_records_build_the_published_model_sizes_on_meta():
    from loraengine.plugins import build_plugin_manager as plugins

    families = set(plugins().registry.names("model"))
    for name, (size, _source, slack) in PUBLISHED.items():
        rec = real_size.record(name)
        assert rec["family"] in families and "source" in rec, name
        model = real_size.real_model(name)
        assert type(model).__name__ == rec["class"], name
        assert all(p.device.type == "meta" for p in model.parameters()), name
        count = _file_count(model)
        assert abs(count - size) <= slack * size, (name, count)
    # the repeated blocks the plan extrapolates in are the ones the family trains
    flux = real_size.real_model("flux1_dev")
    assert (len(flux.transformer_blocks), len(flux.single_transformer_blocks)) == (19, 38)
    hidream = real_size.real_model("hidream_i1", {"num_layers": 2, "num_single_layers": 3})
    assert len(hidream.caption_projection) == 2 + 3 + 1  # llama_layers cut to 5 blocks


def test_image_records_give_the_conditioning_their_family_reads():
    assert real_size.latent_shape("sd15") == [4, 64, 64]  # SD1.5 is planned at 512²
    assert real_size.latent_shape("sdxl_base_1.0") == [4, 128, 128]
    assert real_size.latent_shape("sd15", 768) == [4, 96, 96]
    shapes = {k: list(v.shape) for k, v in real_size.conditioning("sdxl_base_1.0", 2).items()}
    assert shapes == {"cond": [2, 77, 2048], "pooled": [2, 1280]}
    flux = real_size.conditioning("flux1_dev", 1)
    model = real_size.real_model("flux1_dev", {"num_layers": 1, "num_single_layers": 1})
    assert flux["cond"].shape[-1] == model.config.joint_attention_dim
    assert flux["pooled"].shape[-1] == model.config.pooled_projection_dim
    lumina = real_size.conditioning("lumina2", 1)
    assert lumina["mask"].dtype == torch.long and lumina["cond"].shape == (1, 256, 2304)
    hidream = real_size.conditioning("hidream_i1", 1)
    assert hidream["llama3"].shape == (1, 32, 128, 4096)  # every Llama layer, batch first
    assert max(real_size.record("hidream_i1")["config"]["llama_layers"]) == 31


def test_plan_real_of_a_model_whose_forward_reads_values_is_one_line(host):
    """Lumina 2 reads its mask's lengths as numbers, HiDream counts the tokens routed to
    each expert: on the meta device neither has values, and plan says so."""
    for name, cls in (("lumina2", "Lumina2Transformer2DModel"),
                      ("hidream_i1", "HiDreamImageTransformer2DModel")):
        result = CliRunner().invoke(cli, ["plan", "--real", name])
        assert result.exit_code == 2, (name, result.output)
        assert f"--real: {name}: {cls}'s forward reads tensor values" in result.output
        assert "Traceback" not in result.output


@pytest.mark.slow
def test_unet_and_mmdit_plans_hold_the_weights_in_bf16(host):
    """A UNet (no repeated blocks: one direct dry run; SD1.5, the quickest) and SD3.5
    Large (read off 2 and 3 blocks) with checkpointing: the base weights on the device
    are the model's parameters at two bytes each, and checkpointing cuts the
    activations."""
    for name in ("sd15", "sd3.5_large"):
        rows = dict(real_size.plan_scenarios(name, host, labels=["bf16",
                                                                 "bf16 + checkpointing"]))
        params = sum(p.numel() for p in real_size.real_model(name).parameters())
        plain, ck = rows["bf16"], rows["bf16 + checkpointing"]
        assert plain is not None and ck is not None
        assert ck.weights_device == pytest.approx(2 * params, rel=0.02), name
        assert ck.activations < plain.activations, name
    # a UNet has no block counts to offload part of: its partial-offload rows are left
    # out (asked for alone, nothing is planned)
    partial = [sc.label for sc in real_size.scenarios(0, 0) if "offload_blocks" in sc.memory]
    assert len(partial) == 2
    assert real_size.plan_scenarios("sd15", host, labels=partial) == []
