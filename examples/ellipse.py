"""The picture RMSprop is taught with: an elongated bowl, three optimizers, one learning rate.

Gradient descent on f(x, y) = (x**2 + 100 y**2) / 2 with a learning rate near 2/100 (the
largest that is stable across the steep y-axis) zig-zags across that axis and crawls along the
flat x-axis, where each step shrinks x by only 2%. RMSprop divides each coordinate's step by
the root of its own squared-gradient average, so both axes move at the same pace.

    python examples/ellipse.py --out outputs/ellipse

Prints the steps each optimizer needs to come within `--radius` of the minimum for good and
saves `ellipse.png` (contours and trajectories) in the output folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
from cli_help import DefaultsHelpFormatter, positive_integer, positive_number

import rmsprop_jax as rj

if TYPE_CHECKING:
    from matplotlib.axes import Axes

CURVATURE = jnp.asarray([1.0, 100.0])
START = jnp.asarray([-1.0, 1.0])


def bowl(point: jax.Array) -> jax.Array:
    """f(x, y) = (x**2 + 100 y**2) / 2: the minimum is the origin; y is 100x more curved."""
    return 0.5 * jnp.sum(CURVATURE * point**2)


def trajectory(tx: optax.GradientTransformation, steps: int) -> np.ndarray:
    """The `steps + 1` points visited by `tx` from START, computed in one compiled scan."""

    def step(carry, _):
        point, state = carry
        updates, state = tx.update(jax.grad(bowl)(point), state, point)
        point = optax.apply_updates(point, updates)
        return (point, state), point

    _, points = jax.jit(lambda: jax.lax.scan(step, (START, tx.init(START)), length=steps))()
    return np.concatenate([np.asarray(START)[None], np.asarray(points)])


def steps_to_converge(points: np.ndarray, radius: float) -> int | None:
    """First step after which every point lies within `radius` of the minimum, or None."""
    outside = np.nonzero(np.linalg.norm(points, axis=1) >= radius)[0]
    last_outside = int(outside[-1]) if outside.size else -1
    return last_outside + 1 if last_outside + 1 < len(points) else None


def plot(
    paths: dict[str, np.ndarray], steps: dict[str, int | None], radius: float, path: Path,
    learning_rate: float,
) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    shown_steps = 160
    xs, ys = np.meshgrid(np.linspace(-1.2, 0.4, 400), np.linspace(-1.2, 1.2, 300))
    values = 0.5 * (float(CURVATURE[0]) * xs**2 + float(CURVATURE[1]) * ys**2)
    figure, axis = plt.subplots(figsize=(9, 5.4), layout="constrained")
    # The height of the bowl as shading (log scale: it spans five orders of magnitude), and the
    # level sets that close within the frame: ellipses 10x wider than tall, the bowl's shape.
    norm = LogNorm(1e-3, 1e2)
    shading = axis.pcolormesh(xs, ys, values, cmap="Greys", norm=norm, alpha=0.3, shading="auto")
    axis.contour(xs, ys, values, levels=[0.01, 0.03, 0.1, 0.3], colors="0.45", linewidths=0.7)
    colorbar = figure.colorbar(shading, ax=axis, pad=0.01, fraction=0.04)
    colorbar.set_label("f(x, y), log scale")
    styles = {"gradient descent": "tab:red", "momentum 0.9": "tab:orange", "RMSprop": "tab:blue"}

    def draw(ax: Axes, with_labels: bool) -> None:
        for name, points in paths.items():
            shown = points[: shown_steps + 1]
            count = steps[name]
            reached = f"within {radius} after {count} steps" if count else "not within reach"
            label = f"{name}: {reached}" if with_labels else None
            ax.plot(shown[:, 0], shown[:, 1], "o-", ms=2.2, lw=1.1, color=styles[name], label=label)
            # Arrowheads on a few segments give each path its direction.
            for i in (0, 1, 2, 8, 20, 45, 90):
                if i + 1 < len(shown) and np.linalg.norm(shown[i + 1] - shown[i]) > 1e-3:
                    ax.annotate(
                        "",
                        xy=(shown[i + 1, 0], shown[i + 1, 1]),
                        xytext=(shown[i, 0], shown[i, 1]),
                        arrowprops={"arrowstyle": "-|>", "color": styles[name], "lw": 1.1},
                    )
        angle = np.linspace(0, 2 * np.pi, 200)
        target_label = f"target: within {radius} of the minimum" if with_labels else None
        ax.plot(radius * np.cos(angle), radius * np.sin(angle), "k--", lw=1, label=target_label)
        ax.plot(0, 0, "k*", ms=11)

    draw(axis, with_labels=True)
    start = (float(START[0]), float(START[1]))
    axis.annotate("start", start, xytext=(8, 6), textcoords="offset points", fontsize=10)
    axis.set(xlim=(-1.2, 0.4), ylim=(-1.2, 1.2))
    axis.set(xlabel="x (flat direction)", ylabel="y (steep direction)")
    axis.set_title(
        f"f(x, y) = (x² + 100y²)/2, learning rate {learning_rate}, first {shown_steps} steps"
    )
    figure.legend(loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    # Near the minimum, at equal scales: the target is a circle there.
    inset = axis.inset_axes((0.68, 0.03, 0.3, 0.3))
    inset.pcolormesh(xs, ys, values, cmap="Greys", norm=norm, alpha=0.3, shading="auto")
    draw(inset, with_labels=False)
    inset.set(xlim=(-0.12, 0.12), ylim=(-0.12, 0.12), aspect="equal", xticks=[], yticks=[])
    inset.text(
        0.5, 0.97, "near the minimum", transform=inset.transAxes, ha="center", va="top", fontsize=8
    )
    axis.indicate_inset_zoom(inset, edgecolor="0.3")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, int | None]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--learning-rate", type=positive_number, default=0.019, help="shared by all three"
    )
    parser.add_argument(
        "--steps", type=positive_integer, default=500, help="steps of each optimizer"
    )
    parser.add_argument(
        "--radius", type=positive_number, default=0.05, help="distance to the minimum"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/ellipse"), help="folder for the figure"
    )
    args = parser.parse_args(argv)

    rate = args.learning_rate
    optimizers = {
        "gradient descent": optax.sgd(rate),
        "momentum 0.9": optax.sgd(rate, momentum=0.9),
        "RMSprop": rj.rmsprop(rate),
    }
    paths = {name: trajectory(tx, args.steps) for name, tx in optimizers.items()}
    steps = {name: steps_to_converge(points, args.radius) for name, points in paths.items()}

    print(f"steps until within {args.radius} of the minimum for good, learning rate {rate}:")
    for name, count in steps.items():
        print(f"  {name:<18} {count if count is not None else f'> {args.steps}'}")
    gd, rms = steps["gradient descent"], steps["RMSprop"]
    if rms is not None and (gd is None or rms < gd):
        fewer = (gd if gd is not None else args.steps) - rms
        ratio = f"{(gd / rms):.1f}x" if gd is not None else f"> {args.steps / rms:.1f}x"
        print(f"RMSprop needs {fewer} fewer steps than gradient descent ({ratio} faster).")
    else:
        print("RMSprop did not beat gradient descent at this learning rate.")

    args.out.mkdir(parents=True, exist_ok=True)
    plot(paths, steps, args.radius, args.out / "ellipse.png", rate)
    (args.out / "ellipse.json").write_text(json.dumps({"learning_rate": rate, "steps": steps}))
    print(f"figure: {args.out / 'ellipse.png'}")
    return steps


if __name__ == "__main__":
    main()
