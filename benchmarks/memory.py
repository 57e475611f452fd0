"""Memory, speed and quality of each `moment_storage` format against float32, measured in one run.

1. State memory: bytes of RMSprop state per parameter on a transformer-sized tree (token
   embedding 8192 x 512 and 4 blocks of d_model=512: attention q, k, v, o; MLP 512 -> 2048 ->
   512; layer norms and biases; 16.8M parameters), counted with `rj.state_bytes` on
   `jax.eval_shape`.
2. Update step: one jitted, buffer-donated "update + apply" step on that tree, per format and
   variant (plain; centered with momentum 0.9), beside optax.adam and optax.adafactor: the
   compiled program's arguments, temporaries and peak (`compiled.memory_analysis()`), and its
   time, contenders interleaved and repeated; the median over rounds of each round's ratio
   to the float32 step of the same variant, and the middle half of those ratios.
3. Training step: the compiled peak of a whole jitted training step (forward, backward,
   update; batch 2 x 64 tokens, so the optimizer dominates) of that transformer, per format
   against float32 and optax.adam.
4. Quality (benchmarks/_storage_quality.py): final training loss and test accuracy of an MLP on
   scikit-learn's digits, and the loss of an ill-conditioned least-squares problem after a fixed
   budget, over 3 seeds, for three RMSprop configurations.

    python benchmarks/memory.py            # about 3 minutes on 2 CPU cores
    python benchmarks/memory.py --quick    # fewer repeats and one seed: about 2 minutes
    python benchmarks/memory.py --xla-option xla_cpu_prefer_vector_width=512

`--xla-option NAME=VALUE` (repeatable) compiles the update and training steps of every
contender with that XLA option (`jax.jit`'s `compiler_options`), float32 included, and records
it in the JSON; the committed record uses XLA's defaults.

Prints tables and writes a new outputs/benchmarks/memory_<platform>_<time>.json;
`--update-results` replaces benchmarks/results/memory_<platform>.json instead.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import _storage_quality as quality
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
from memory_table import EIGHT_BIT_MU, FORMATS

import rmsprop_jax as rj

TARGET_BYTES = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.05, "factored": 0.1}
TARGET_ACCURACY_POINTS, TARGET_RELATIVE_LOSS = 0.5, 0.05
# Update step: time relative to the float32 step of the same variant, and temporaries.
TARGET_STEP_TIME = {"bfloat16": 1.15, "int8": 1.5, "factored": 1.3}
TARGET_TEMPORARY_BYTES = 0.25
# Training step: bytes per parameter int8 saves at the compiled peak against float32.
TARGET_INT8_TRAINING_SAVING = 2.5
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "centered + momentum": {"centered": True, "momentum": 0.9},
}
REFERENCES = {
    "optax.adam": lambda: optax.adam(1e-3),
    "optax.adafactor": lambda: optax.adafactor(1e-3),
}
TRAINING_BATCH, TRAINING_LENGTH = 2, 64
# (learning rate, options): digits use coupled L2 1e-3 so the training loss keeps a floor.
CONFIGURATIONS: dict[str, tuple[float, dict[str, Any]]] = {
    "decay 0.9": (1e-3, {"decay": 0.9}),
    "decay 0.99": (1e-3, {"decay": 0.99}),
    "centered + momentum 0.9": (1e-4, {"decay": 0.9, "centered": True, "momentum": 0.9}),
}
DIGITS_STEPS, DIGITS_WEIGHT_DECAY = 600, 1e-3
LEAST_SQUARES_STEPS, LEAST_SQUARES_RATE_FACTOR = 500, 30.0


def transformer_init(
    key: jax.Array, layers: int = 4, d_model: int = 512, d_ff: int = 2048, vocab: int = 8192
) -> dict:
    def dense(key, fan_in, fan_out):
        weight = jax.random.normal(key, (fan_in, fan_out)) / jnp.sqrt(fan_in)
        return {"kernel": weight, "bias": jnp.zeros(fan_out)}

    def norm():
        return {"scale": jnp.ones(d_model), "bias": jnp.zeros(d_model)}

    keys = iter(jax.random.split(key, 1 + 6 * layers))
    params = {"embed": jax.random.normal(next(keys), (vocab, d_model)) * 0.02, "final_norm": norm()}
    for i in range(layers):
        block = {name: dense(next(keys), d_model, d_model) for name in ("q", "k", "v", "o")}
        block["mlp_in"] = dense(next(keys), d_model, d_ff)
        block["mlp_out"] = dense(next(keys), d_ff, d_model)
        block["norm_attention"], block["norm_mlp"] = norm(), norm()
        params[f"block{i}"] = block
    return params


def measure_memory() -> dict[str, Any]:
    abstract = jax.eval_shape(transformer_init, jax.random.key(0))
    parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    results: dict[str, Any] = {"parameters": parameters}
    layouts: dict[str, dict[str, Any]] = {"plain": {}, "centered": {"centered": True}}
    for moment_storage in FORMATS:
        row: dict[str, Any] = {}
        for name, options in layouts.items():
            tx = rj.rmsprop(1e-3, moment_storage=moment_storage, **options)
            memory = rj.state_bytes(jax.eval_shape(tx.init, abstract), abstract)
            row[name] = memory._asdict()
        row["target_bytes_per_parameter"] = TARGET_BYTES[moment_storage]
        # The step count (4 bytes for the whole tree) is not per parameter: compare to 3 places.
        per_parameter = round(row["plain"]["bytes_per_parameter"], 3)
        row["meets_target"] = per_parameter <= TARGET_BYTES[moment_storage]
        results[moment_storage] = row
    return results


def update_step(tx: optax.GradientTransformation) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """`tx`'s update applied to the parameters: (params, state, grads) -> (params, state)."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _contenders() -> dict[tuple[str, str], optax.GradientTransformation]:
    """(variant, name) -> transformation: every format in every variant, int8 with 8-bit `mu`
    (centered), and the references (in the plain variant)."""
    contenders = {}
    for variant, options in VARIANTS.items():
        for moment_storage in FORMATS:
            contenders[variant, moment_storage] = rj.rmsprop(
                1e-3, moment_storage=moment_storage, **options
            )
        if options.get("centered"):
            contenders[variant, EIGHT_BIT_MU] = rj.rmsprop(
                1e-3, moment_storage="int8", first_moment_storage="int8", **options
            )
    for name, build in REFERENCES.items():
        contenders["plain", name] = build()
    return contenders


