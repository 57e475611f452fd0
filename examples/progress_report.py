"""How every example reports progress: a bar on a terminal, plain periodic lines otherwise.

A carriage-return bar is the right thing in a terminal and noise in a log file or a pipe,
where it also cannot be read until the end; a run that prints nothing for a minute looks
hung. So on a terminal this is a tqdm bar, and otherwise one plain line at most every
`interval` seconds plus one at the end, each saying how far the run is and the latest
values. In a run of several processes only one of them (process 0) reports.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

PLAIN_INTERVAL_SECONDS = 10.0


class Progress:
    """Iterates over `iterable`, reporting progress to `file` (stderr by default)."""

    def __init__(
        self,
        iterable: Iterable[Any],
        *,
        total: int,
        desc: str,
        unit: str,
        initial: int = 0,
        enabled: bool = True,
        file: TextIO | None = None,
        interval: float = PLAIN_INTERVAL_SECONDS,
    ):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.count, self.enabled, self.interval = initial, enabled, interval
        self.file = sys.stderr if file is None else file
        self.postfix: dict[str, str] = {}
        self.started = self.last_line = time.monotonic()
        is_terminal = getattr(self.file, "isatty", lambda: False)()
        self.bar = None
        if enabled and is_terminal:
            self.bar = tqdm(
                total=total, desc=desc, unit=unit, initial=initial, file=self.file, leave=True
            )

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.count += 1
            if self.bar is not None:
                self.bar.update(1)
            elif self.enabled:
                now = time.monotonic()
                if now - self.last_line >= self.interval or self.count >= self.total:
                    self._plain_line(now)
        self.close()

    def set_postfix(self, **values: str) -> None:
        """The latest values (already formatted), shown after the count."""
        self.postfix = {name: str(value) for name, value in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def write(self, line: str) -> None:
        """A line of its own, above the bar on a terminal."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.file)
        else:
            print(line, file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _plain_line(self, now: float) -> None:
        values = "".join(f", {name} {value}" for name, value in self.postfix.items())
        elapsed = now - self.started
        print(
            f"{self.desc}: {self.unit} {self.count}/{self.total}{values} ({elapsed:.0f} s)",
            file=self.file,
            flush=True,
        )
        self.last_line = now


def format_loss(value: float) -> str:
    """Three significant digits at any scale: 2.30, 0.0123, 7.41e-04, never 0.0000."""
    if value == 0:
        return "0"
    return f"{value:#.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
