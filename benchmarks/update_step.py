"""Time of one RMSprop "update + apply" step against optax, PyTorch and a bare SGD step.

Every contender runs the same step on the same parameter tree (float32, `--sizes` parameters
split into `--leaves` equal leaves): compute the update from a fixed gradient, apply it, keep
the state. JAX steps are `jax.jit`-compiled with the parameters and state donated, so they
update in place like PyTorch does. Contenders are interleaved (in a new random order each
round) and repeated; the table reports medians, the ratio of each to the peer named in its
row (the median over rounds of the ratio within a round), and the achieved bandwidth (bytes
the step must move at least, divided by its time) against the machine's streaming bandwidth
measured in the same rounds (an in-place STREAM triad over one array of the same size, the
faster of PyTorch and JAX).
`rj.pack_small_leaves` (leaves of at most 2048 elements packed, and every leaf packed)
measures what grouping leaves buys.

The tables printed last are the ones in benchmarks/README.md.

    python benchmarks/update_step.py                 # the full grid: about 20 minutes
    python benchmarks/update_step.py --quick         # 1M parameters, 3 trees: about 3 minutes

Writes a new outputs/benchmarks/update_step_<platform>_<time>.json; `--update-results`
replaces benchmarks/results/update_step_<platform>.json instead. Without PyTorch its rows
are left out, with a note naming the extra that installs it.
"""

from __future__ import annotations

import functools
import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from _machine import describe_machine
from _results import (
    Durations,
    announce,
    missing_contenders,
    new_parser,
    parse_args,
    positive_integer,
    write_results,
)

import rmsprop_jax as rj

LEARNING_RATE = 1e-3
COMPILES = 2  # compilations of each JAX step; the faster one's time is reported
# Minimum bytes per parameter each step must move in float32: read the gradient, read and
# write every state buffer and the parameter.
PLAIN_BYTES, CENTERED_MOMENTUM_BYTES, SGD_BYTES = 20, 36, 12


def make_tree(total: int, leaves: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    size = total // leaves
    return {f"leaf{i:04d}": rng.standard_normal(size, dtype=np.float32) for i in range(leaves)}


def _step_function(tx: optax.GradientTransformation | None) -> Callable:
    """A new "update + apply" step function of `tx` (SGD when None)."""
    if tx is None:
        return lambda p, s, g: (jax.tree.map(lambda p, g: p - LEARNING_RATE * g, p, g), s)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


class JaxContender:
    """A jitted, donated step of an optax transformation (or of SGD when `tx` is None)."""

    def __init__(
        self,
        tx: optax.GradientTransformation | None,
        params: dict[str, np.ndarray],
        grads: dict[str, np.ndarray],
    ):
        self.grads = jax.device_put(grads)
        self.params = jax.device_put(params)
        self.state = () if tx is None else tx.init(self.params)
        # The faster of COMPILES compilations, each of a new function (nothing cached): one
        # compilation's time moves by a fifth between runs on a shared machine.
        self.compile_seconds = math.inf
        for _ in range(COMPILES):
            started = time.perf_counter()
            self.step = (
                jax.jit(_step_function(tx), donate_argnums=(0, 1))
                .lower(self.params, self.state, self.grads)
                .compile()
            )
            self.compile_seconds = min(self.compile_seconds, time.perf_counter() - started)

    def run(self, steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            self.params, self.state = self.step(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))
        return (time.perf_counter() - started) / steps


class TorchContender:
    def __init__(
        self,
        params: dict[str, np.ndarray],
        grads: dict[str, np.ndarray],
        foreach: bool,
        **kwargs: Any,
    ):
        import torch

        self.torch = torch
        self.params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params.values()]
        for p, g in zip(self.params, grads.values(), strict=True):
            p.grad = torch.from_numpy(g.copy())
        self.optimizer = torch.optim.RMSprop(
            self.params, lr=LEARNING_RATE, foreach=foreach, **kwargs
        )
        self.compile_seconds = 0.0

    def run(self, steps: int) -> float:
        started = time.perf_counter()
        with self.torch.no_grad():
            for _ in range(steps):
                self.optimizer.step()
        return (time.perf_counter() - started) / steps


