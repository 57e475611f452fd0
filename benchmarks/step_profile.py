"""Where the update step's time goes, per storage format: kernel time by what each kernel writes.

The jitted, buffer-donated "update + apply" step of `memory.py` (its 16.8M-parameter
transformer-shaped tree; plain, and centered with momentum 0.9) runs under `jax.profiler`, in
rounds that take the formats in a new order each time, and the time of each of XLA's kernels,
read from the traces, is charged to what the kernel writes, found in the compiled program: the
parameters, the second moment (ν, in whatever form the format stores it), the first moment
(`mu`, centered), the momentum buffer, or nothing the step returns (*intermediates*: block
maxima and scales, row and column sums). XLA:CPU runs independent
kernels at the same time (the leaves' updates are independent), so the kernel time of a step
exceeds the step's time; *at once* is their ratio while any kernel runs. The step's time
relative to float32's comes from interleaved rounds without the profiler, as in `memory.py`;
the profiler slows every kernel somewhat, so kernel times compare the formats within one run.

    python benchmarks/step_profile.py            # about 1 minute on 2 CPU cores
    python benchmarks/step_profile.py --quick    # fewer rounds and steps: under a minute

Writes a new outputs/benchmarks/step_profile_<platform>_<time>.json; `--update-results`
replaces benchmarks/results/step_profile_<platform>.json instead.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
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
    VARIANTS,
    compiled_update_step,
    interleaved_times,
    step_timing,
    the_tree,
)

import rmsprop_jax as rj

ROLES = ("parameters", "second moment", "first moment", "momentum", "other state", "intermediates")
# The table's columns: every role but the step count's (a scalar kernel, or none).
_COLUMNS = tuple(role for role in ROLES if role != "other state")
DURATIONS = Durations("about 1 minute on 2 CPU cores", "under a minute")
# Instructions that produce no kernel of their own: the value is another instruction's.
_PASS_THROUGH = ("get-tuple-element", "bitcast", "tuple")
# Instructions that run computations of their own, whose kernels the trace reports one by one.
_NESTING = ("while", "conditional", "call")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*.*?\s([\w\-]+)\((.*)$")


def output_role(path: str, is_parameter: bool) -> str:
    """What a leaf of the step's output `(params, state)` is, from its key path."""
    if is_parameter:
        return "parameters"
    if ".nu" in path or ".variance" in path:
        return "second moment"
    if ".mu" in path:
        return "first moment"
    if ".trace" in path:
        return "momentum"
    return "other state"


def output_roles(params: Any, state: Any) -> list[str]:
    """The role of each leaf of a step's output `(params, state)`, in the program's order."""
    paths = jax.tree_util.tree_leaves_with_path((params, state))
    return [output_role(jax.tree_util.keystr(path), path[0].idx == 0) for path, _ in paths]


def _operands(rest: str) -> list[str]:
    """The `%names` inside the operand list that opens `rest` (up to its closing parenthesis)."""
    depth = 1
    for end, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return re.findall(r"%([\w.\-]+)", rest[:end])
    raise ValueError(f"unbalanced operand list: {rest[:80]!r}")


def kernel_roles(hlo_text: str, roles: list[str]) -> tuple[str, dict[str, str], set[str]]:
    """The module name of a compiled program (`compiled.as_text()`); for each instruction of
    its entry computation that writes one of its outputs, the role of that output (`roles[i]`
    for output `i`; roles joined with " + " where one kernel writes several; instructions not
    listed write only intermediates); and the entry's loops and conditionals, whose trace
    events span the kernels they run (each traced as well)."""
    module = re.search(r"^HloModule\s+([\w.\-]+)", hlo_text, re.MULTILINE)
    if module is None:
        raise ValueError("not an HLO module: no HloModule line")
    lines = hlo_text[hlo_text.index("\nENTRY ") :].splitlines()[1:]
    instructions: dict[str, tuple[str, list[str]]] = {}
    root = None
    for line in lines:
        if line.startswith("}"):
            break
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        name, op, rest = match.groups()
        instructions[name] = (op, _operands(rest))
        if line.lstrip().startswith("ROOT"):
            root = name
    if root is None or instructions[root][0] != "tuple":
        raise ValueError("the entry computation does not return a tuple")
    outputs = instructions[root][1]
    if len(outputs) != len(roles):
        raise ValueError(f"{len(outputs)} outputs in the program, {len(roles)} roles given")

    def producer(name: str) -> str:
        op, operands = instructions[name]
        while op in _PASS_THROUGH and len(operands) == 1:
            name = operands[0]
            op, operands = instructions[name]
        return name

    nested = {name for name, (op, _) in instructions.items() if op in _NESTING}
    written: dict[str, set[str]] = defaultdict(set)
    for name, role in zip(outputs, roles, strict=True):
        kernel = producer(name)
        if instructions[kernel][0] not in ("parameter", "constant", "tuple", *_NESTING):
            written[kernel].add(role)
    return module.group(1), {k: " + ".join(sorted(r)) for k, r in written.items()}, nested


