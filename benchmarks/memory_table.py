"""The low-memory table of README.md and docs/storage.md, rendered from a `memory.py` record.

    python benchmarks/memory_table.py                       # from results/memory_<platform>.json
    python benchmarks/memory_table.py outputs/benchmarks/memory_cpu_<time>.json

Prints, per storage format and reference optimizer, the figures the documents quote: state
bytes per parameter, the update step's compiled peak and temporaries (bytes per parameter),
and its time relative to the float32 step (plain / centered + momentum), followed by the
savings, the training-step peaks and the spread of the time ratios quoted below the table.
`tests/test_benchmarks_cli.py` checks that the documents quote the committed record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ("float32", "bfloat16", "int8", "factored")
REFERENCES = ("optax.adam", "optax.adafactor")
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


if __name__ == "__main__":
    main()