def compiled_memory(compiled: jax.stages.Compiled, parameters: int) -> dict[str, float]:
    memory = compiled.memory_analysis()
    if memory is None:
        raise RuntimeError(
            f"XLA gives no memory analysis on this backend ({jax.default_backend()}): "
            "the compiled bytes per parameter cannot be measured"
        )
    unaliased = memory.output_size_in_bytes - memory.alias_size_in_bytes
    return {
        "arguments_bytes_per_parameter": memory.argument_size_in_bytes / parameters,
        "temporary_bytes_per_parameter": memory.temp_size_in_bytes / parameters,
        "unaliased_output_bytes_per_parameter": unaliased / parameters,
        "peak_bytes_per_parameter": (
            memory.argument_size_in_bytes + memory.temp_size_in_bytes + unaliased
        )
        / parameters,
    }


def parse_xla_option(text: str) -> tuple[str, bool | int | str]:
    """`NAME=VALUE` -> (NAME, VALUE as a bool, an int or a string)."""
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    try:
        return name, int(value)
    except ValueError:
        return name, value


def _quartiles(values: list[float]) -> list[float]:
    """The first and third quartiles of `values` (both the value itself for one value)."""
    if len(values) < 2:
        return [values[0], values[0]]
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return [first, third]


def interleaved_times(
    steppers: dict[Any, Any], carries: dict[Any, Any], grads: Any, repeats: int, steps: int
) -> dict[Any, list[float]]:
    """Seconds per step of each compiled `(params, state, grads) -> (params, state)` step, in
    `repeats` rounds of `steps` steps, the contenders in a new random order each round (so a
    change of the machine's state falls on all of them); `carries` (each contender's params and
    state, donated) is updated in place."""
    times: dict[Any, list[float]] = {contender: [] for contender in steppers}
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        order = list(steppers)
        rng.shuffle(order)
        for contender in order:
            params, state = carries[contender]
            started = time.perf_counter()
            for _ in range(steps):
                params, state = steppers[contender](params, state, grads)
            jax.block_until_ready((params, state))
            times[contender].append((time.perf_counter() - started) / steps)
            carries[contender] = (params, state)
    return times


def step_timing(times: list[float], reference: list[float]) -> dict[str, Any]:
    """A step's median seconds over rounds, the median over rounds of the ratio of `times` to
    `reference` (float32's) within a round (both measured back to back), and the middle half
    of the rounds' ratios: how far the ratio moves with the machine's state."""
    ratios = [a / b for a, b in zip(times, reference, strict=True)]
    return {
        "median_seconds": statistics.median(times),
        "relative_to_float32": statistics.median(ratios),
        "relative_to_float32_quartiles": _quartiles(ratios),
    }


