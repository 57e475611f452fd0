"""The low-memory table of README.md and docs/storage.md, rendered from a `memory.py` record.

    python benchmarks/memory_table.py                       # from results/memory_<platform>.json
    python benchmarks/memory_table.py outputs/benchmarks/memory_cpu_<time>.json

Prints, per storage format and reference optimizer, the figures the documents quote: state
bytes per parameter, the update step's compiled peak and temporaries (bytes per parameter),
and its time relative to the float32 step (plain / centered + momentum), followed by the
savings, the training-step peaks, the spread of the time ratios, their values in the rounds
with the fastest float32 step (the fastest third) and in the others, and how much faster each
step ran in those rounds than in the others, quoted below the table.
`tests/test_benchmarks_cli.py` checks that the documents quote the committed record.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ("float32", "bfloat16", "int8", "factored")
REFERENCES = ("optax.adam", "optax.adafactor")
# Centered, int8 with `mu` as 8-bit codes too (`first_moment_storage="int8"`).
EIGHT_BIT_MU = "int8, 8-bit mu"
# The rounds in which the float32 step ran fastest: the fastest third.
FAST_SHARE = 3
# A reference optimizer's arguments are parameters and gradients (4 + 4 bytes) and its state.
PARAMETER_AND_GRADIENT_BYTES = 8.0


def table_cells(record: dict[str, Any]) -> dict[str, list[str]]:
    """Row name -> the numeric cells of its row, formatted as the documents quote them."""
    variants = record["update_step"]["variants"]
    plain, centered = variants["plain"], variants["centered + momentum"]
    cells = {}
    for name in FORMATS:
        step = plain[name]
        cells[name] = [
            f"{record['memory'][name]['plain']['bytes_per_parameter']:.2f}",
            f"{step['peak_bytes_per_parameter']:.2f}",
            f"{step['temporary_bytes_per_parameter']:.2f}",
            f"{step['relative_to_float32']:.2f}x / {centered[name]['relative_to_float32']:.2f}x",
        ]
    for name in REFERENCES:
        step = plain[name]
        state = step["arguments_bytes_per_parameter"] - PARAMETER_AND_GRADIENT_BYTES
        cells[name] = [
            f"{state:.2f}",
            f"{step['peak_bytes_per_parameter']:.2f}",
            f"{step['temporary_bytes_per_parameter']:.2f}",
            f"{step['relative_to_float32']:.2f}x",
        ]
    return cells


def peak_savings(record: dict[str, Any]) -> dict[str, str]:
    """Bytes per parameter each format saves at the update step's peak against float32."""
    savings = {}
    for variant, rows in record["update_step"]["variants"].items():
        reference = rows["float32"]["peak_bytes_per_parameter"]
        for name in FORMATS[1:]:
            saved = reference - rows[name]["peak_bytes_per_parameter"]
            savings[f"{name}, {variant}"] = f"{saved:.2f}"
    return savings


def training_peaks(record: dict[str, Any]) -> dict[str, str]:
    """The whole training step's compiled peak per optimizer, bytes per parameter."""
    return {
        name: f"{row['peak_bytes_per_parameter']:.2f}"
        for name, row in record["training_step"]["formats"].items()
    }


def training_sentence(record: dict[str, Any]) -> str:
    """The sentence below the table that quotes the training-step peaks."""
    peaks = training_peaks(record)
    return (
        f"peaks at {peaks['float32']} bytes per parameter with float32, {peaks['bfloat16']} with "
        f"bfloat16, {peaks['int8']} with int8, {peaks['factored']} with factored and "
        f"{peaks['optax.adam']} with `optax.adam`."
    )


def spread_sentence(record: dict[str, Any]) -> str | None:
    """The sentence that quotes the middle half of the rounds' time ratios (plain / centered +
    momentum) per compressed format, or None for a record from before they were kept."""
    variants = record["update_step"]["variants"]
    spans = {}
    for name in FORMATS[1:]:
        quartiles = [variants[v][name].get("relative_to_float32_quartiles") for v in variants]
        if None in quartiles:
            return None
        spans[name] = " / ".join(f"{first:.2f}x-{third:.2f}x" for first, third in quartiles)
    return (
        f"the middle half of its rounds measured bfloat16 at {spans['bfloat16']}, int8 at "
        f"{spans['int8']} and factored at {spans['factored']}."
    )


def has_round_times(record: dict[str, Any]) -> bool:
    """Whether every step of the record has its per-round times (`seconds_per_repeat`)."""
    variants = record["update_step"]["variants"]
    return all("seconds_per_repeat" in row for rows in variants.values() for row in rows.values())


