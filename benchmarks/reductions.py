"""What the reductions of the low-memory update steps cost, against elementwise passes.

An int8 leaf's update reduces each block to its maxima before it writes the codes, and a
factored matrix's reduces the squared gradient (centered: the spread |g - μ|², with the
bfloat16 `mu`) to row and column sums. Two measurements, each in one run:

1. On `memory.py`'s tree (16.8M parameters), the jitted, buffer-donated update step of the
   formats whose ratio to float32 misses its target while the float32 step gets more memory
   bandwidth (int8 plain, factored centered with momentum 0.9), beside the same steps with
   those reductions replaced by a stand-in that reads one element per block or matrix: its
   results are wrong, and it is timed only to show what the rest of the step costs. Rounds
   in a new random order each time; the median ratio to the float32 step of the same variant,
   over all rounds and over the third of them in which the float32 step ran fastest.
2. On one 4096 x 4096 float32 leaf, each kind of reduction these steps run, and one
   elementwise pass over the leaf (the float32 second moment's update, in place), timed in
   rounds in a new random order: milliseconds, the bytes each reads from memory per element,
   and those bytes per second. Two reductions that differ only in their number of input arrays
   (the same array read twice, through an optimization barrier, against two arrays) separate
   the cost of the second stream from that of the arithmetic.

    python benchmarks/reductions.py            # about 1 minute on 2 CPU cores
    python benchmarks/reductions.py --quick    # fewer rounds: under a minute

Writes a new outputs/benchmarks/reductions_<platform>_<time>.json; `--update-results`
replaces benchmarks/results/reductions_<platform>.json instead.
"""

from __future__ import annotations

import contextlib
import functools
import random
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from _machine import describe_machine
from _results import (
    Durations,
    announce,
    new_parser,
    parse_args,
    positive_integer,
    write_results,
)
from jax import lax
from memory import VARIANTS, compiled_update_step, interleaved_times, step_timing, the_tree
from memory_table import split_by_float32_speed

import rmsprop_jax as rj
from rmsprop_jax import storage
from rmsprop_jax.storage import int8

DURATIONS = Durations("about 1 minute on 2 CPU cores", "under a minute")
STAND_IN = "reductions replaced (wrong, timing only)"
LEAF_SHAPE = (4096, 4096)


@contextlib.contextmanager
def _replacing(module: Any, name: str, replacement: Callable[..., Any]) -> Iterator[list[int]]:
    """`module.name` replaced by `replacement` inside the block; yields a list that gets one
    entry per call of the replacement (the calls made while a step is traced)."""
    calls: list[int] = []

    def counted(*args: Any) -> Any:
        calls.append(1)
        return replacement(*args)

    original = getattr(module, name)
    setattr(module, name, counted)
    try:
        yield calls
    finally:
        setattr(module, name, original)


def block_maxima_stand_in() -> contextlib.AbstractContextManager[list[int]]:
    """int8's block maxima taken from each block's first element (and the top code): the
    step reads each leaf once less, and its block scales are wrong."""

    def first_elements(averages: list[tuple[Any, Any, bool]]) -> list[tuple[Any, Any]]:
        maxima = []
        for x, _, signed in averages:
            first = jnp.abs(int8.block_anchor(lax.stop_gradient(x).astype(jnp.float32)))
            top = (int8._SIGNED if signed else int8._UNSIGNED).top
            maxima.append((first, jnp.full(first.shape, top, jnp.int32)))
        return maxima

    return _replacing(int8, "finite_maxima", first_elements)


def statistics_stand_in() -> contextlib.AbstractContextManager[list[int]]:
    """The factored row and column sums taken from each matrix's first element: the step reads
    each large matrix twice less, and its statistics are wrong."""

    def first_element(x_of: Callable[..., Any], *arrays: Any) -> tuple[Any, Any]:
        shape = jax.tree.leaves(arrays)[0].shape
        corner = jax.tree.map(lambda a: a[..., :1, :1] if a.ndim >= 2 else a, arrays)
        first = x_of(*corner)[..., 0, 0]
        rows, cols = shape[-2], shape[-1]
        return (
            jnp.broadcast_to((first * cols)[..., None], shape[:-1]),
            jnp.broadcast_to((first * rows)[..., None], (*shape[:-2], cols)),
        )

    return _replacing(storage, "fused_sums", first_element)


