"""Update-step memory of every RMSprop variant, per storage format, against float32 and optax.

`memory.py` measures and times the plain and centered + momentum steps; this script compiles
(without running) the jitted, buffer-donated "update + apply" step of every other variant on
the same 16.8M-parameter transformer-shaped tree, for every `moment_storage`, and reads the
bytes per parameter from `compiled.memory_analysis()`: arguments, temporaries and the peak
(arguments + temporaries + outputs not written in place). Each variant's float32 step is the
reference, and optax's step of the same variant, where optax has it, is beside it.

    python benchmarks/variant_memory.py            # every variant: about 1 minute
    python benchmarks/variant_memory.py --quick    # four of the variants: under a minute

Writes a new outputs/benchmarks/variant_memory_<platform>_<time>.json; `--update-results`
replaces benchmarks/results/variant_memory_<platform>.json instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from _machine import describe_machine
from _results import add_output_flags, announce, check_output_flags, new_parser, output_path
from memory import FORMATS, TARGET_TEMPORARY_BYTES, compiled_memory, transformer_init, update_step

import rmsprop_jax as rj

# name -> (rmsprop options, optax's step of the same variant or None where optax has none).
VARIANTS: dict[str, tuple[dict[str, Any], Callable[[], optax.GradientTransformation] | None]] = {
    "plain": ({}, lambda: optax.rmsprop(1e-3)),
    "centered": ({"centered": True}, lambda: optax.rmsprop(1e-3, centered=True)),
    "momentum": ({"momentum": 0.9}, lambda: optax.rmsprop(1e-3, momentum=0.9)),
    "nesterov": (
        {"momentum": 0.9, "nesterov": True},
        lambda: optax.rmsprop(1e-3, momentum=0.9, nesterov=True),
    ),
    "centered + momentum": (
        {"centered": True, "momentum": 0.9},
        lambda: optax.rmsprop(1e-3, centered=True, momentum=0.9),
    ),
    "bias correction": ({"bias_correction": True}, None),
    "eps in the root": ({"eps_in_sqrt": True}, lambda: optax.rmsprop(1e-3, eps_in_sqrt=True)),
    "L2 weight decay": (
        {"weight_decay": 0.01},
        lambda: optax.chain(optax.add_decayed_weights(0.01), optax.rmsprop(1e-3)),
    ),
    "decoupled weight decay": ({"weight_decay": 0.01, "decoupled_weight_decay": True}, None),
    "maximize": ({"maximize": True}, None),
    "maximize, centered": ({"maximize": True, "centered": True}, None),
}
QUICK_VARIANTS = ("nesterov", "L2 weight decay", "maximize", "maximize, centered")
FULL_DURATION = "about 1 minute on 2 CPU cores"
QUICK_DURATION = "under a minute"


def measure(variants: tuple[str, ...]) -> dict[str, Any]:
    params = jax.eval_shape(transformer_init, jax.random.key(0))
    parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    def compiled(tx: optax.GradientTransformation) -> dict[str, float]:
        state = jax.eval_shape(tx.init, params)
        step = jax.jit(update_step(tx), donate_argnums=(0, 1))
        return compiled_memory(step.lower(params, state, params).compile(), parameters)

    rows: dict[str, Any] = {"parameters": parameters}
    for variant in variants:
        options, optax_step = VARIANTS[variant]
        row = {m: compiled(rj.rmsprop(1e-3, moment_storage=m, **options)) for m in FORMATS}
        if optax_step is not None:
            row["optax"] = compiled(optax_step())
        reference = row["float32"]
        for name in FORMATS[1:]:
            added = (
                row[name]["temporary_bytes_per_parameter"]
                - reference["temporary_bytes_per_parameter"]
            )
            row[name]["temporaries_added_to_float32"] = added
            row[name]["peak_below_float32"] = (
                row[name]["peak_bytes_per_parameter"] < reference["peak_bytes_per_parameter"]
            )
        rows[variant] = {"options": options, "steps": row}
        print(f"  {variant} done", flush=True)
    return rows


def print_table(rows: dict[str, Any]) -> None:
    print(
        f"\nUpdate step (donated), bytes per parameter of {rows['parameters']:,} parameters; "
        f"temporaries target <= {TARGET_TEMPORARY_BYTES}"
    )
    print(f"{'variant':<24} {'step':<10} {'args':>6} {'temps':>6} {'peak':>6}")
    for variant, row in rows.items():
        if variant == "parameters":
            continue
        for name, step in row["steps"].items():
            print(
                f"{variant:<24} {name:<10} {step['arguments_bytes_per_parameter']:>6.2f} "
                f"{step['temporary_bytes_per_parameter']:>6.2f} "
                f"{step['peak_bytes_per_parameter']:>6.2f}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = new_parser(__doc__, FULL_DURATION, QUICK_DURATION)
    parser.add_argument(
        "--quick", action="store_true", help=f"only the variants {', '.join(QUICK_VARIANTS)}"
    )
    add_output_flags(parser)
    args = parser.parse_args(argv)
    check_output_flags(parser, args)
    announce(
        f"variant_memory: {QUICK_DURATION} (--quick)."
        if args.quick
        else f"variant_memory: the full run takes {FULL_DURATION} (--quick: {QUICK_DURATION})."
    )
    rows = measure(QUICK_VARIANTS if args.quick else tuple(VARIANTS))
    print_table(rows)
    output = output_path("variant_memory", jax.default_backend(), args)
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": describe_machine(), "memory": rows}
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
