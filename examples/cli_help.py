"""The command lines of the examples and the benchmarks: `--help` with each flag's default,
unless it has none, and flag types that refuse a value out of range as a usage error (rather
than a traceback from deep inside the run)."""

from __future__ import annotations

import argparse
import math


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to the help of a flag that takes a value, where it has a default.

    A switch (on or off as given), a default of None (the flag is off, or computed, as its help
    says) or of [] (a repeatable flag, none unless given) would only add noise.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


def positive_integer(text: str) -> int:
    """A whole number >= 1: epochs, steps, sizes, timing rounds, leaf counts."""
    value = int(text)  # argparse reports a ValueError as "invalid positive_integer value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def positive_number(text: str) -> float:
    """A finite number > 0: a learning rate, a distance."""
    value = float(text)  # argparse reports a ValueError as "invalid positive_number value"
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1): a momentum."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def random_seed(text: str) -> int:
    """An integer in [0, 2**32): what NumPy's and JAX's generators both take."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}")
    return value