class TorchTriad:
    """PyTorch's in-place triad a += s * b over one array: a streaming-bandwidth probe."""

    def __init__(self, elements: int):
        import torch

        self.torch = torch
        self.a, self.b = torch.ones(elements), torch.ones(elements)
        self.compile_seconds = 0.0

    def run(self, steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            self.torch.add(self.a, self.b, alpha=LEARNING_RATE, out=self.a)
        return (time.perf_counter() - started) / steps


STREAM_PROBES = ("stream: jax triad, 1 array", "stream: torch triad, 1 array")


def contenders(
    params: dict[str, np.ndarray], grads: dict[str, np.ndarray], with_torch: bool
) -> dict[str, tuple[Callable[[], Any], int]]:
    """name -> (factory, minimum bytes per parameter)."""
    settings: dict[str, Any] = dict(decay=0.99, eps=1e-8)
    total = sum(p.size for p in params.values())
    one_array = {"all": np.concatenate(list(params.values()))}
    entries: dict[str, tuple[Callable[[], Any], int]] = {
        STREAM_PROBES[0]: (
            lambda: JaxContender(None, one_array, {"all": np.ones(total, np.float32)}),
            SGD_BYTES,
        ),
        "sgd (floor)": (lambda: JaxContender(None, params, grads), SGD_BYTES),
        "rj.rmsprop": (
            lambda: JaxContender(rj.rmsprop(LEARNING_RATE, **settings), params, grads),
            PLAIN_BYTES,
        ),
        "optax.rmsprop": (
            lambda: JaxContender(
                optax.rmsprop(LEARNING_RATE, **settings, eps_in_sqrt=False), params, grads
            ),
            PLAIN_BYTES,
        ),
        "optax.flatten(rmsprop)": (
            lambda: JaxContender(
                optax.flatten(optax.rmsprop(LEARNING_RATE, **settings, eps_in_sqrt=False)),
                params,
                grads,
            ),
            PLAIN_BYTES,
        ),
        "rj.pack_small_leaves(rmsprop)": (
            lambda: JaxContender(
                rj.pack_small_leaves(rj.rmsprop(LEARNING_RATE, **settings)), params, grads
            ),
            PLAIN_BYTES,
        ),
        "rj.pack_small_leaves(rmsprop), all leaves": (
            lambda: JaxContender(
                rj.pack_small_leaves(rj.rmsprop(LEARNING_RATE, **settings), max_size=None),
                params,
                grads,
            ),
            PLAIN_BYTES,
        ),
        "rj.rmsprop centered+momentum": (
            lambda: JaxContender(
                rj.rmsprop(LEARNING_RATE, **settings, centered=True, momentum=0.9), params, grads
            ),
            CENTERED_MOMENTUM_BYTES,
        ),
        "rj.pack_small_leaves(rmsprop centered+momentum)": (
            lambda: JaxContender(
                rj.pack_small_leaves(
                    rj.rmsprop(LEARNING_RATE, **settings, centered=True, momentum=0.9)
                ),
                params,
                grads,
            ),
            CENTERED_MOMENTUM_BYTES,
        ),
        "optax.rmsprop centered+momentum": (
            lambda: JaxContender(
                optax.rmsprop(
                    LEARNING_RATE, **settings, eps_in_sqrt=False, centered=True, momentum=0.9
                ),
                params,
                grads,
            ),
            CENTERED_MOMENTUM_BYTES,
        ),
    }
    if with_torch:
        entries[STREAM_PROBES[1]] = (lambda: TorchTriad(total), SGD_BYTES)
        for foreach in (True, False):
            entries[f"torch foreach={foreach}"] = (
                functools.partial(TorchContender, params, grads, foreach, alpha=0.99),
                PLAIN_BYTES,
            )
            entries[f"torch foreach={foreach} centered+momentum"] = (
                functools.partial(
                    TorchContender, params, grads, foreach, alpha=0.99, centered=True, momentum=0.9
                ),
                CENTERED_MOMENTUM_BYTES,
            )
    return entries


# Each row's ratio is against this peer, measured in the same run on the same tree.
PEERS = {
    "rj.rmsprop": "optax.rmsprop",
    "rj.rmsprop centered+momentum": "optax.rmsprop centered+momentum",
}
# Leaf grouping (a packed state) against the per-leaf step.
GROUPING_PEERS = {
    "rj.pack_small_leaves(rmsprop)": "rj.rmsprop",
    "rj.pack_small_leaves(rmsprop), all leaves": "rj.rmsprop",
    "rj.pack_small_leaves(rmsprop centered+momentum)": "rj.rmsprop centered+momentum",
    "optax.flatten(rmsprop)": "rj.rmsprop",
}


def measure(total: int, leaves: int, repeats: int, with_torch: bool) -> dict[str, dict[str, float]]:
    params = make_tree(total, leaves, seed=0)
    grads = make_tree(total, leaves, seed=1)
    built = {}
    minimum_bytes = {}
    for name, (factory, bytes_per_parameter) in contenders(params, grads, with_torch).items():
        built[name] = factory()
        minimum_bytes[name] = bytes_per_parameter * total
        built[name].run(1)
    # Enough steps per sample that a sample takes about 50 ms.
    steps = {name: max(1, int(0.05 / max(c.run(1), 1e-6))) for name, c in built.items()}
    samples: dict[str, list[float]] = {name: [] for name in built}
    # A new order every round: a contender that leaves the memory system disturbed (large
    # temporaries freed, as optax.flatten does) must not always slow down the same successor.
    order = np.random.default_rng(total + leaves)
    for _ in range(repeats):
        for name in order.permutation(list(built)):
            samples[name].append(built[name].run(steps[name]))
    results = {}
    for name, times in samples.items():
        median = statistics.median(times)
        results[name] = {
            "seconds": median,
            "samples_seconds": times,
            "minimum_bytes": minimum_bytes[name],
            "bandwidth_bytes_per_second": minimum_bytes[name] / median,
            "compile_seconds": built[name].compile_seconds,
        }
    del built
    gc.collect()
    return results


def paired_ratio(results: dict, ours: str, theirs: str) -> float:
    """Median over rounds of ours / theirs, both measured within one round.

    Pairing cancels the drift of a shared machine's bandwidth between rounds, which moves
    both members of a pair together.
    """
    pairs = zip(results[ours]["samples_seconds"], results[theirs]["samples_seconds"], strict=True)
    return statistics.median(a / b for a, b in pairs)


def paired_fraction_of_stream(results: dict, name: str) -> float:
    """Median over rounds of `name`'s achieved bandwidth over the faster triad's in that round."""
    rounds = len(results[name]["samples_seconds"])
    fractions = []
    for i in range(rounds):
        stream = max(
            results[probe]["minimum_bytes"] / results[probe]["samples_seconds"][i]
            for probe in STREAM_PROBES
            if probe in results
        )
        fractions.append(
            results[name]["minimum_bytes"] / results[name]["samples_seconds"][i] / stream
        )
    return statistics.median(fractions)


def print_run(total: int, leaves: int, results: dict, stream: float) -> None:
    print(f"\n{total / 2**20:.0f}M parameters in {leaves} leaves (stream {stream / 1e9:.1f} GB/s)")
    print(f"{'contender':<34}{'ms':>9}{'GB/s':>7}{'% stream':>10}{'ratio':>7}  vs")
    for name, r in results.items():
        peer = (PEERS | GROUPING_PEERS).get(name)
        ratio = (
            f"{paired_ratio(results, name, peer):.2f}"
            if peer is not None and peer in results
            else ""
        )
        print(
            f"{name:<34}{r['seconds'] * 1e3:>9.2f}{r['bandwidth_bytes_per_second'] / 1e9:>7.1f}"
            f"{100 * r['bandwidth_bytes_per_second'] / stream:>10.0f}{ratio:>7}  {peer or ''}"
        )


def evaluate_targets(runs: list[dict]) -> dict[str, Any]:
    """The performance targets, each with the figures it was judged on."""

    def seconds(run, name):
        return run["results"][name]["seconds"] if name in run["results"] else None

    versus_optax = {
        f"{run['parameters']}/{run['leaves']}/{ours}": paired_ratio(run["results"], ours, theirs)
        for run in runs
        for ours, theirs in PEERS.items()
    }
    versus_torch = {}
    for run in runs:
        torch_times = [
            seconds(run, f"torch foreach={flag}")
            for flag in (True, False)
            if seconds(run, f"torch foreach={flag}") is not None
        ]
        if run["parameters"] == 16 * 2**20 and torch_times:
            fastest = min(
                (f"torch foreach={flag}" for flag in (True, False)),
                key=lambda name: seconds(run, name),
            )
            versus_torch[str(run["leaves"])] = paired_ratio(run["results"], "rj.rmsprop", fastest)
    bandwidth = {
        str(run["leaves"]): paired_fraction_of_stream(run["results"], "rj.rmsprop")
        for run in runs
        if run["parameters"] == 16 * 2**20
    }
    leaf_spread = {}
    for total in sorted({run["parameters"] for run in runs}):
        times = {
            run["leaves"]: seconds(run, "rj.rmsprop") for run in runs if run["parameters"] == total
        }
        fastest = min(times.values())
        leaf_spread[str(total)] = {str(k): v / fastest for k, v in times.items()}
    grouping = {
        f"{run['parameters']}/{run['leaves']}/{name}": paired_ratio(run["results"], name, peer)
        for run in runs
        for name, peer in GROUPING_PEERS.items()
    }
    return {
        "grouped_over_per_leaf": grouping,
        "rj_over_optax_max": max(versus_optax.values()),
        "rj_over_optax": versus_optax,
        "rj_over_fastest_torch_16M": versus_torch,
        "bandwidth_fraction_of_stream_16M": bandwidth,
        "step_time_over_fastest_leaf_count": leaf_spread,
        "met": {
            "rj <= 1.0x optax everywhere": max(versus_optax.values()) <= 1.0,
            "rj <= 0.5x fastest torch at 16M": bool(versus_torch)
            and max(versus_torch.values()) <= 0.5,
            ">= 70% of stream at 16M in 64 leaves": bandwidth.get("64", 0.0) >= 0.7,
            "leaf count within 1.5x": all(
                max(spread.values()) <= 1.5 for spread in leaf_spread.values()
            ),
        },
    }


def markdown_table(runs: list[dict]) -> str:
    """The tables of benchmarks/README.md: times in ms, ratios paired within a round."""

    def ms(run, name):
        return f"{run['results'][name]['seconds'] * 1e3:.2f}" if name in run["results"] else ""

    def ratio(run, ours, theirs):
        return f"{paired_ratio(run['results'], ours, theirs):.2f}"

    lines = [
        "| parameters | leaves | stream GB/s | SGD step | rj.rmsprop | optax.rmsprop | rj/optax "
        "| rj c+m | optax c+m | rj/optax c+m | torch foreach "
        "| torch for-loop | rj GB/s (% stream) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        ours = run["results"]["rj.rmsprop"]["bandwidth_bytes_per_second"]
        stream = run["stream_bytes_per_second"]
        fraction = paired_fraction_of_stream(run["results"], "rj.rmsprop")
        cells = [
            f"{run['parameters'] / 2**20:.0f}M",
            str(run["leaves"]),
            f"{stream / 1e9:.1f}",
            ms(run, "sgd (floor)"),
            ms(run, "rj.rmsprop"),
            ms(run, "optax.rmsprop"),
            ratio(run, "rj.rmsprop", "optax.rmsprop"),
            ms(run, "rj.rmsprop centered+momentum"),
            ms(run, "optax.rmsprop centered+momentum"),
            ratio(run, "rj.rmsprop centered+momentum", "optax.rmsprop centered+momentum"),
            ms(run, "torch foreach=True"),
            ms(run, "torch foreach=False"),
            f"{ours / 1e9:.1f} ({100 * fraction:.0f}%)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| parameters | leaves | elements per leaf | rj.rmsprop | packed | packed/rj "
        "| all packed | all/rj | rj c+m | packed c+m | packed/rj c+m |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    plain, every = "rj.pack_small_leaves(rmsprop)", "rj.pack_small_leaves(rmsprop), all leaves"
    centered = "rj.pack_small_leaves(rmsprop centered+momentum)"
    for run in runs:
        cells = [
            f"{run['parameters'] / 2**20:.0f}M",
            str(run["leaves"]),
            str(run["parameters"] // run["leaves"]),
            ms(run, "rj.rmsprop"),
            ms(run, plain),
            ratio(run, plain, "rj.rmsprop"),
            ms(run, every),
            ratio(run, every, "rj.rmsprop"),
            ms(run, "rj.rmsprop centered+momentum"),
            ms(run, centered),
            ratio(run, centered, "rj.rmsprop centered+momentum"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


DURATIONS = Durations("about 20 minutes on 2 CPU cores", "about 3 minutes", whole="full grid")
QUICK_SIZES, QUICK_LEAVES, QUICK_REPEATS = [2**20], [1, 64, 512], 3


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = new_parser(__doc__, DURATIONS)
    parser.add_argument(
        "--sizes",
        type=positive_integer,
        nargs="+",
        default=[2**20, 16 * 2**20, 64 * 2**20],
        help="parameters per tree",
    )
    parser.add_argument(
        "--leaves",
        type=positive_integer,
        nargs="+",
        default=[1, 64, 512, 2048],
        help="leaves per tree",
    )
    parser.add_argument("--repeats", type=positive_integer, default=7, help="interleaved rounds")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_SIZES[0] // 2**20}M parameters in {QUICK_LEAVES} leaves, "
        f"{QUICK_REPEATS} repeats",
    )
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    args = parse_args(parser, argv)
    if args.quick:
        args.sizes, args.leaves, args.repeats = QUICK_SIZES, QUICK_LEAVES, QUICK_REPEATS
    announce("update_step", args.quick, DURATIONS)
    skipped = {}
    with_torch = not args.no_torch
    note = missing_contenders("torch") if with_torch else None
    if note is not None:
        print(f"note: {note}", flush=True)
        skipped["torch"] = note
        with_torch = False

    runs = []
    for total in args.sizes:
        for leaves in args.leaves:
            results = measure(total, leaves, args.repeats, with_torch)
            # The machine's streaming bandwidth at this size: the faster in-place triad.
            stream = max(
                results[name]["bandwidth_bytes_per_second"]
                for name in STREAM_PROBES
                if name in results
            )
            runs.append(
                {
                    "parameters": total,
                    "leaves": leaves,
                    "stream_bytes_per_second": stream,
                    "results": results,
                }
            )
            print_run(total, leaves, results, stream)

    compiled = {
        "rj": "rj.rmsprop",
        "packed": "rj.pack_small_leaves(rmsprop)",
        "rj c+m": "rj.rmsprop centered+momentum",
        "packed c+m": "rj.pack_small_leaves(rmsprop centered+momentum)",
    }
    print(
        "\ncompile time of the step (s), from tracing to executable (the faster of "
        f"{COMPILES}), by leaf count:"
    )
    print(f"{'':>19}" + "".join(f"{label:>12}" for label in compiled))
    for run in runs:
        seconds = "".join(
            f"{run['results'][name]['compile_seconds']:>12.2f}" for name in compiled.values()
        )
        print(f"  {run['parameters'] / 2**20:>4.0f}M {run['leaves']:>5} leaves{seconds}")
    print("\n" + markdown_table(runs))
    targets = None
    if args.quick:
        print("\ntargets: judged on the full grid (16M parameters), not by --quick")
    else:
        targets = evaluate_targets(runs)
        print("\ntargets:")
        for name, met in targets["met"].items():
            print(f"  {'met    ' if met else 'NOT MET'}  {name}")
    report = {
        "machine": describe_machine(),
        "learning_rate": LEARNING_RATE,
        "runs": runs,
        "targets": targets,
        "skipped_contenders": skipped,
    }
    write_results("update_step", jax.default_backend(), args, report, indent=1)
    return report


if __name__ == "__main__":
    main()
