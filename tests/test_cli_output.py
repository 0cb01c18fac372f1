"""Small things the command line shows (issue 15, item 9): the final summary line, log
lines above the progress bar, the ``plugins`` table at 80 columns and help texts."""

from __future__ import annotations

import io
import re

import yaml
from click.testing import CliRunner

from loraengine.cli.main import cli
from loraengine.cli.progress import format_duration, rich_progress, summary_line
from loraengine.core.train.loop import TrainResult


def test_the_summary_line_has_elapsed_time_and_skipped_steps():
    result = TrainResult(lora={}, loss_map={"loss": [0.5, float("nan"), 0.25],
                                            "lr": [1e-3] * 3, "skipped": [0.0, 1.0, 0.0]},
                         steps=3)
    assert summary_line(result, 75.2) == ("trained 3 steps (total 3); loss 0.5000 -> 0.2500; "
                                          "1 skipped; 1 min 15 s")
    assert format_duration(4.26) == "4.3 s"
    assert format_duration(3725) == "1 h 02 min"


def test_cli_train_ends_with_the_summary(tmp_path, unet_config):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(unet_config))
    out = CliRunner().invoke(cli, ["train", str(path)])
    assert out.exit_code == 0, out.output
    assert re.search(r"^trained 3 steps \(total 3\); loss \S+ -> \S+; 0 skipped; "
                     r"\d+\.\d s$", out.output, flags=re.M), out.output


def test_lines_logged_above_the_bar_show_no_source_path():
    stream = io.StringIO()
    progress = rich_progress(stream)
    progress.console.log("checkpoint: out/step_2")
    text = stream.getvalue()
    assert "checkpoint: out/step_2" in text
    assert ".py:" not in text


def test_plugins_table_keeps_names_whole_at_80_columns(host):
    out = CliRunner().invoke(cli, ["plugins"], env={"COLUMNS": "80"})
    assert out.exit_code == 0, out.output
    assert "…" not in out.output
    lines = out.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    cells = {cell.strip() for line in lines for cell in line.split("│")}
    for record in host.registry.all():
        assert record.name in cells, record.name
        assert record.category in cells, record.category


def test_sample_and_prepare_options_have_help():
    runner = CliRunner()
    for command, options in (("sample", ("--seed", "--strength", "--device", "--dtype")),
                             ("prepare", ("--batch-size", "--device"))):
        group_cmd = cli.get_command(None, command)  # type: ignore[arg-type]
        assert group_cmd is not None
        params = {p.opts[0]: p for p in group_cmd.params if p.opts}
        for option in options:
            assert getattr(params[option], "help", None), f"{command} {option}"
        assert runner.invoke(cli, [command, "--help"]).exit_code == 0
