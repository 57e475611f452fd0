"""One vmapped sweep of 16 configurations against 16 sequential runs of the same jitted training.

The training: a one-hidden-layer MLP on scikit-learn's digits, `--steps` RMSprop steps on
minibatches in a `jax.lax.scan`, configurations differing in learning rate and decay. The
sequential peer calls one `jax.jit`-compiled training function 16 times (compiled once, for
scalar hyperparameters); the sweep is `rj.sweep.run` (all 16 vmapped in one program).
Compilation is excluded from the timed runs (each function runs once first) and reported
separately as the first call's time minus the median run. Times are medians over `--repeats`.

    python benchmarks/sweep.py            # about 1 minute on 2 CPU cores
    python benchmarks/sweep.py --quick    # hidden sizes 4 and 32, 3 repeats: under a minute

Prints a table and writes a new outputs/benchmarks/sweep_<platform>_<time>.json;
`--update-results` replaces benchmarks/results/sweep_<platform>.json instead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _machine import describe_machine
from _results import (
    Durations,
    announce,
    new_parser,
    parse_args,
    positive_integer,
    write_results,
)
from sklearn.datasets import load_digits

import rmsprop_jax as rj

CONFIGURATIONS = 16
BATCH = 128


def make_train(hidden: int, steps: int) -> Callable[..., Any]:
    def train(x, y, learning_rate, decay):
        features = x.shape[1]
        k1, k2 = jax.random.split(jax.random.key(0))
        params = {
            "w1": jax.random.normal(k1, (features, hidden)) * jnp.sqrt(2.0 / features),
            "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, 10)) * jnp.sqrt(1.0 / hidden),
            "b2": jnp.zeros(10),
        }
        optimizer = rj.rmsprop(learning_rate, decay)

        def loss_fn(params, xb, yb):
            logits = jax.nn.relu(xb @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        def step(carry, i):
            params, state = carry
            start = (i * BATCH) % (x.shape[0] - BATCH)
            xb = jax.lax.dynamic_slice_in_dim(x, start, BATCH)
            yb = jax.lax.dynamic_slice_in_dim(y, start, BATCH)
            loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        _, losses = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(steps))
        return losses[-1]

    return train


def timed(fn: Callable[[], Any]) -> float:
    begin = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - begin


def measure(
    hidden: int, steps: int, repeats: int, x: jax.Array, y: jax.Array, grid: dict[str, jax.Array]
) -> dict[str, Any]:
    train = make_train(hidden, steps)
    jitted = jax.jit(train)
    configs = [(grid["learning_rate"][i], grid["decay"][i]) for i in range(CONFIGURATIONS)]

    def sequential():
        # Dispatched back to back and waited for once, as JAX's asynchronous dispatch allows.
        return [jitted(x, y, lr, decay) for lr, decay in configs]

    def vmapped():
        return rj.sweep.run(train, grid, x, y).results

    first = {"sequential": timed(lambda: jitted(x, y, *configs[0])), "vmapped": timed(vmapped)}
    one_sequential = statistics.median(timed(lambda: jitted(x, y, *configs[0])) for _ in range(3))
    runs: dict[str, list[float]] = {"sequential": [], "vmapped": []}
    for _ in range(repeats):  # interleaved, so that load from other users hits both alike
        runs["sequential"].append(timed(sequential))
        runs["vmapped"].append(timed(vmapped))
    median = {name: statistics.median(times) for name, times in runs.items()}
    # RMSprop turns near-zero gradients into full-size steps whose sign rounding decides, so
    # one-ulp differences between batched and unbatched matmuls grow over hundreds of steps.
    # After a few steps the losses still agree far closer than two configurations do.
    short = make_train(hidden, 5)
    swept = np.asarray(rj.sweep.run(short, grid, x, y).results)
    alone = [jax.jit(short)(x, y, lr, decay) for lr, decay in configs]
    check = np.allclose(swept, np.asarray(alone), rtol=1e-3)
    return {
        "hidden": hidden,
        "steps": steps,
        "sequential_s": median["sequential"],
        "vmapped_s": median["vmapped"],
        "speedup": median["sequential"] / median["vmapped"],
        "sequential_compile_s": first["sequential"] - one_sequential,
        "vmapped_compile_s": first["vmapped"] - median["vmapped"],
        "sequential_runs_s": runs["sequential"],
        "vmapped_runs_s": runs["vmapped"],
        "results_agree": bool(check),
    }


DURATIONS = Durations("about 1 minute on 2 CPU cores", "under a minute")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = new_parser(__doc__, DURATIONS)
    parser.add_argument(
        "--hidden",
        type=positive_integer,
        nargs="+",
        default=[4, 32, 256],
        help="hidden sizes of the MLP",
    )
    parser.add_argument(
        "--steps", type=positive_integer, default=300, help="training steps of every run"
    )
    parser.add_argument("--repeats", type=positive_integer, default=7, help="timed runs of each")
    parser.add_argument("--quick", action="store_true", help="hidden sizes 4 and 32, 3 repeats")
    args = parse_args(parser, argv)
    if args.quick:
        args.hidden, args.repeats = [4, 32], 3
    announce("sweep", args.quick, DURATIONS)

    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, jnp.float32)
    y = jnp.asarray(digits.target, jnp.int32)
    grid = rj.sweep.grid(learning_rate=np.geomspace(1e-3, 3e-2, 4), decay=[0.5, 0.9, 0.99, 0.999])
    assert len(grid["decay"]) == CONFIGURATIONS

    rows = [measure(hidden, args.steps, args.repeats, x, y, grid) for hidden in args.hidden]
    device = jax.devices()[0]
    report = {
        "benchmark": f"{CONFIGURATIONS} RMSprop trainings: one vmapped sweep vs sequential jit",
        "machine": describe_machine(),
        "repeats": args.repeats,
        "batch": BATCH,
        "rows": rows,
    }
    header = (
        f"{'hidden':>6} {'steps':>5} {'16 sequential':>14} {'1 vmapped':>10} {'speedup':>8} "
        f"{'compile seq':>12} {'compile vmap':>13}"
    )
    print(f"{report['benchmark']} on {report['machine']['cpu']} ({device.device_kind})")
    print(header)
    for r in rows:
        print(
            f"{r['hidden']:>6} {r['steps']:>5} {r['sequential_s']:>13.3f}s {r['vmapped_s']:>9.3f}s "
            f"{r['speedup']:>7.2f}x {r['sequential_compile_s']:>11.2f}s "
            f"{r['vmapped_compile_s']:>12.2f}s"
        )
    if not all(r["results_agree"] for r in rows):
        raise SystemExit("The vmapped and sequential final losses differ: the timing is void.")
    write_results("sweep", device.platform, args, report, indent=1)
    return report


if __name__ == "__main__":
    main()
