"""The --compare outputs of the digits examples: a two-panel figure and a markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss (log scale) and test accuracy against the epoch, one line per run."""
    figure = Figure(figsize=(10, 4), dpi=100, layout="tight")
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    for result in results:
        history = result["history"]
        label = f"{result['optimizer']} (lr {result['learning_rate']:g})"
        loss_axis.plot(history["epoch"], history["train_loss"], label=label)
        accuracy_axis.plot(history["epoch"], np.array(history["test_accuracy"]) * 100, label=label)
    loss_axis.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(80, 100))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    accuracy_axis.legend(loc="lower right", fontsize="small")
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
