"""The loss plot written beside every LoRA: a lifecycle plugin that draws
``<name>.loss.png`` once the loss map is saved (``output.plot``), named as the loss map
is: a stopped run's ``<name>.step_000123.loss.json`` gets ``<name>.step_000123.loss.png``
beside the finished run's plot, which it leaves as it was."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from loraengine.core.files import write_atomic
from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.plugins.run import RunView


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss(loss_map: Mapping[str, Sequence[float]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    loss = [v for v in loss_map.get("loss", [])]
    steps = list(range(1, len(loss) + 1))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, loss, color="#9bb7d4", linewidth=1, label="loss per step")
    if len(loss) >= 5:
        window = max(2, len(loss) // 20)
        ax.plot(steps, _smooth(loss, window), color="#1f4e79", linewidth=2,
                label=f"moving average ({window} steps)")
    for key, color in (("val_loss", "#c0392b"),):
        vals = loss_map.get(key)
        if vals:
            xs = loss_map.get(f"{key}_step", list(range(1, len(vals) + 1)))
            ax.plot(xs, vals, "o-", color=color, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title} training loss" if title else "training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


@hookimpl
def loraengine_on_save(run: RunView, path: str, kind: str) -> None:
    if kind != "loss_map" or not run.config.output.plot:
        return
    loss_file = Path(path)
    suffix = ".loss.json"
    stem = (loss_file.name[:-len(suffix)] if loss_file.name.endswith(suffix)
            else run.config.output.name)
    plot_path = loss_file.with_name(f"{stem}.loss.png")
    plot_loss(run.loss_map, plot_path, title=stem)
    run.record_file("plot", plot_path)
