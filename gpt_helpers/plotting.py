"""Loss and perplexity curves: drawn live in a notebook while training runs, saved as PNG when headless."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from .history import History


def _pyplot():
    import matplotlib

    if not os.environ.get("DISPLAY") and "ipykernel" not in os.environ.get("MPLBACKEND", "") and not _in_notebook():
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _register_png_formatter() -> None:
    """Let a stand-alone ``Figure`` (not made by pyplot) show as a PNG in a notebook.

    The inline backend registers its formatter only once pyplot has made a figure; until then ``display(figure)``
    would print ``<Figure size …>``. Nothing is changed when a formatter is already registered.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return
    from functools import partial

    from matplotlib.figure import Figure

    png = shell.display_formatter.formatters.get("image/png")
    if png is None:
        return
    try:
        png.lookup_by_type(Figure)
    except KeyError:
        from IPython.core.pylabtools import print_figure

        png.for_type(Figure, partial(print_figure, fmt="png", base64=True, bbox_inches="tight"))


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


def plot_history(
    history: History | dict[str, History],
    *,
    x: str = "step",
    save_to: str | os.PathLike | None = None,
    show: bool = True,
    title: str | None = None,
    log_perplexity: bool = True,
):
    """Training and validation loss (left) and validation perplexity (right) against steps or tokens seen.

    Pass one history or ``{"label": history, …}`` to compare runs on one figure. Returns the figure;
    ``save_to`` writes a PNG.

    >>> from gpt_helpers.history import History
    >>> h = History(); _ = h.log(step=1, epoch=0, tokens_seen=10, learning_rate=1e-3, train_loss=3.0)
    >>> fig = plot_history(h, show=False)
    """
    if x not in ("step", "tokens_seen"):
        raise ValueError("x must be 'step' or 'tokens_seen'")
    plt = _pyplot()
    runs = history if isinstance(history, dict) else {"": history}
    if show:
        figure, (loss_axis, ppl_axis) = plt.subplots(1, 2, figsize=(11, 4))
    else:
        # Not registered with pyplot: safe to draw from a background thread (the training panel, the loop's
        # final PNG) and never picked up by the notebook's inline backend at the end of some other cell.
        from matplotlib.figure import Figure

        figure = Figure(figsize=(11, 4))
        loss_axis, ppl_axis = figure.subplots(1, 2)
        _register_png_formatter()
    for index, (label, run) in enumerate(runs.items()):
        color = f"C{index}"
        prefix = f"{label} " if label else ""
        xs = [getattr(r, x) for r in run.records if r.train_loss is not None]
        ys = [r.train_loss for r in run.records if r.train_loss is not None]
        loss_axis.plot(xs, ys, color=color, alpha=0.55, label=f"{prefix}train")
        evaluated = run.eval_records
        if evaluated:
            ex = [getattr(r, x) for r in evaluated]
            loss_axis.plot(
                ex, [r.eval_loss for r in evaluated], color=color, marker="o", markersize=3, label=f"{prefix}validation"
            )
            scored = [r for r in evaluated if _finite(r.eval_perplexity)]  # a classifier's evaluations have none
            if scored:
                ppl_axis.plot(
                    [getattr(r, x) for r in scored],
                    [r.eval_perplexity for r in scored],
                    color=color,
                    marker="o",
                    markersize=3,
                    label=f"{prefix}validation",
                )
            best = run.best
            if best is not None and _finite(best.eval_perplexity):
                ppl_axis.scatter([getattr(best, x)], [best.eval_perplexity], color=color, marker="*", s=120, zorder=3)
    xlabel = "optimizer step" if x == "step" else "tokens seen"
    loss_axis.set(xlabel=xlabel, ylabel="loss (nats per token)", title="Loss")
    ppl_axis.set(xlabel=xlabel, ylabel="perplexity", title="Validation perplexity (★ best)")
    if not ppl_axis.lines:
        ppl_axis.text(
            0.5,
            0.5,
            "no perplexity to show\n(none evaluated, or a classifier)",
            ha="center",
            va="center",
            transform=ppl_axis.transAxes,
            color="0.4",
        )
    elif log_perplexity:
        readable_log_axis(ppl_axis)
    for axis in (loss_axis, ppl_axis):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(save_to, dpi=110)
    if show:
        plt.show()
    return figure


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def readable_log_axis(axis, which: str = "y") -> None:
    """A log scale whose ticks read as plain numbers (150, 200, 300, 500 — not 2×10²), so values can be read off.

    >>> from matplotlib.figure import Figure
    >>> axis = Figure().subplots()
    >>> _ = axis.plot([1, 2], [150, 420])
    >>> readable_log_axis(axis)
    >>> axis.get_yscale()
    'log'
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    scale = axis.set_yscale if which == "y" else axis.set_xscale
    target = axis.yaxis if which == "y" else axis.xaxis
    scale("log")
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 10 else f"{value:g}"))
    target.set_minor_formatter(NullFormatter())


class LivePlot:
    """A training callback that redraws the loss curves in a notebook cell at every log step.

    >>> live = LivePlot()          # then: train(..., callbacks=[live])
    """

    def __init__(self, every: int = 1, x: str = "step"):
        self.every, self.x, self.calls, self.handle = every, x, 0, None

    def on_log(self, state, history: History) -> None:
        self.calls += 1
        if self.calls % self.every:
            return
        figure = plot_history(history, x=self.x, show=False)
        try:
            from IPython.display import display
        except ImportError:
            return
        if self.handle is None:
            self.handle = display(figure, display_id=True)
        else:
            self.handle.update(figure)

    def on_train_end(self, state, history: History) -> None:
        self.on_log(state, history)


def plot_bars(
    labels: Sequence[str], values: Sequence[float], *, ylabel: str, title: str = "", save_to=None, show: bool = True
):
    """A simple labelled bar chart (strategy comparisons, timings)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(5, 0.9 * len(labels)), 3.6))
    bars = axis.bar(labels, values, color=[f"C{i}" for i in range(len(labels))])
    axis.bar_label(bars, fmt="%.3g", fontsize=8)
    axis.set(ylabel=ylabel, title=title)
    axis.tick_params(axis="x", rotation=25)
    figure.tight_layout()
    if save_to is not None:
        figure.savefig(save_to, dpi=110)
    if show:
        plt.show()
    else:
        plt.close(figure)
    return figure
