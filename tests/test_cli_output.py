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


def test_plugins_table_to_a_pipe_keeps_every_cell_on_one_line(host, monkeypatch):
    # CliRunner's output is no terminal, as a pipe is not: no width bounds the table
    monkeypatch.delenv("COLUMNS", raising=False)
    out = CliRunner().invoke(cli, ["plugins"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    head = [[c.strip() for c in line.split("┃")[1:-1]] for line in lines if line.startswith("┃")]
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    assert head == [["category", "name", "plugin", "distribution", "version"]]
    listed = {tuple(row) for row in rows}
    assert len(rows) == len(host.registry.all())  # one line per record, none folded
    for r in host.registry.all():
        assert (r.category, r.name, r.plugin, r.distribution or "-", r.version or "-") in listed


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


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def steps_at(watch, clock, seconds_per_step, steps, first=0):
    hints = []
    for step in range(first, first + steps):
        clock.now += seconds_per_step
        hint = watch.observe(step + 1)
        if hint is not None:
            hints.append((step + 1, hint))
    return hints


def test_a_run_falling_below_a_third_of_its_best_pace_gets_one_hint():
    import torch

    from loraengine.cli.progress import SlowdownWatch

    clock = FakeClock()
    watch = SlowdownWatch(window=5, min_seconds=2.0, warmup=1, factor=3.0, clock=clock)
    assert steps_at(watch, clock, 1.0, 30) == []            # 1 it/s, steady
    assert steps_at(watch, clock, 2.5, 20, first=30) == []  # 0.4 it/s: above a third
    hints = steps_at(watch, clock, 4.0, 40, first=50)       # 0.25 it/s: below
    assert len(hints) == 1, hints                           # once per run
    text = hints[0][1]
    assert "0.25 it/s" in text and "1.00 it/s" in text
    assert "training.threads" in text and "OMP_NUM_THREADS" in text
    assert f"torch uses {torch.get_num_threads()} thread" in text


def test_a_slow_warm_up_is_not_the_pace_to_beat_nor_compared():
    from loraengine.cli.progress import SlowdownWatch

    clock = FakeClock()
    watch = SlowdownWatch(window=5, min_seconds=2.0, warmup=1, factor=3.0, clock=clock)
    # the first window is slow (first calls, allocation) and then it runs at full pace;
    # a very fast first window is not the reference either
    assert steps_at(watch, clock, 10.0, 6) == []
    assert steps_at(watch, clock, 1.0, 30, first=6) == []
    clock2 = FakeClock()
    watch = SlowdownWatch(window=5, min_seconds=2.0, warmup=1, factor=3.0, clock=clock2)
    assert steps_at(watch, clock2, 0.5, 6) == []            # windows wait for 2 s
    assert steps_at(watch, clock2, 1.0, 30, first=6) == []


def test_the_progress_bar_logs_the_slowdown_hint_above_the_bar(monkeypatch):
    from types import SimpleNamespace

    from loraengine.cli.progress import ProgressBar, SlowdownWatch

    monkeypatch.setenv("LINES", "40")  # rich crops what it logs to the console's height
    clock = FakeClock()
    stream = io.StringIO()
    bar = ProgressBar(stream=stream, enabled=True,
                      slowdown=lambda: SlowdownWatch(window=2, min_seconds=1.0, clock=clock))
    run = SimpleNamespace(config=SimpleNamespace(output=SimpleNamespace(name="r")),
                          total_steps=40, start_step=0)
    bar.loraengine_on_train_start(run)
    for step in range(1, 41):
        clock.now += 1.0 if step <= 20 else 5.0
        bar.loraengine_on_step_end(run, step, {"loss": 0.1})
    bar.loraengine_on_train_end(run, None)
    text = " ".join(stream.getvalue().split())
    assert text.count("machine may be oversubscribed") == 1
    assert "training.threads, or OMP_NUM_THREADS" in text


def test_time_spent_writing_or_validating_is_not_counted_as_slow_steps():
    from loraengine.cli.progress import SlowdownWatch

    clock = FakeClock()
    watch = SlowdownWatch(window=5, min_seconds=2.0, warmup=1, factor=3.0, clock=clock)
    assert steps_at(watch, clock, 1.0, 30) == []
    for first in range(30, 90, 10):  # every 10 steps, a 60 s sample grid
        clock.now += 60.0
        watch.restart()
        assert steps_at(watch, clock, 1.0, 10, first=first) == []