def split_by_float32_speed(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per variant, the rounds split into the third in which the float32 step ran fastest and
    the others: float32's seconds in each group, and each contender's median seconds and
    median ratio to float32 (of the rounds' own ratios, from the record's
    `seconds_per_repeat`) in each group."""
    split = {}
    for variant, rows in record["update_step"]["variants"].items():
        reference = rows["float32"]["seconds_per_repeat"]
        order = sorted(range(len(reference)), key=reference.__getitem__)
        fast = order[: len(reference) // FAST_SHARE]
        groups = {"fast": fast, "other": order[len(fast) :]}
        split[variant] = {
            "float32_seconds": {
                group: [reference[i] for i in rounds] for group, rounds in groups.items()
            },
            "median_seconds": {
                name: {
                    group: statistics.median(row["seconds_per_repeat"][i] for i in rounds)
                    for group, rounds in groups.items()
                }
                for name, row in rows.items()
            },
            "ratios": {
                name: {
                    group: statistics.median(
                        row["seconds_per_repeat"][i] / reference[i] for i in rounds
                    )
                    for group, rounds in groups.items()
                }
                for name, row in rows.items()
            },
        }
    return split


def fast_rounds_sentence(record: dict[str, Any]) -> str | None:
    """The sentence that quotes the ratios (plain / centered + momentum) in the rounds with the
    fastest float32 step and in the others, or None for a record without per-round times."""
    if not has_round_times(record):
        return None
    split = split_by_float32_speed(record)
    plain, centered = split["plain"], split["centered + momentum"]

    def milliseconds(group: str) -> list[str]:
        return [
            f"{min(s[group]) * 1e3:.1f}-{max(s[group]) * 1e3:.1f} ms"
            for s in (plain["float32_seconds"], centered["float32_seconds"])
        ]

    def ratios(name: str, group: str) -> str:
        return " / ".join(f"{v['ratios'][name][group]:.2f}x" for v in (plain, centered))

    def eight_bit_mu(group: str) -> str:
        if EIGHT_BIT_MU not in centered["ratios"]:
            return ""
        return f" (8-bit `mu`: {centered['ratios'][EIGHT_BIT_MU][group]:.2f}x)"

    fast_rounds = len(plain["float32_seconds"]["fast"])
    other_rounds = len(plain["float32_seconds"]["other"])
    (fast_plain, fast_centered), (other_plain, other_centered) = map(
        milliseconds, ("fast", "other")
    )
    return (
        f"In the {fast_rounds} of its {fast_rounds + other_rounds} rounds in which the float32 "
        f"step ran fastest ({fast_plain} plain and {fast_centered} centered with momentum, "
        f"against {other_plain} and {other_centered} in the others), bfloat16 measured "
        f"{ratios('bfloat16', 'fast')}, int8 {ratios('int8', 'fast')}{eight_bit_mu('fast')} "
        f"and factored {ratios('factored', 'fast')}; in the other {other_rounds}, "
        f"{ratios('bfloat16', 'other')}, {ratios('int8', 'other')}{eight_bit_mu('other')} "
        f"and {ratios('factored', 'other')}."
    )


def bandwidth_sentence(record: dict[str, Any]) -> str | None:
    """The sentence that compares each contender's median step time (plain / centered +
    momentum) in the rounds with the fastest float32 step with its time in the others, or None
    for a record without per-round times."""
    if not has_round_times(record):
        return None
    split = split_by_float32_speed(record)

    def change(variant: str, name: str) -> str:
        seconds = split[variant]["median_seconds"][name]
        return f"{seconds['fast'] / seconds['other']:.2f}x"

    def changes(name: str) -> str:
        return " / ".join(change(variant, name) for variant in ("plain", "centered + momentum"))

    return (
        "Against its median time in the other rounds, each step's median in those rounds was "
        f"{changes('float32')} with float32 (`optax.adam`, plain: "
        f"{change('plain', 'optax.adam')}), {changes('bfloat16')} with bfloat16, "
        f"{changes('int8')} with int8 and {changes('factored')} with factored: the compressed "
        "steps, bound more by arithmetic, gain less from the memory bandwidth that speeds up "
        "float32's."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "record", nargs="?", type=Path, default=RESULTS / "memory_cpu.json", help="memory.py JSON"
    )
    args = parser.parse_args(argv)
    record = json.loads(args.record.read_text())
    for name, cells in table_cells(record).items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nsaved at the update step's peak against float32 (bytes per parameter):")
    for name, saved in peak_savings(record).items():
        print(f"  {name}: {saved}")
    print(f"\ntraining step: ... {training_sentence(record)}")
    spread = spread_sentence(record)
    print(f"\nstep time: ... {spread}" if spread else "\n(no quartiles of the step times)")
    fast = fast_rounds_sentence(record)
    print(f"\n{fast}" if fast else "\n(no per-round step times)")
    bandwidth = bandwidth_sentence(record)
    if bandwidth:
        print(f"\n{bandwidth}")


if __name__ == "__main__":
    main()