def the_tree() -> tuple[jax.Array, Any, int]:
    """The key the parameters of the timed steps are drawn from, the gradients every step
    is given, and the number of parameters."""
    key = jax.random.key(0)
    grads = jax.jit(transformer_init)(jax.random.fold_in(key, 1))
    return key, grads, sum(x.size for x in jax.tree.leaves(grads))


def compiled_update_step(
    tx: optax.GradientTransformation,
    key: jax.Array,
    grads: Any,
    compiler_options: dict | None = None,
) -> tuple[Any, tuple[Any, Any]]:
    """`tx`'s jitted, buffer-donated update step compiled for the tree, and the parameters
    (drawn from `key`) and state it starts from."""
    params = jax.jit(transformer_init)(key)
    state = tx.init(params)
    compiled = (
        jax.jit(update_step(tx), donate_argnums=(0, 1), compiler_options=compiler_options)
        .lower(params, state, grads)
        .compile()
    )
    return compiled, (params, state)


def measure_update_step(
    repeats: int, steps: int, compiler_options: dict | None = None
) -> dict[str, Any]:
    """Compiled memory and interleaved step times of every contender; see the module doc."""
    key, grads, parameters = the_tree()
    steppers, carries, results = {}, {}, {}
    for contender, tx in _contenders().items():
        compiled, start = compiled_update_step(tx, key, grads, compiler_options)
        steppers[contender] = compiled
        results[contender] = compiled_memory(compiled, parameters)
        carries[contender] = compiled(*start, grads)  # warm up
    times = interleaved_times(steppers, carries, grads, repeats, steps)
    rows: dict[str, dict[str, Any]] = {variant: {} for variant in VARIANTS}
    for (variant, name), t in times.items():
        # float32's step is bound by memory bandwidth, the compressed ones largely by
        # arithmetic: the quartiles show how the ratio moves with the machine's state.
        row = (
            results[variant, name]
            | step_timing(t, times[variant, "float32"])
            | {"seconds_per_repeat": t}
        )
        if name in TARGET_STEP_TIME:
            row["target_relative_time"] = TARGET_STEP_TIME[name]
            row["meets_time_target"] = bool(row["relative_to_float32"] <= TARGET_STEP_TIME[name])
        if name in FORMATS:
            row["meets_temporary_target"] = bool(
                row["temporary_bytes_per_parameter"] <= TARGET_TEMPORARY_BYTES
            )
        rows[variant][name] = row
    return {"parameters": parameters, "variants": rows}


def _layer_norm(x: jax.Array, norm: dict) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + 1e-6) * norm["scale"] + norm["bias"]


def transformer_loss(params: dict, tokens: jax.Array) -> jax.Array:
    """Next-token cross-entropy of a single-head causal transformer (tied embedding)."""

    def dense(layer, x):
        return x @ layer["kernel"] + layer["bias"]

    x = params["embed"][tokens]
    length, width = tokens.shape[-1], x.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    for name in sorted(k for k in params if k.startswith("block")):
        block = params[name]
        h = _layer_norm(x, block["norm_attention"])
        q, k, v = (dense(block[n], h) for n in ("q", "k", "v"))
        scores = jnp.where(causal, q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(width), -1e9)
        x = x + dense(block["o"], jax.nn.softmax(scores) @ v)
        h = _layer_norm(x, block["norm_mlp"])
        x = x + dense(block["mlp_out"], jax.nn.gelu(dense(block["mlp_in"], h)))
    logits = _layer_norm(x, params["final_norm"]) @ params["embed"].T
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]))


def measure_training_step(compiler_options: dict | None = None) -> dict[str, Any]:
    """Compiled peak of a whole training step per format, against optax.adam (not run)."""
    abstract = jax.eval_shape(transformer_init, jax.random.key(0))
    parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    tokens = jax.ShapeDtypeStruct((TRAINING_BATCH, TRAINING_LENGTH), jnp.int32)
    contenders = {f: rj.rmsprop(1e-3, moment_storage=f) for f in FORMATS}
    contenders["optax.adam"] = optax.adam(1e-3)
    rows = {}
    for name, tx in contenders.items():

        def step(params, state, tokens, tx=tx):
            loss, grads = jax.value_and_grad(transformer_loss)(params, tokens)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        state = jax.eval_shape(tx.init, abstract)
        jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options)
        compiled = jitted.lower(abstract, state, tokens).compile()
        rows[name] = compiled_memory(compiled, parameters)
    reference = rows["float32"]["peak_bytes_per_parameter"]
    for row in rows.values():
        row["saved_against_float32"] = reference - row["peak_bytes_per_parameter"]
    rows["int8"]["meets_target"] = bool(
        rows["int8"]["saved_against_float32"] >= TARGET_INT8_TRAINING_SAVING
    )
    return {
        "parameters": parameters,
        "batch": [TRAINING_BATCH, TRAINING_LENGTH],
        "target_int8_saving": TARGET_INT8_TRAINING_SAVING,
        "formats": rows,
    }


