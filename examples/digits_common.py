"""What the Flax NNX and Linen digits examples share: data, optimizers, the loop, checkpoints.

Each example supplies a `Trainer` (its model, train step and checkpoint tree); this module
runs it: seeded batches that depend only on (seed, step), so a resumed run sees exactly the
batches the uninterrupted run would have; progress on stderr (`progress_report`); checkpoints
through `rmsprop_jax.checkpoint`, with the history of the epochs next to them so that a
resumed run's history covers the whole run; a clean stop on Ctrl-C that says how to resume;
and the `--compare` table and figure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import digits_report
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from cli_help import DefaultsHelpFormatter, fraction, positive_integer, positive_number, random_seed
from progress_report import Progress, format_loss
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import rmsprop_jax as rj

# Each picked on a grid of rates about 3x apart, by the training loss after 10 epochs (seed 0).
DEFAULT_LEARNING_RATES = {
    "rmsprop": 1e-3,
    "rmsprop-centered": 3e-3,
    "rmsprop-momentum": 3e-4,
    "sgd": 0.3,
    "momentum": 0.1,
    "adam": 3e-3,
}
OPTIMIZERS = tuple(DEFAULT_LEARNING_RATES)
RMSPROP_MOMENTUM = 0.9
CHECKPOINTS_KEPT = 3
DATA_ORDER_FLAGS = ("seed", "batch_size")  # stored in checkpoints: a resume must match them
# Next to the checkpoints: {step: the history of the epochs finished by that step}.
HISTORY_FILE = "history.json"


class Interrupted(Exception):  # noqa: N818 (it is not an error: the user asked to stop)
    """Ctrl-C during training, after the checkpoints in flight were finished."""

    def __init__(self, step: int, saved_step: int | None):
        super().__init__(f"interrupted at step {step}")
        self.step, self.saved_step = step, saved_step


class Digits(NamedTuple):
    x_train: np.ndarray  # (1347, 64) float32 in [0, 1]
    y_train: np.ndarray  # (1347,) int32
    x_test: np.ndarray  # (450, 64)
    y_test: np.ndarray


def load_data() -> Digits:
    """scikit-learn's bundled 8x8 digits (no download), a fixed stratified 75/25 split."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel intensities are integers 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        x, y.astype(np.int32), test_size=0.25, random_state=0, stratify=y
    )
    return Digits(x_train, y_train, x_test, y_test)


def make_optimizer(
    name: str,
    learning_rate: float | None = None,
    *,
    momentum: float | None = None,
    bias_correction: bool = False,
) -> optax.GradientTransformation:
    """One of OPTIMIZERS; the RMSprop ones from rmsprop_jax, the others optax baselines."""
    rate = DEFAULT_LEARNING_RATES[name] if learning_rate is None else learning_rate
    if name.startswith("rmsprop"):
        if name == "rmsprop-momentum" and momentum is None:
            momentum = RMSPROP_MOMENTUM
        return rj.rmsprop(
            rate,
            centered=name == "rmsprop-centered",
            momentum=momentum,
            bias_correction=bias_correction,
        )
    if momentum is not None or bias_correction:
        raise ValueError(f"--momentum and --bias-correction apply to RMSprop, not {name!r}")
    if name == "sgd":
        return optax.sgd(rate)
    if name == "momentum":
        return optax.sgd(rate, momentum=0.9)
    return optax.adam(rate)


def loss_and_accuracy(logits: jax.Array, labels: np.ndarray) -> tuple[float, float]:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (jnp.argmax(logits, axis=-1) == labels).mean()
    return float(loss), float(accuracy)


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
    """The examples of global step `step`: one permutation per epoch, seeded by (seed, epoch)."""
    steps_per_epoch = num_examples // batch_size
    epoch, position = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return order[position * batch_size : (position + 1) * batch_size]


class Trainer(Protocol):
    """A model with its optimizer, as each example builds it."""

    def train_step(self, x: np.ndarray, y: np.ndarray) -> jax.Array: ...

    def logits(self, x: np.ndarray) -> jax.Array: ...

    def checkpoint_tree(self) -> dict[str, Any]:
        """{"params": ..., "opt_state": ..., "step": ...} as arrays (no framework wrappers)."""
        ...

    def load_checkpoint_tree(self, tree: dict[str, Any]) -> None: ...


