"""The training curves as one PNG: train and eval loss against step, and the learning rate.

Drawn headless (matplotlib's Agg canvas; no display, no global backend switch) from the
history the run summary keeps, so a re-run that reuses the adapter draws the same picture.
"""

from __future__ import annotations

from pathlib import Path

PLOT_FILE = "training-curves.png"


def plot_training(history: list[dict[str, float]], path: Path, title: str) -> Path | None:
    """Write the curves of `history` (entries with step and loss / eval_loss / learning_rate)
    to `path`; None (nothing written) when no loss was logged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(e["step"], e[key]) for e in history if key in e]
        return [s for s, _ in points], [v for _, v in points]

    train, evaluated, rate = series("loss"), series("eval_loss"), series("learning_rate")
    if not train[0]:
        return None
    figure = Figure(figsize=(9, 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, rate_axes = figure.subplots(1, 2, width_ratios=(2, 1))
    loss_axes.plot(*train, marker=".", label="train loss")
    if evaluated[0]:
        loss_axes.plot(*evaluated, marker="o", label="eval loss (held-out)")
    loss_axes.set(xlabel="step", ylabel="loss", title="loss")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend()
    rate_axes.plot(*rate, color="tab:green")
    rate_axes.set(xlabel="step", title="learning rate")
    rate_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    rate_axes.grid(alpha=0.3)
    figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    figure.savefig(tmp, format="png")
    tmp.replace(path)
    return path