def _optimizer(
    moment_storage: str, rate: float, options: dict, weight_decay: float
) -> Callable[[optax.Schedule], optax.GradientTransformation]:
    def build(schedule: optax.Schedule) -> optax.GradientTransformation:
        return rj.rmsprop(
            lambda count: rate * schedule(count),
            moment_storage=moment_storage,
            weight_decay=weight_decay,
            **options,
        )

    return build


def _summary(values: list[float]) -> dict[str, Any]:
    return {"per_seed": values, "mean": float(np.mean(values)), "std": float(np.std(values))}


def measure_quality(seeds: list[int]) -> dict[str, Any]:
    least_squares = [quality.least_squares_data(seed) for seed in seeds]
    optimum = [
        float(0.5 * np.mean(np.sum((x @ np.linalg.lstsq(x, y)[0] - y) ** 2, axis=-1)))
        for x, y in least_squares
    ]
    results = {"least_squares_optimum": _summary(optimum)}
    for name, (rate, options) in CONFIGURATIONS.items():
        rows: dict[str, dict[str, Any]] = {}
        for moment_storage in FORMATS:
            digits = quality.make_digits_run(
                _optimizer(moment_storage, rate, options, DIGITS_WEIGHT_DECAY), DIGITS_STEPS
            )
            outcomes = [jax.device_get(digits(seed)) for seed in seeds]
            regression = quality.make_least_squares_run(
                _optimizer(moment_storage, rate * LEAST_SQUARES_RATE_FACTOR, options, 0.0),
                LEAST_SQUARES_STEPS,
            )
            rows[moment_storage] = {
                "digits_train_loss": _summary([float(o["train_loss"]) for o in outcomes]),
                "digits_test_accuracy": _summary(
                    [100 * float(o["test_accuracy"]) for o in outcomes]
                ),
                "least_squares_loss": _summary(
                    [float(regression(x, y)["train_loss"]) for x, y in least_squares]
                ),
            }
        reference = rows["float32"]
        for row in rows.values():
            row["accuracy_difference_points"] = (
                row["digits_test_accuracy"]["mean"] - reference["digits_test_accuracy"]["mean"]
            )
            for task in ("digits_train_loss", "least_squares_loss"):
                row[f"{task}_relative_difference"] = row[task]["mean"] / reference[task]["mean"] - 1
            row["meets_digits_targets"] = bool(
                abs(row["accuracy_difference_points"]) <= TARGET_ACCURACY_POINTS
                and abs(row["digits_train_loss_relative_difference"]) <= TARGET_RELATIVE_LOSS
            )
            # Least squares: no worse than float32 by more than the loss tolerance.
            row["meets_least_squares_target"] = bool(
                row["least_squares_loss_relative_difference"] <= TARGET_RELATIVE_LOSS
            )
        results[name] = rows
        print(f"  quality: {name} done", flush=True)
    return results


