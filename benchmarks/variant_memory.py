"""Update-step memory and time of every RMSprop variant, per storage format, against optax.

`memory.py` measures the plain and centered + momentum steps in depth; this script compiles
the jitted, buffer-donated "update + apply" step of every other variant on the same
16.8M-parameter transformer-shaped tree, for every `moment_storage`, reads the bytes per
parameter from `compiled.memory_analysis()` (arguments, temporaries and the peak: arguments +
temporaries + outputs not written in place), and times the steps of each variant against each
other: rounds in a new random order each time, the median over rounds of each round's ratio to
the float32 step of the same variant. Optax's step of the same variant, where optax has it, is
beside them.

    python benchmarks/variant_memory.py            # every variant: about 2 minutes
    python benchmarks/variant_memory.py --quick    # four of the variants: about 1 minute

Writes a new outputs/benchmarks/variant_memory_<platform>_<time>.json; `--update-results`
replaces benchmarks/results/variant_memory_<platform>.json instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
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
from memory import (
    FORMATS,
    TARGET_TEMPORARY_BYTES,
    compiled_memory,
    compiled_update_step,
    interleaved_times,
    step_timing,
    the_tree,
)

import rmsprop_jax as rj


def _matrices(params: Any) -> Any:
    """The weight-decay mask that decays the matrices, not the vectors (biases, norms)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


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
    "L2 weight decay, centered": (
        {"weight_decay": 0.01, "centered": True},
        lambda: optax.chain(optax.add_decayed_weights(0.01), optax.rmsprop(1e-3, centered=True)),
    ),
    "L2 weight decay, masked": (
        {"weight_decay": 0.01, "weight_decay_mask": _matrices},
        lambda: optax.chain(
            optax.masked(optax.add_decayed_weights(0.01), _matrices), optax.rmsprop(1e-3)
        ),
    ),
    "decoupled weight decay": ({"weight_decay": 0.01, "decoupled_weight_decay": True}, None),
    "maximize": ({"maximize": True}, None),
    "maximize, centered": ({"maximize": True, "centered": True}, None),
}
QUICK_VARIANTS = (
    "nesterov",
    "L2 weight decay",
    "L2 weight decay, centered",
    "L2 weight decay, masked",
    "maximize, centered",
)
DURATIONS = Durations("about 2 minutes on 2 CPU cores", "about 1 minute")


def measure(variants: tuple[str, ...], repeats: int, steps: int) -> dict[str, Any]:
    key, grads, parameters = the_tree()
    rows: dict[str, Any] = {"parameters": parameters}
    for variant in variants:
        options, optax_step = VARIANTS[variant]
        contenders = {m: rj.rmsprop(1e-3, moment_storage=m, **options) for m in FORMATS}
        if optax_step is not None:
            contenders["optax"] = optax_step()
        row, steppers, carries = {}, {}, {}
        for name, tx in contenders.items():
            compiled, start = compiled_update_step(tx, key, grads)
            row[name] = compiled_memory(compiled, parameters)
            steppers[name] = compiled
            carries[name] = compiled(*start, grads)  # warm up
        times = interleaved_times(steppers, carries, grads, repeats, steps)
        del steppers, carries
        reference = row["float32"]
        for name, step in row.items():
            step.update(step_timing(times[name], times["float32"]))
            if name in FORMATS[1:]:
                step["temporaries_added_to_float32"] = (
                    step["temporary_bytes_per_parameter"]
                    - reference["temporary_bytes_per_parameter"]
                )
                step["peak_below_float32"] = (
                    step["peak_bytes_per_parameter"] < reference["peak_bytes_per_parameter"]
                )
        # A mask function is recorded by its name.
        recorded = {k: getattr(v, "__name__", v) for k, v in options.items()}
        rows[variant] = {"options": recorded, "steps": row}
        print(f"  {variant} done", flush=True)
    return rows


def print_table(rows: dict[str, Any]) -> None:
    print(
        f"\nUpdate step (donated), bytes per parameter of {rows['parameters']:,} parameters; "
        f"temporaries target <= {TARGET_TEMPORARY_BYTES}"
    )
    print(f"{'variant':<26} {'step':<10} {'args':>6} {'temps':>6} {'peak':>6} {'time':>6}")
    for variant, row in rows.items():
        if variant == "parameters":
            continue
        for name, step in row["steps"].items():
            print(
                f"{variant:<26} {name:<10} {step['arguments_bytes_per_parameter']:>6.2f} "
                f"{step['temporary_bytes_per_parameter']:>6.2f} "
                f"{step['peak_bytes_per_parameter']:>6.2f} {step['relative_to_float32']:>6.2f}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = new_parser(__doc__, DURATIONS)
    parser.add_argument(
        "--quick", action="store_true", help=f"only the variants {', '.join(QUICK_VARIANTS)}"
    )
    parser.add_argument("--repeats", type=positive_integer, default=7, help="timing rounds")
    parser.add_argument("--steps", type=positive_integer, default=5, help="steps per round")
    args = parse_args(parser, argv)
    announce("variant_memory", args.quick, DURATIONS)
    rows = measure(QUICK_VARIANTS if args.quick else tuple(VARIANTS), args.repeats, args.steps)
    print_table(rows)
    timing = {"repeats": args.repeats, "steps_per_repeat": args.steps}
    record = {"machine": describe_machine(), "timing": timing, "memory": rows}
    write_results("variant_memory", jax.default_backend(), args, record)


if __name__ == "__main__":
    main()