def build_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=DefaultsHelpFormatter)
    parser.add_argument(
        "--optimizer", choices=OPTIMIZERS, default="rmsprop", help="the last three are optax's"
    )
    parser.add_argument(
        "--learning-rate",
        type=positive_number,
        help="default: per optimizer, "
        + ", ".join(f"{name} {rate:g}" for name, rate in DEFAULT_LEARNING_RATES.items()),
    )
    parser.add_argument(
        "--momentum",
        type=fraction,
        help=f"momentum for the RMSprop optimizers (rmsprop-momentum: {RMSPROP_MOMENTUM})",
    )
    parser.add_argument(
        "--bias-correction", action="store_true", help="Adam-style debiasing (RMSprop only)"
    )
    parser.add_argument(
        "--epochs", type=positive_integer, default=20, help="epochs in all, resumed ones included"
    )
    parser.add_argument("--batch-size", type=positive_integer, default=32, help="examples per step")
    parser.add_argument(
        "--hidden-size", type=positive_integer, default=128, help="width of the dense layer"
    )
    parser.add_argument(
        "--seed", type=random_seed, default=0, help="initialization and order of the batches"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(default_out), help="folder for the history and figure"
    )
    parser.add_argument(
        "--compare", action="store_true", help="train every optimizer and plot them together"
    )
    parser.add_argument("--checkpoint-dir", type=Path, help="save checkpoints here")
    parser.add_argument(
        "--checkpoint-every",
        type=positive_integer,
        help="steps between checkpoints (default: one epoch)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint, if any"
    )
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if (args.resume or args.checkpoint_every) and args.checkpoint_dir is None:
        parser.error("--resume and --checkpoint-every need --checkpoint-dir")
    if args.compare and any(
        value is not None for value in (args.checkpoint_dir, args.learning_rate, args.momentum)
    ):
        parser.error("--compare uses each optimizer's defaults, without checkpoints")
    uses_rmsprop_flags = args.momentum is not None or args.bias_correction
    if not args.optimizer.startswith("rmsprop") and uses_rmsprop_flags:
        parser.error("--momentum and --bias-correction apply to the RMSprop optimizers")
    return args


def _open_manager(args: argparse.Namespace) -> ocp.CheckpointManager:
    manager = rj.checkpoint.open_manager(
        args.checkpoint_dir, ocp.CheckpointManagerOptions(max_to_keep=CHECKPOINTS_KEPT)
    )
    directory = manager.directory
    if manager.latest_step() is not None and not args.resume:
        raise FileExistsError(
            f"{directory} already holds checkpoints (steps {list(manager.all_steps())}); "
            "pass --resume to continue from the latest, or choose another --checkpoint-dir"
        )
    return manager


def checkpoint_tree(trainer: Trainer, args: argparse.Namespace) -> dict[str, Any]:
    """The trainer's tree plus the flags that fix the order of the batches."""
    data_order = {name: np.asarray(getattr(args, name), np.int32) for name in DATA_ORDER_FLAGS}
    return {**trainer.checkpoint_tree(), "data_order": data_order}


def _check_data_order(stored: dict[str, Any], args: argparse.Namespace, step: int) -> None:
    differing = [
        f"--{name.replace('_', '-')} {int(stored[name])} (this run: {getattr(args, name)})"
        for name in DATA_ORDER_FLAGS
        if int(stored[name]) != getattr(args, name)
    ]
    if differing:
        raise rj.checkpoint.CheckpointMismatchError(
            f"checkpoint at step {step} was written with {', '.join(differing)}: the batches "
            "after it would not be those of the uninterrupted run. Resume with the same flags."
        )


def _read_history(directory: Path, step: int) -> dict[str, list[float]] | None:
    """The history of the epochs finished by checkpoint `step`, if it was recorded."""
    path = directory / HISTORY_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text()).get(str(step))


def _write_history(
    directory: Path, step: int, history: dict[str, list[float]], kept_steps: list[int]
) -> None:
    """Records `history` for checkpoint `step`, dropping the steps orbax no longer keeps."""
    path = directory / HISTORY_FILE
    recorded = json.loads(path.read_text()) if path.exists() else {}
    recorded[str(step)] = history
    recorded = {s: h for s, h in recorded.items() if int(s) in {*kept_steps, step}}
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(recorded))
    os.replace(temporary, path)  # atomic: an interrupted write leaves the old file


