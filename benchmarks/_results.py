"""Where a benchmark writes its JSON, and the flags and notes every benchmark shares.

The committed results in benchmarks/results/ are what benchmarks/README.md quotes. A run
writes a new file (outputs/benchmarks/<name>_<platform>_<time>.json) unless it is asked to
replace the committed one with `--update-results`, which a `--quick` run may not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

# The `--help` formatter and the whole-number flag type (rounds, steps, leaves, sizes) of the
# examples (examples/cli_help.py), shared with the benchmarks' scripts; the folder is appended,
# so that a module of this one is never shadowed by one of the examples'.
sys.path.append(str(Path(__file__).resolve().parents[1] / "examples"))
from cli_help import DefaultsHelpFormatter
from cli_help import positive_integer as positive_integer

COMMITTED = Path(__file__).resolve().parent / "results"
NEW_RESULTS = Path("outputs") / "benchmarks"
# Optional contenders: the module they need and the extra of this package that installs it.
OPTIONAL_CONTENDERS = {"torch": ("PyTorch", "conformance")}


class Durations(NamedTuple):
    """How long a benchmark's runs take, as its `--help` and its first line say."""

    full: str
    quick: str
    whole: str = "full run"  # what the run without --quick covers


def new_parser(doc: str, durations: Durations) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first line and what its runs take, for `--help`."""
    return argparse.ArgumentParser(
        description=f"{doc.splitlines()[0]} The {durations.whole} takes {durations.full}; "
        f"--quick takes {durations.quick}.",
        formatter_class=DefaultsHelpFormatter,
    )


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`argv` parsed by a benchmark's `parser`, with the output flags every benchmark shares
    (`--out`, `--update-results`, which a `--quick` run may not use) added and checked."""
    parser.add_argument(
        "--out",
        type=Path,
        default=NEW_RESULTS,
        help="folder for the new results file",
    )
    parser.add_argument(
        "--update-results",
        action="store_true",
        help=f"replace the committed results in {COMMITTED.parent.name}/{COMMITTED.name}/ "
        "(the files benchmarks/README.md quotes) instead of writing a new file",
    )
    args = parser.parse_args(argv)
    if args.update_results and getattr(args, "quick", False):
        parser.error("--update-results replaces the committed full results: run without --quick")
    return args


def output_path(name: str, platform: str, args: argparse.Namespace) -> Path:
    """The committed file with --update-results, otherwise a new file in args.out."""
    if args.update_results:
        return COMMITTED / f"{name}_{platform}.json"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"{name}_{platform}_{stamp}.json"
    suffix = 1
    while path.exists():  # two runs within one second
        suffix += 1
        path = args.out / f"{name}_{platform}_{stamp}-{suffix}.json"
    return path


def write_results(
    name: str, platform: str, args: argparse.Namespace, record: Any, *, indent: int = 2
) -> Path:
    """Writes `record` as JSON where :func:`output_path` says, and says where."""
    path = output_path(name, platform, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=indent) + "\n")
    print(f"\nwrote {path}")
    return path


def missing_contenders(module: str) -> str | None:
    """A note naming the missing optional framework and the extra that installs it."""
    if importlib.util.find_spec(module) is not None:
        return None
    framework, extra = OPTIONAL_CONTENDERS[module]
    return (
        f"{framework} is not installed, so its contenders are left out of this run; "
        f'install them with: pip install -e ".[{extra}]"'
    )


def announce(name: str, quick: bool, durations: Durations) -> None:
    """The first line of every benchmark: what the run will cost."""
    duration = (
        f"{durations.quick} (--quick)."
        if quick
        else f"the {durations.whole} takes {durations.full} (--quick: {durations.quick})."
    )
    print(
        f"{name}: {duration} Cores are assumed idle: other work slows every contender.",
        flush=True,
    )
