"""A learning-rate x decay sweep of RMSprop on the digits, all 64 runs in one compiled program.

Each configuration trains the same small MLP from the same initialization on the same
minibatches; only `learning_rate` and `decay` differ. `rj.sweep.run` vmaps the training over
the grid inside one `jax.jit`. Training goes in chunks of epochs, one call each, with the
state passed back in: every chunk has the same shapes, so the program compiles once and the
progress bar moves once per chunk.

    python examples/sweep_digits.py --out outputs/sweep_digits

Prints the best configuration (by validation loss) with its test accuracy, and saves
`heatmap.png` (final test accuracy and test loss over the grid) and `sweep.json` in the output
folder. `--shard` splits the configurations across all devices (e.g. several GPUs, or CPU
devices simulated with XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from cli_help import DefaultsHelpFormatter, positive_integer, random_seed
from progress_report import Progress
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import rmsprop_jax as rj

LEARNING_RATES = np.geomspace(1e-4, 1e-1, 8)
DECAYS = np.array([0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999])
HIDDEN = 64
CLASSES = 10


class Data(NamedTuple):
    x_train: jax.Array
    y_train: jax.Array
    x_val: jax.Array
    y_val: jax.Array
    x_test: jax.Array
    y_test: jax.Array


class Carry(NamedTuple):
    """What one chunk of training hands to the next, per configuration."""

    params: Any
    opt_state: Any
    epoch: jax.Array


def load_data() -> Data:
    """scikit-learn's bundled 8x8 digits (no download): a fixed, stratified 60/20/20 split."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, random_state=0, stratify=y
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=0, stratify=y_rest
    )
    return Data(*map(jnp.asarray, (x_train, y_train, x_val, y_val, x_test, y_test)))


def init_mlp(key: jax.Array, features: int) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (features, HIDDEN)) * jnp.sqrt(2.0 / features),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) * jnp.sqrt(1.0 / HIDDEN),
        "b2": jnp.zeros(CLASSES),
    }


def logits(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def accuracy(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits(params, x), axis=-1) == y)


def make_training(
    seed: int, batch_size: int, epochs_per_chunk: int
) -> tuple[
    Callable[[Data, jax.Array, jax.Array], Carry],
    Callable[[Carry, Data, jax.Array, jax.Array], tuple[Carry, dict[str, jax.Array]]],
]:
    """The two functions the sweep runs: `start` builds the state, `train_chunk` advances it."""

    def optimizer(learning_rate: jax.Array, decay: jax.Array) -> optax.GradientTransformation:
        return rj.rmsprop(learning_rate, decay)

    def start(data: Data, learning_rate: jax.Array, decay: jax.Array) -> Carry:
        params = init_mlp(jax.random.key(seed), data.x_train.shape[1])
        opt_state = optimizer(learning_rate, decay).init(params)
        return Carry(params, opt_state, jnp.zeros([], jnp.int32))

    def train_chunk(
        carry: Carry, data: Data, learning_rate: jax.Array, decay: jax.Array
    ) -> tuple[Carry, dict[str, jax.Array]]:
        tx = optimizer(learning_rate, decay)
        batches = data.x_train.shape[0] // batch_size

        def step(state, batch):
            params, opt_state = state
            x, y = batch
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        def epoch(carry: Carry, _: None) -> tuple[Carry, jax.Array]:
            # Same order for every configuration: it depends on the seed and epoch only.
            key = jax.random.fold_in(jax.random.key(seed + 1), carry.epoch)
            order = jax.random.permutation(key, data.x_train.shape[0])[: batches * batch_size]
            order = order.reshape(batches, batch_size)
            (params, opt_state), losses = jax.lax.scan(
                step, (carry.params, carry.opt_state), (data.x_train[order], data.y_train[order])
            )
            return Carry(params, opt_state, carry.epoch + 1), losses.mean()

        carry, train_losses = jax.lax.scan(epoch, carry, length=epochs_per_chunk)
        metrics = {
            "train_loss": train_losses,
            "val_loss": loss_fn(carry.params, data.x_val, data.y_val),
            "val_accuracy": accuracy(carry.params, data.x_val, data.y_val),
            "test_loss": loss_fn(carry.params, data.x_test, data.y_test),
            "test_accuracy": accuracy(carry.params, data.x_test, data.y_test),
        }
        return carry, metrics

    return start, train_chunk