@contextlib.contextmanager
def _interrupts_deferred():
    """Holds Ctrl-C back until the block ends, so that a checkpoint is never half written."""
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _remove_unfinished_saves(directory: Path) -> None:
    for leftover in directory.glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)


def train(trainer: Trainer, data: Digits, args: argparse.Namespace) -> dict[str, Any] | None:
    """Trains for args.epochs (resuming from a checkpoint if asked); returns the history.

    Returns None, having changed nothing, when the checkpoint resumed from already covers
    args.epochs. Raises `Interrupted` on Ctrl-C, after finishing the checkpoint in flight.
    """
    num_train = len(data.x_train)
    steps_per_epoch = num_train // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    every = args.checkpoint_every or steps_per_epoch
    manager = _open_manager(args) if args.checkpoint_dir else None
    step = 0
    history: dict[str, list[float]] = {"epoch": [], "train_loss": [], "test_accuracy": []}
    if manager is not None and args.resume and manager.latest_step() is not None:
        # The fresh trainer's tree is the restore target: types and dtypes come from it, and a
        # checkpoint of another model or optimizer configuration is refused before training.
        restored = rj.checkpoint.restore(manager, checkpoint_tree(trainer, args))
        step = int(restored["step"])
        _check_data_order(restored["data_order"], args, step)
        if step >= total_steps:
            manager.close()
            print(
                f"nothing to do: the checkpoint in {args.checkpoint_dir} is at step {step} "
                f"(epoch {step / steps_per_epoch:g}), which covers the {args.epochs} epochs "
                "asked for; pass a larger --epochs to train further",
                file=sys.stderr,
            )
            return None
        trainer.load_checkpoint_tree(restored)
        recorded = _read_history(args.checkpoint_dir, step)
        if recorded is None:
            print(
                f"note: {args.checkpoint_dir} has no history for step {step}; the history "
                f"starts at epoch {step // steps_per_epoch + 1}",
                file=sys.stderr,
            )
        else:
            history = recorded
        print(
            f"resumed from {args.checkpoint_dir} at step {step} "
            f"(epoch {step / steps_per_epoch:g} of {args.epochs})",
            file=sys.stderr,
        )
    elif manager is not None and args.resume:  # a mistyped directory shows here
        print(
            f"note: {args.checkpoint_dir} holds no checkpoint yet, so training starts at step 0",
            file=sys.stderr,
        )
    start_epoch = step // steps_per_epoch
    bar = Progress(
        range(start_epoch, args.epochs),
        desc=args.optimizer,
        initial=start_epoch,
        total=args.epochs,
        unit="epoch",
    )
    last_saved = step if step > 0 else None  # the checkpoint resumed from

    def save(at_step: int) -> None:
        nonlocal last_saved
        assert manager is not None  # every call is under a `manager is not None` check
        with _interrupts_deferred():
            rj.checkpoint.save(manager, at_step, checkpoint_tree(trainer, args))
            kept = list(manager.all_steps())
            _write_history(args.checkpoint_dir, at_step, history, kept)
            last_saved = at_step

    try:
        for epoch in bar:
            for batch_step in range(
                max(step, epoch * steps_per_epoch), (epoch + 1) * steps_per_epoch
            ):
                idx = batch_indices(args.seed, batch_step, num_train, args.batch_size)
                trainer.train_step(data.x_train[idx], data.y_train[idx])
                step = batch_step + 1
                if manager is not None and step % every == 0 and step % steps_per_epoch:
                    save(step)  # within an epoch; at its end, after the history has it
            train_loss, _ = loss_and_accuracy(trainer.logits(data.x_train), data.y_train)
            _, test_accuracy = loss_and_accuracy(trainer.logits(data.x_test), data.y_test)
            history["epoch"].append(epoch + 1)
            history["train_loss"].append(train_loss)
            history["test_accuracy"].append(test_accuracy)
            bar.set_postfix(loss=format_loss(train_loss), test_acc=f"{test_accuracy:.2%}")
            if manager is not None and (step % every == 0 or step == total_steps):
                save(step)
    except KeyboardInterrupt:
        bar.close()
        if manager is not None:
            with _interrupts_deferred():
                manager.wait_until_finished()  # the save in flight completes
                manager.close()
                _remove_unfinished_saves(args.checkpoint_dir)
        raise Interrupted(step, last_saved) from None
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    train_loss, _ = loss_and_accuracy(trainer.logits(data.x_train), data.y_train)
    _, test_accuracy = loss_and_accuracy(trainer.logits(data.x_test), data.y_test)
    return {
        "optimizer": args.optimizer,
        "learning_rate": DEFAULT_LEARNING_RATES[args.optimizer]
        if args.learning_rate is None
        else args.learning_rate,
        "steps": total_steps,
        "final_train_loss": train_loss,
        "test_accuracy": test_accuracy,
        "history": history,
    }