def traced_with(stand_in: Callable[[], Any], trace: Callable[[], Any]) -> Any:
    """`trace()` (which traces and compiles a step) with `stand_in` in place; an error where
    the step never called the function it replaces (this JAX release's update takes another
    path, see `rmsprop_jax.storage._rows`), so that no real step is reported as a stand-in."""
    # The step's inner jitted functions are cached by JAX: cleared before, so that the
    # stand-in is traced rather than a real step's functions reused, and after, so that no
    # later real step reuses the stand-in's.
    jax.clear_caches()
    with stand_in() as calls:
        result = trace()
    jax.clear_caches()
    if not calls:
        raise RuntimeError(
            f"{stand_in.__name__}: the step never called the function it replaces; with JAX "
            f"{jax.__version__} these updates take another path, so this measurement does "
            "not apply (see rmsprop_jax/storage/_rows.py)."
        )
    return result


# (variant, name) -> (moment_storage, the stand-in's context, or None for the real step).
STEPS: dict[tuple[str, str], tuple[str, Callable[[], Any] | None]] = {
    ("plain", "float32"): ("float32", None),
    ("plain", "int8"): ("int8", None),
    ("plain", f"int8, {STAND_IN}"): ("int8", block_maxima_stand_in),
    ("centered + momentum", "float32"): ("float32", None),
    ("centered + momentum", "factored"): ("factored", None),
    ("centered + momentum", f"factored, {STAND_IN}"): ("factored", statistics_stand_in),
}


def measure_steps(repeats: int, steps: int) -> dict[str, Any]:
    """The steps of :data:`STEPS` on the tree, interleaved; ratios to float32's."""
    key, grads, parameters = the_tree()
    steppers, carries = {}, {}
    for (variant, name), (moment_storage, stand_in) in STEPS.items():
        tx = rj.rmsprop(1e-3, moment_storage=moment_storage, **VARIANTS[variant])
        compile_step = functools.partial(compiled_update_step, tx, key, grads)
        if stand_in is None:
            compiled, start = compile_step()
        else:
            compiled, start = traced_with(stand_in, compile_step)
        steppers[variant, name] = compiled
        carries[variant, name] = compiled(*start, grads)  # warm up
    times = interleaved_times(steppers, carries, grads, repeats, steps)
    variants: dict[str, dict[str, Any]] = {variant: {} for variant, _ in STEPS}
    for (variant, name), seconds in times.items():
        variants[variant][name] = step_timing(seconds, times[variant, "float32"]) | {
            "seconds_per_repeat": seconds
        }
    split = split_by_float32_speed({"update_step": {"variants": variants}})
    for variant, rows in variants.items():
        for name, row in rows.items():
            row["relative_to_float32_fastest_third"] = split[variant]["ratios"][name]["fast"]
    return {"parameters": parameters, "variants": variants}


def _spread(g: jax.Array, mu: jax.Array) -> jax.Array:
    return jnp.square(g - mu.astype(jnp.float32))