def print_tables(memory: dict, update: dict, training: dict, quality_results: dict) -> None:
    print(f"\nState memory, {memory['parameters'] / 1e6:.1f}M-parameter transformer tree")
    print(f"{'format':<10} {'B/param':>8} {'centered':>9} {'target':>7}")
    for f in FORMATS:
        m = memory[f]
        print(
            f"{f:<10} {m['plain']['bytes_per_parameter']:>8.4f} "
            f"{m['centered']['bytes_per_parameter']:>9.4f} {m['target_bytes_per_parameter']:>7.2f}"
        )
    print("\nUpdate step (donated), bytes per parameter; time relative to float32, same variant")
    print(
        f"{'variant':<20} {'step':<16} {'args':>6} {'temps':>6} {'peak':>6} {'ms':>7} {'vs f32':>7}"
        f" {'middle half':>12}"
    )
    for variant, rows in update["variants"].items():
        for name, r in rows.items():
            first, third = r["relative_to_float32_quartiles"]
            print(
                f"{variant:<20} {name:<16} {r['arguments_bytes_per_parameter']:>6.2f} "
                f"{r['temporary_bytes_per_parameter']:>6.2f} {r['peak_bytes_per_parameter']:>6.2f} "
                f"{1e3 * r['median_seconds']:>7.1f} {r['relative_to_float32']:>6.2f}x"
                f" {first:>5.2f}-{third:.2f}x"
            )
    print(
        f"\nTraining step, {training['parameters'] / 1e6:.1f}M parameters, batch "
        f"{training['batch'][0]} x {training['batch'][1]}: compiled bytes per parameter"
    )
    print(f"{'step':<12} {'args':>6} {'temps':>6} {'peak':>6} {'saved':>6}")
    for name, r in training["formats"].items():
        print(
            f"{name:<12} {r['arguments_bytes_per_parameter']:>6.2f} "
            f"{r['temporary_bytes_per_parameter']:>6.2f} {r['peak_bytes_per_parameter']:>6.2f} "
            f"{r['saved_against_float32']:>+6.2f}"
        )
    for name in CONFIGURATIONS:
        print(f"\nQuality, RMSprop {name} (mean over seeds; differences against float32)")
        print(
            f"{'format':<10} {'digits loss':>12} {'rel.':>7} {'test acc %':>11} {'pts':>6} "
            f"{'lsq loss':>10} {'rel.':>7}"
        )
        for f in FORMATS:
            r = quality_results[name][f]
            print(
                f"{f:<10} {r['digits_train_loss']['mean']:>12.5f} "
                f"{100 * r['digits_train_loss_relative_difference']:>6.2f}% "
                f"{r['digits_test_accuracy']['mean']:>11.2f} "
                f"{r['accuracy_difference_points']:>+6.2f} "
                f"{r['least_squares_loss']['mean']:>10.5f} "
                f"{100 * r['least_squares_loss_relative_difference']:>6.2f}%"
            )
    print(f"(least-squares optimum: {quality_results['least_squares_optimum']['mean']:.5f})")


DURATIONS = Durations("about 3 minutes on 2 CPU cores", "about 2 minutes")


def main(argv: list[str] | None = None) -> None:
    parser = new_parser(__doc__, DURATIONS)
    parser.add_argument("--quick", action="store_true", help="2 repeats, 1 seed")
    parser.add_argument(
        "--repeats", type=positive_integer, default=15, help="interleaved rounds of timing"
    )
    parser.add_argument("--steps", type=positive_integer, default=5, help="timed steps per repeat")
    parser.add_argument(
        "--xla-option",
        type=parse_xla_option,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="compile the update and training steps with this XLA option (repeatable)",
    )
    args = parse_args(parser, argv)
    if args.xla_option and args.update_results:
        parser.error("--update-results records XLA's default compilation: run without --xla-option")
    compiler_options = dict(args.xla_option) or None
    if compiler_options:
        print(f"XLA options of the update and training steps: {compiler_options}", flush=True)
    announce("memory", args.quick, DURATIONS)
    repeats, seeds = (2, [0]) if args.quick else (args.repeats, [0, 1, 2])
    memory = measure_memory()
    update = measure_update_step(repeats, args.steps, compiler_options)
    print("  update step done", flush=True)
    training = measure_training_step(compiler_options)
    print("  training step done", flush=True)
    quality_results = measure_quality(seeds)
    print_tables(memory, update, training, quality_results)
    machine = describe_machine()
    settings = {
        "repeats": repeats,
        "steps_per_repeat": args.steps,
        "xla_options": compiler_options or {},
        "variants": VARIANTS,
        "targets": {
            "step_time_relative_to_float32": TARGET_STEP_TIME,
            "temporary_bytes_per_parameter": TARGET_TEMPORARY_BYTES,
            "int8_training_step_saving_bytes_per_parameter": TARGET_INT8_TRAINING_SAVING,
        },
        "seeds": seeds,
        "configurations": {k: {"learning_rate": r, **o} for k, (r, o) in CONFIGURATIONS.items()},
        "digits": {"steps": DIGITS_STEPS, "l2_weight_decay": DIGITS_WEIGHT_DECAY},
        "least_squares": {"steps": LEAST_SQUARES_STEPS, "rate_factor": LEAST_SQUARES_RATE_FACTOR},
    }
    record = {
        "machine": machine,
        "settings": settings,
        "memory": memory,
        "update_step": update,
        "training_step": training,
    }
    record["quality"] = quality_results
    write_results("memory", jax.default_backend(), args, record)


if __name__ == "__main__":
    main()