def _busy(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of `intervals`: how long any of them ran."""
    busy, end = 0.0, float("-inf")
    for begin, finish in sorted(intervals):
        busy += max(0.0, finish - max(begin, end))  # the part past what is counted already
        end = max(end, finish)
    return busy


def kernel_times(
    traces: list[list[dict[str, Any]]],
    module: str,
    steps: int,
    role_of: dict[str, str],
    nested: set[str] | frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """From the events of perfetto traces of `steps` steps each: the kernels of `module` per
    step, their milliseconds per step, how many ran at once while any ran, and for each role
    (`role_of` a kernel's name, "intermediates" for the others) their milliseconds per step
    and how many of them ran at once. The events of `nested` instructions (loops,
    conditionals) are left out: they span kernels of their own."""
    kernel: dict[str, float] = defaultdict(float)  # summed durations, microseconds
    busy: dict[str, float] = defaultdict(float)  # durations of their unions
    count = 0
    for trace in traces:
        intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for event in trace:
            args = event.get("args", {})
            name = event.get("name")
            if (
                event.get("ph") == "X"
                and args.get("hlo_module") == module
                and name == args.get("hlo_op")
                and name not in nested
            ):
                role = role_of.get(name, "intermediates")
                intervals[role].append((event["ts"], event["ts"] + event["dur"]))
        if not intervals:
            raise RuntimeError(
                f"the profiler trace has no kernel events of {module}: this JAX's CPU runtime "
                "does not report its kernels"
            )
        every = [span for spans in intervals.values() for span in spans]
        count += len(every)
        for role, spans in (*intervals.items(), ("all", every)):
            kernel[role] += sum(finish - begin for begin, finish in spans)
            busy[role] += _busy(spans)
    total_steps = steps * len(traces)
    return {
        "kernels_per_step": count / total_steps,
        "milliseconds_per_step": kernel["all"] / 1e3 / total_steps,
        "at_once": kernel["all"] / busy["all"],
        "roles": {
            role: {
                "milliseconds_per_step": kernel[role] / 1e3 / total_steps,
                "at_once": kernel[role] / busy[role],
            }
            for role in kernel
            if role != "all"
        },
    }


def traced_steps(
    compiled: Any, carry: tuple[Any, Any], grads: Any, steps: int
) -> tuple[tuple[Any, Any], list[dict[str, Any]]]:
    """Runs `steps` steps under the profiler: the new carry, and the trace's events."""
    params, state = carry
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(steps):
                params, state = compiled(params, state, grads)
            jax.block_until_ready((params, state))
        (trace_file,) = Path(directory).glob("**/perfetto_trace.json.gz")
        with gzip.open(trace_file) as stream:
            trace = json.load(stream)
    return (params, state), trace["traceEvents"] if isinstance(trace, dict) else trace


def measure(repeats: int, steps: int, profiled_rounds: int, profiled_steps: int) -> dict[str, Any]:
    key, grads, parameters = the_tree()
    rng = random.Random(0)
    rows: dict[str, Any] = {"parameters": parameters}
    for variant, options in VARIANTS.items():
        steppers, carries, kernels = {}, {}, {}
        for name in FORMATS:
            tx = rj.rmsprop(1e-3, moment_storage=name, **options)
            compiled, start = compiled_update_step(tx, key, grads)
            kernels[name] = kernel_roles(compiled.as_text(), output_roles(*start))
            steppers[name] = compiled
            carries[name] = compiled(*start, grads)  # warm up
        times = interleaved_times(steppers, carries, grads, repeats, steps)
        # Profiled in rounds too, the formats in a new order each round, so that a change of
        # the machine's state falls on all of them.
        traces: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in FORMATS}
        for _ in range(profiled_rounds):
            order = list(FORMATS)
            rng.shuffle(order)
            for name in order:
                carries[name], events = traced_steps(
                    steppers[name], carries[name], grads, profiled_steps
                )
                traces[name].append(events)
        row = {}
        for name in FORMATS:
            module, written, nested = kernels[name]
            measured = kernel_times(traces[name], module, profiled_steps, written, nested)
            row[name] = step_timing(times[name], times["float32"]) | {
                "kernel_milliseconds_per_step": measured["milliseconds_per_step"],
                "kernels_per_step": measured["kernels_per_step"],
                "kernels_at_once": measured["at_once"],
                "roles": measured["roles"],
            }
        reference = row["float32"]["kernel_milliseconds_per_step"]
        for step in row.values():
            step["kernel_time_relative_to_float32"] = (
                step["kernel_milliseconds_per_step"] / reference
            )
        rows[variant] = row
        del steppers, carries
        print(f"  {variant} done", flush=True)
    return rows


def markdown_rows(rows: dict[str, Any]) -> list[str]:
    """The rows of benchmarks/README.md's table of a run's `update_step` record."""
    lines = []
    for variant, row in rows.items():
        if variant == "parameters":
            continue
        for name, step in row.items():
            roles = step["roles"]
            cells = [
                f"{roles[role]['milliseconds_per_step']:.2f}" if role in roles else ""
                for role in _COLUMNS
            ]
            lines.append(
                f"| {variant} | {name} | {step['relative_to_float32']:.2f}x | "
                f"{step['kernel_milliseconds_per_step']:.2f} | {' | '.join(cells)} | "
                f"{step['kernels_at_once']:.2f} |"
            )
    return lines


def print_table(rows: dict[str, Any]) -> None:
    print(
        f"\nUpdate step of {rows['parameters']:,} parameters: time vs float32 (unprofiled), "
        "kernel ms per step by what the kernel writes (profiled)\n"
    )
    print("| variant | step | time | kernel ms | " + " | ".join(_COLUMNS) + " | at once |")
    print("|---|---|---:|---:|" + "---:|" * (len(_COLUMNS) + 1))
    print("\n".join(markdown_rows(rows)))


def main(argv: list[str] | None = None) -> None:
    parser = new_parser(__doc__, DURATIONS)
    parser.add_argument(
        "--quick", action="store_true", help="3 timing rounds, 2 profiled rounds of 2 steps"
    )
    parser.add_argument("--repeats", type=positive_integer, default=15, help="timing rounds")
    parser.add_argument("--steps", type=positive_integer, default=5, help="steps per round")
    parser.add_argument(
        "--profiled-rounds", type=positive_integer, default=5, help="rounds run under the profiler"
    )
    parser.add_argument(
        "--profiled-steps", type=positive_integer, default=2, help="steps per profiled round"
    )
    args = parse_args(parser, argv)
    announce("step_profile", args.quick, DURATIONS)
    repeats, profiled_rounds, profiled_steps = (
        (3, 2, 2) if args.quick else (args.repeats, args.profiled_rounds, args.profiled_steps)
    )
    rows = measure(repeats, args.steps, profiled_rounds, profiled_steps)
    print_table(rows)
    timing = {
        "repeats": repeats,
        "steps_per_repeat": args.steps,
        "profiled_rounds": profiled_rounds,
        "profiled_steps_per_round": profiled_steps,
        "variants": VARIANTS,
    }
    record = {"machine": describe_machine(), "timing": timing, "update_step": rows}
    write_results("step_profile", jax.default_backend(), args, record)


if __name__ == "__main__":
    main()