def _twice(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`g` as two operands that no compiler merges (one buffer, read as two inputs)."""
    return lax.optimization_barrier((g, g))


def _block_maxima(g: jax.Array, codes: jax.Array) -> tuple[jax.Array, jax.Array]:
    (maxima,) = int8.finite_maxima([(jnp.square(g), codes, False)])
    return maxima


SQUARES_ROWS = "row sums of g²"
SPREAD_ROWS = (
    "row sums of (g - μ)², μ bfloat16, with a count of non-finite entries (factored, centered)"
)
SPREAD_ROWS_ALONE = "row sums of (g - μ)², μ bfloat16, a sum alone (library kernel)"
SPREAD_COLUMNS = "column sums of (g - μ)², μ bfloat16 (factored, centered)"
# name -> (bytes read per element, function of (g, h, mu, codes)).
REDUCTIONS: dict[str, tuple[int, Callable[..., Any]]] = {
    SQUARES_ROWS: (4, lambda g, h, mu, codes: jnp.sum(jnp.square(g), axis=-1)),
    "column sums of g²": (4, lambda g, h, mu, codes: jnp.sum(jnp.square(g), axis=-2)),
    "row sums of g³ (one multiply more)": (4, lambda g, h, mu, codes: jnp.sum(g * g * g, -1)),
    "row sums of g·g, g read as two operands": (
        4,
        lambda g, h, mu, codes: jnp.sum(jnp.multiply(*_twice(g)), axis=-1),
    ),
    "row sums of g·h, two float32 arrays": (8, lambda g, h, mu, codes: jnp.sum(g * h, -1)),
    # As the factored step takes them: a reduction of two operands, XLA's own loop.
    SPREAD_ROWS: (6, lambda g, h, mu, codes: storage.fused_sums(_spread, g, mu)[0]),
    SPREAD_ROWS_ALONE: (6, lambda g, h, mu, codes: jnp.sum(_spread(g, mu), axis=-1)),
    SPREAD_COLUMNS: (
        6,
        lambda g, h, mu, codes: jnp.sum(_spread(g, mu), axis=-2),
    ),
    "block maxima of g² and the codes (int8)": (
        5,
        lambda g, h, mu, codes: _block_maxima(g, codes),
    ),
}
ELEMENTWISE = "elementwise pass: nu = 0.9 nu + 0.1 g², in place (float32)"
ELEMENTWISE_BYTES = 12  # reads g and nu, writes nu


def measure_leaf(repeats: int, calls: int) -> dict[str, Any]:
    """Milliseconds per call of each of :data:`REDUCTIONS` and of the elementwise pass on one
    leaf, in `repeats` rounds of `calls` calls, the kernels in a new random order each round."""
    keys = jax.random.split(jax.random.key(0), 3)
    g, h = (jax.random.normal(k, LEAF_SHAPE) for k in keys[:2])
    mu = (0.1 * jax.random.normal(keys[2], LEAF_SHAPE)).astype(jnp.bfloat16)
    codes = jax.random.randint(keys[2], LEAF_SHAPE, 0, 254).astype(jnp.uint8)
    kernels = {
        name: jax.jit(fn).lower(g, h, mu, codes).compile() for name, (_, fn) in REDUCTIONS.items()
    }
    update = jax.jit(lambda nu, g: 0.9 * nu + 0.1 * jnp.square(g), donate_argnums=0)
    nu = update(jnp.ones(LEAF_SHAPE), g)
    times: dict[str, list[float]] = {name: [] for name in [*kernels, ELEMENTWISE]}
    for kernel in kernels.values():
        jax.block_until_ready(kernel(g, h, mu, codes))
    order = list(times)
    for _ in range(repeats):
        random.Random(len(times[ELEMENTWISE])).shuffle(order)
        for name in order:
            started = time.perf_counter()
            for _ in range(calls):
                if name == ELEMENTWISE:
                    nu = update(nu, g)
                    result = nu
                else:
                    result = kernels[name](g, h, mu, codes)
            jax.block_until_ready(result)
            times[name].append((time.perf_counter() - started) / calls)
    elements = g.size
    rows = {}
    for name, seconds in times.items():
        read = ELEMENTWISE_BYTES if name == ELEMENTWISE else REDUCTIONS[name][0]
        median = statistics.median(seconds)
        rows[name] = {
            "milliseconds": median * 1e3,
            "bytes_per_element": read,
            "gigabytes_per_second": read * elements / median / 1e9,
            "relative_to_elementwise_pass": median / statistics.median(times[ELEMENTWISE]),
            "seconds_per_repeat": seconds,
        }
    return {"shape": list(LEAF_SHAPE), "kernels": rows}


def step_rows(record: dict[str, Any]) -> list[str]:
    """The markdown rows of the steps table."""
    lines = []
    for variant, rows in record["variants"].items():
        for name, row in rows.items():
            low, high = row["relative_to_float32_quartiles"]
            lines.append(
                f"| {variant} | {name} | {row['median_seconds'] * 1e3:.2f} | "
                f"{row['relative_to_float32']:.2f}x | {low:.2f}x-{high:.2f}x | "
                f"{row['relative_to_float32_fastest_third']:.2f}x |"
            )
    return lines


def leaf_rows(record: dict[str, Any]) -> list[str]:
    """The markdown rows of the one-leaf table."""
    return [
        f"| {name} | {row['bytes_per_element']} | {row['milliseconds']:.2f} | "
        f"{row['gigabytes_per_second']:.1f} | {row['relative_to_elementwise_pass']:.2f}x |"
        for name, row in record["kernels"].items()
    ]


def _step(record: dict[str, Any], variant: str, name: str) -> tuple[str, str]:
    row = record["update_step"]["variants"][variant][name]
    return (
        f"{row['relative_to_float32']:.2f}x",
        f"{row['relative_to_float32_fastest_third']:.2f}x",
    )


def _rate(record: dict[str, Any], name: str) -> str:
    return f"{record['leaf']['kernels'][name]['gigabytes_per_second']:.1f}"


def factored_sentence(record: dict[str, Any]) -> str:
    """What benchmarks/README.md says of the factored centered step, from a record."""
    real = _step(record, "centered + momentum", "factored")
    stand_in = _step(record, "centered + momentum", f"factored, {STAND_IN}")
    return (
        "with its row and column sums replaced by a stand-in that reads one element per matrix "
        f"(wrong, for timing only) the step ran at {stand_in[0]} float32's ({stand_in[1]} in the "
        f"fastest third of the rounds), the real one at {real[0]} ({real[1]}); on one 4096 x "
        f"4096 leaf the spread's row and column sums read {_rate(record, SPREAD_ROWS)} and "
        f"{_rate(record, SPREAD_COLUMNS)} GB/s (the row sums as a sum alone: "
        f"{_rate(record, SPREAD_ROWS_ALONE)}), the squared gradient's row sums "
        f"{_rate(record, SQUARES_ROWS)}, where an elementwise pass moves "
        f"{_rate(record, ELEMENTWISE)}."
    )


def int8_sentence(record: dict[str, Any]) -> str:
    """What benchmarks/README.md says of the int8 plain step, from a record."""
    real = _step(record, "plain", "int8")
    stand_in = _step(record, "plain", f"int8, {STAND_IN}")
    return (
        "with its block maxima replaced by a stand-in that reads one element per block (wrong, "
        f"for timing only), the plain step ran at {stand_in[0]} float32's, and at {stand_in[1]} "
        f"in the fastest third of the rounds, against the real one's {real[0]} and {real[1]}."
    )


def print_tables(steps: dict[str, Any], leaf: dict[str, Any]) -> None:
    print(f"\nUpdate steps on {steps['parameters']:,} parameters\n")
    print("| variant | step | ms | vs float32 | middle half | fastest third of float32 |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(step_rows(steps)))
    print(f"\nOne {leaf['shape'][0]} x {leaf['shape'][1]} float32 leaf\n")
    print("| kernel | bytes read per element | ms | GB/s | vs elementwise pass |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(leaf_rows(leaf)))
    record = {"update_step": steps, "leaf": leaf}
    print(f"\nfactored, centered + momentum: ... {factored_sentence(record)}")
    print(f"\nint8, plain: ... {int8_sentence(record)}")


def main(argv: list[str] | None = None) -> None:
    parser = new_parser(__doc__, DURATIONS)
    parser.add_argument("--quick", action="store_true", help="3 rounds of each measurement")
    parser.add_argument("--repeats", type=positive_integer, default=15, help="rounds")
    parser.add_argument(
        "--steps", type=positive_integer, default=5, help="steps or calls per round"
    )
    args = parse_args(parser, argv)
    announce("reductions", args.quick, DURATIONS)
    repeats = 3 if args.quick else args.repeats
    steps = measure_steps(repeats, args.steps)
    leaf = measure_leaf(repeats, args.steps)
    print_tables(steps, leaf)
    record = {
        "machine": describe_machine(),
        "timing": {"repeats": repeats, "steps_per_repeat": args.steps},
        "update_step": steps,
        "leaf": leaf,
    }
    write_results("reductions", jax.default_backend(), args, record)


if __name__ == "__main__":
    main()