def plot_heatmaps(metrics: dict[str, np.ndarray], selected: int, path: Path) -> None:
    """Test accuracy and test loss over the grid; a box marks the `selected` configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = (len(LEARNING_RATES), len(DECAYS))
    panels = [("test_accuracy", "final test accuracy", "viridis", "{:.3f}"),
              ("test_loss", "final test loss (cross-entropy)", "magma_r", "{:.2f}")]  # fmt: skip
    # The grid is (learning rate, decay) in row-major order: the selected cell's position.
    selected_rate, selected_decay = np.unravel_index(selected, shape)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), constrained_layout=True)
    for ax, (key, title, cmap, fmt) in zip(axes, panels, strict=True):
        # Rows: decay, columns: learning rate. Diverged runs (NaN) are left blank.
        values = metrics[key].reshape(shape).T
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, origin="lower", aspect="auto")
        fig.colorbar(image, ax=ax, label=title)
        for (row, col), value in np.ndenumerate(values):
            red, green, blue, _ = image.cmap(image.norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            text = "NaN" if np.isnan(value) else fmt.format(value)
            ax.text(col, row, text, ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")  # fmt: skip
        ax.set_xticks(range(shape[0]), [f"{lr:.1e}" for lr in LEARNING_RATES], rotation=45)
        ax.set_yticks(range(shape[1]), [f"{d:g}" for d in DECAYS])
        ax.add_patch(
            plt.Rectangle(
                (selected_rate - 0.5, selected_decay - 0.5), 1, 1,
                fill=False, edgecolor="red", linewidth=2.5, label="selected by validation loss",
            )
        )  # fmt: skip
        ax.set_xlabel("learning rate")
        ax.set_ylabel("decay")
        ax.set_title(title)
    axes[0].legend(loc="upper left", bbox_to_anchor=(0, -0.22), frameon=False, fontsize=9)
    fig.suptitle(f"RMSprop on digits: {values.size} configurations, one compiled sweep")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/sweep_digits"), help="folder for the results"
    )
    parser.add_argument(
        "--epochs", type=positive_integer, default=40, help="epochs of every configuration"
    )
    parser.add_argument(
        "--epochs-per-chunk", type=positive_integer, default=5, help="epochs per compiled call"
    )
    parser.add_argument("--batch-size", type=positive_integer, default=64, help="examples per step")
    parser.add_argument(
        "--seed", type=random_seed, default=0, help="initialization and order of the batches"
    )
    parser.add_argument("--shard", action="store_true", help="split the sweep across devices")
    args = parser.parse_args(argv)
    if args.epochs % args.epochs_per_chunk:
        parser.error("--epochs must be a multiple of --epochs-per-chunk")
    args.out.mkdir(parents=True, exist_ok=True)

    data = load_data()
    grid = rj.sweep.grid(learning_rate=LEARNING_RATES, decay=DECAYS)
    start, train_chunk = make_training(args.seed, args.batch_size, args.epochs_per_chunk)
    carry = rj.sweep.run(start, grid, data, shard=args.shard).results

    chunk_seconds, train_losses = [], []
    chunks = args.epochs // args.epochs_per_chunk
    bar = Progress(range(chunks), total=chunks, desc="sweep", unit="chunk")
    for _ in bar:
        begin = time.perf_counter()
        result = rj.sweep.run(train_chunk, grid, carry, data, in_axes=(0, None), shard=args.shard)
        carry, metrics = result.results
        jax.block_until_ready(carry)
        chunk_seconds.append(time.perf_counter() - begin)
        train_losses.append(np.asarray(metrics["train_loss"]))
        bar.set_postfix(best_val_accuracy=f"{np.nanmax(metrics['val_accuracy']):.3f}")

    metrics = {k: np.asarray(v) for k, v in metrics.items() if k != "train_loss"}
    best = result.best(lambda results: results[1]["val_loss"], mode="min")
    plot_heatmaps(metrics, best.index, args.out / "heatmap.png")
    summary = {
        "configurations": result.size,
        "devices": jax.device_count() if args.shard else 1,
        "first_chunk_seconds_with_compile": chunk_seconds[0],
        "later_chunk_seconds_median": float(np.median(chunk_seconds[1:] or chunk_seconds)),
        "best": {**best.hyperparameters, **{k: float(metrics[k][best.index]) for k in metrics}},
        "learning_rate": grid["learning_rate"].tolist(),
        "decay": grid["decay"].tolist(),
        **{k: v.tolist() for k, v in metrics.items()},
        "train_loss_per_epoch": np.concatenate(train_losses, axis=1).tolist(),
    }
    (args.out / "sweep.json").write_text(json.dumps(summary, indent=1))

    b = summary["best"]
    print(
        f"{result.size} configurations x {args.epochs} epochs; first chunk (with compilation) "
        f"{summary['first_chunk_seconds_with_compile']:.1f} s, later chunks "
        f"{summary['later_chunk_seconds_median']:.2f} s each."
    )
    print(
        f"Best by validation loss: learning_rate={b['learning_rate']:.3g}, decay={b['decay']:g}"
        f" -> val loss {b['val_loss']:.4f}, val accuracy {b['val_accuracy']:.3f}, "
        f"test accuracy {b['test_accuracy']:.3f}."
    )
    diverged = int(np.sum(~np.isfinite(metrics["test_loss"])))
    print(f"Diverged (NaN) runs: {diverged}. Figures in {args.out}/")
    return summary


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        # The sweep keeps no checkpoints: one line instead of a traceback, as in a shell.
        sys.stderr.write("interrupted; the sweep keeps no checkpoints, a new run starts over\n")
        sys.exit(130)
