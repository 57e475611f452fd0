"""The outputs of the digits examples: a two-panel figure and (--compare) a markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import (
    FuncFormatter,
    LogFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
)

# RMSprop variants in solid blues and purples, the optax baselines dashed in warm colours,
# so that the two families stay apart where the lines cross.
STYLES = {
    "rmsprop": ("tab:blue", "-"),
    "rmsprop-centered": ("tab:purple", "-"),
    "rmsprop-momentum": ("tab:cyan", "-"),
    "sgd": ("tab:red", "--"),
    "momentum": ("tab:orange", "--"),
    "adam": ("tab:brown", "--"),
}


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss and test error against the epoch, both on log scales, one line per run.

    The test error (100% - accuracy) on a log scale separates runs that all end near 98%
    accuracy, and shows a run far from it (an SGD run at 26%) as well: nothing is clipped.
    """
    figure = Figure(figsize=(10, 4.6), dpi=100, layout="constrained")
    loss_axis, error_axis = figure.subplots(1, 2)
    for result in results:
        history = result["history"]
        color, style = STYLES.get(result["optimizer"], (None, "-"))
        label = f"{result['optimizer']} (lr {result['learning_rate']:g})"
        epochs = history["epoch"]
        error = 100 * (1 - np.asarray(history["test_accuracy"]))
        kwargs = {"color": color, "linestyle": style, "linewidth": 1.6, "label": label}
        loss_axis.plot(epochs, history["train_loss"], **kwargs)
        # A perfect epoch (error 0) has no place on a log axis: drawn at the axis' floor.
        error_axis.plot(epochs, np.maximum(error, 0.05), **kwargs)
    loss_axis.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log")
    error_axis.set(xlabel="epoch", ylabel="test error (%), log scale", yscale="log")
    error_axis.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    for axis in (loss_axis, error_axis):
        # Plain numbers (0.01, 2.2) rather than 10^-2 and 2.2 x 10^0.
        axis.yaxis.set_major_formatter(LogFormatter())
        axis.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        axis.grid(alpha=0.3, which="both")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    # The error axis spans one or two decades: 1, 2, 5, 10, 20, 50 are labelled, nothing else.
    error_axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    error_axis.yaxis.set_minor_formatter(NullFormatter())
    if len(results) > 1:
        # One legend for both panels, below them, where it hides no line; filled column by
        # column, so that the RMSprop variants and the baselines each get a column.
        figure.legend(
            *loss_axis.get_legend_handles_labels(),
            loc="outside lower center",
            ncol=2,
            fontsize="small",
            frameon=False,
        )
    else:
        final = results[0]
        error_axis.set_title(f"final test accuracy {final['test_accuracy']:.2%}", fontsize="medium")
    figure.suptitle(title)
    figure.savefig(path)


def table(results: list[dict[str, Any]]) -> str:
    """Final training loss, test accuracy and wall time of each run, as markdown."""
    lines = [
        "| optimizer | learning rate | final train loss | test accuracy | wall time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['optimizer']} | {r['learning_rate']:g} | {r['final_train_loss']:.2e} | "
            f"{r['test_accuracy']:.2%} | {r['wall_time_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"