def _timed_run(
    make_trainer: Callable[[argparse.Namespace], Trainer], data: Digits, args: argparse.Namespace
) -> dict[str, Any] | None:
    start = time.perf_counter()
    result = train(make_trainer(args), data, args)
    if result is not None:
        result["wall_time_s"] = time.perf_counter() - start  # includes compilation
    return result


def main(
    argv: Sequence[str] | None,
    make_trainer: Callable[[argparse.Namespace], Trainer],
    description: str,
    framework: str,
    default_out: str,
) -> list[dict[str, Any]]:
    """Parses the flags, trains one optimizer or (--compare) all, writes results to --out."""
    parser = build_parser(description, default_out)
    args = parse_args(parser, argv)
    data = load_data()
    if args.batch_size > len(data.x_train):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(data.x_train)} examples")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in OPTIMIZERS if args.compare else (args.optimizer,):
        run_args = copy.copy(args)
        run_args.optimizer = name
        runs.append(run_args)
    if args.compare:
        # Untimed: the first optimizer would otherwise also pay for compiling the model's
        # initialization and evaluation, which every later one reuses.
        warm_up = make_trainer(runs[0])
        warm_up.train_step(data.x_train[: args.batch_size], data.y_train[: args.batch_size])
        warm_up.logits(data.x_train)
        warm_up.logits(data.x_test)
    timed = [_timed_run(make_trainer, data, run_args) for run_args in runs]
    results = [result for result in timed if result is not None]
    if len(results) < len(timed):
        return []  # resumed with nothing left to do: the outputs stay as they were
    for r in results:
        print(
            f"{r['optimizer']}: test accuracy {r['test_accuracy']:.2%}, final train loss "
            f"{r['final_train_loss']:.2e}, {r['wall_time_s']:.1f} s including compilation"
        )
    stem = "compare" if args.compare else f"history_{args.optimizer}"
    for r in results:
        r.update(framework=framework, epochs=args.epochs, batch_size=args.batch_size)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    title = (
        f"{framework} CNN ({args.hidden_size} hidden) on sklearn digits, "
        f"batch {args.batch_size}, seed {args.seed}"
    )
    digits_report.plot(results, args.out / f"{stem}.png", title)
    if args.compare:
        (args.out / "compare.md").write_text(digits_report.table(results))
        print(digits_report.table(results), end="")
    suffixes = ".json, .md and .png" if args.compare else ".json and .png"
    print(f"wrote {args.out / stem}{suffixes}", file=sys.stderr)
    return results


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues this run from its latest checkpoint."""
    flags = [flag for flag in argv if flag != "--resume"]
    return shlex.join(["python", sys.argv[0], *flags, "--resume"])


def run_cli(main_fn: Callable[[], object]) -> None:
    """Runs an example's main: checkpoint problems and Ctrl-C end with one line, not a trace."""
    try:
        main_fn()
    except (rj.checkpoint.CheckpointMismatchError, FileExistsError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    except Interrupted as stop:
        if stop.saved_step is None:
            sys.stderr.write(
                f"interrupted at step {stop.step}; nothing was saved (with --checkpoint-dir, "
                "a run can be resumed)\n"
            )
        else:
            sys.stderr.write(
                f"interrupted at step {stop.step}; resume from the checkpoint at step "
                f"{stop.saved_step} with: {resume_command(sys.argv[1:])}\n"
            )
        sys.exit(130)  # the shell's code for a process stopped by Ctrl-C
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
