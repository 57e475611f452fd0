"""The `--help` of every example: each flag with its default, unless it has none."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to a flag's help, except where there is no default to show.

    A default of None (the flag is off, or computed, as its help says) or of False (an on/off
    switch) would only add noise.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
