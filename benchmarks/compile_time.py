"""Compile time of the update step, per storage format, against float32 and optax's optimizers.

Every contender's jitted "update + apply" step (parameters and state donated, as in
`memory.py`) is built for trees of `--leaves` float32 leaves of 128 x 256 (32,768 elements,
a shape every low-memory format compresses) and timed twice from a fresh `jax.jit`: tracing
and lowering to StableHLO (Python, JAX), then XLA's compilation (`.compile()`), each the
faster of its two attempts, and their sum's ratio to the float32 step of the same variant and
tree. The references (optax.rmsprop, optax.adam, optax.adafactor) are in the plain rows.
Compile time grows with the number of leaves, since every leaf's update is its own piece of
the program (traced once per kind of leaf, but compiled by XLA per leaf).

    python benchmarks/compile_time.py            # 16, 64 and 256 leaves: about 2 minutes
    python benchmarks/compile_time.py --quick    # 16 and 64 leaves, one attempt: under a minute

Writes a new outputs/benchmarks/compile_time_<platform>_<time>.json; `--update-results`
replaces benchmarks/results/compile_time_<platform>.json instead.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
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
from memory import update_step

import rmsprop_jax as rj

LEAF_SHAPE = (128, 256)
LEAF_COUNTS = (16, 64, 256)
QUICK_LEAF_COUNTS = (16, 64)
ATTEMPTS = 2
FORMATS = ("float32", "bfloat16", "int8", "factored")
VARIANTS = {"plain": {}, "centered + momentum": {"centered": True, "momentum": 0.9}}
REFERENCES = {
    "optax.rmsprop": lambda: optax.rmsprop(1e-3),
    "optax.adam": lambda: optax.adam(1e-3),
    "optax.adafactor": lambda: optax.adafactor(1e-3),
}
DURATIONS = Durations("about 2 minutes on 2 CPU cores", "under a minute")


def abstract_tree(leaves: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {f"leaf{i:04d}": jax.ShapeDtypeStruct(LEAF_SHAPE, jnp.float32) for i in range(leaves)}


def contenders() -> dict[tuple[str, str], Any]:
    """(variant, name) -> a function building the transformation (a fresh one per attempt)."""
    built: dict[tuple[str, str], Any] = {}
    for variant, options in VARIANTS.items():
        for moment_storage in FORMATS:
            built[variant, moment_storage] = lambda m=moment_storage, o=options: rj.rmsprop(
                1e-3, moment_storage=m, **o
            )
    for name, build in REFERENCES.items():
        built["plain", name] = build
    return built


def time_compilation(tx: optax.GradientTransformation, leaves: int) -> tuple[float, float]:
    """Seconds to trace and lower, and to compile, a fresh jit of the donated update step."""
    params = abstract_tree(leaves)
    state = jax.eval_shape(tx.init, params)
    started = time.perf_counter()
    lowered = jax.jit(update_step(tx), donate_argnums=(0, 1)).lower(params, state, params)
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - started, time.perf_counter() - lowered_at


def measure(leaf_counts: tuple[int, ...], attempts: int) -> dict[str, Any]:
    time_compilation(rj.rmsprop(1e-3), 1)  # JAX's own first-use costs, charged to no one
    rows: dict[str, Any] = {}
    for leaves in leaf_counts:
        for (variant, name), build in contenders().items():
            times = [time_compilation(build(), leaves) for _ in range(attempts)]
            lower, compile_ = min(t[0] for t in times), min(t[1] for t in times)
            rows.setdefault(str(leaves), {}).setdefault(variant, {})[name] = {
                "lower_seconds": lower,
                "compile_seconds": compile_,
                "total_seconds": lower + compile_,
                "attempts": [{"lower_seconds": a, "compile_seconds": b} for a, b in times],
            }
            print(f"  {leaves} leaves, {variant}, {name}: {lower + compile_:.2f} s", flush=True)
        for variant_rows in rows[str(leaves)].values():
            reference = variant_rows["float32"]["total_seconds"]
            for row in variant_rows.values():
                row["relative_to_float32"] = row["total_seconds"] / reference
    return rows


def print_table(rows: dict[str, Any]) -> None:
    print("\nUpdate step compile time: trace + lower, XLA compile, total (s); total vs float32")
    print(
        f"{'leaves':>6} {'variant':<20} {'step':<16} {'lower':>7} {'compile':>8} {'total':>7} "
        f"{'vs f32':>7}"
    )
    for leaves, variants in rows.items():
        for variant, contenders_ in variants.items():
            for name, r in contenders_.items():
                print(
                    f"{leaves:>6} {variant:<20} {name:<16} {r['lower_seconds']:>7.2f} "
                    f"{r['compile_seconds']:>8.2f} {r['total_seconds']:>7.2f} "
                    f"{r['relative_to_float32']:>6.2f}x"
                )


def main(argv: list[str] | None = None) -> None:
    parser = new_parser(__doc__, DURATIONS)
    parser.add_argument("--quick", action="store_true", help="16 and 64 leaves, one attempt")
    parser.add_argument(
        "--leaves",
        type=positive_integer,
        nargs="+",
        default=list(LEAF_COUNTS),
        help="leaf counts to compile",
    )
    args = parse_args(parser, argv)
    announce("compile_time", args.quick, DURATIONS)
    leaf_counts, attempts = (QUICK_LEAF_COUNTS, 1) if args.quick else (tuple(args.leaves), ATTEMPTS)
    rows = measure(leaf_counts, attempts)
    print_table(rows)
    record = {
        "machine": describe_machine(),
        "settings": {
            "leaf_shape": list(LEAF_SHAPE),
            "attempts": attempts,
            "variants": VARIANTS,
        },
        "leaves": rows,
    }
    write_results("compile_time", jax.default_backend(), args, record)


if __name__ == "__main__":
    main()
