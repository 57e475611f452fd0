"""The figures README.md and docs/ quote from an example are what the example prints.

Each test runs a documented command as written (its flags and seed; only the output folder
differs) and compares the numbers the text quotes from it. Times are left out: they follow
the machine. A change of the optimizer or an example that moves a trajectory fails here:
rerun the command and update the text with what it prints.

The figures were printed on x86-64 CPUs with the JAX release below; another release may
round differently, so with any other the tests skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from helpers import example

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

DOCUMENTED_JAX = "0.10.2"

pytestmark = [
    pytest.mark.slow,  # every test trains an example
    pytest.mark.skipif(
        jax.__version__ != DOCUMENTED_JAX,
        reason=f"the documents quote runs with JAX {DOCUMENTED_JAX}, not {jax.__version__}",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def example_on_cpu(name):
    if jax.default_backend() != "cpu":
        pytest.skip("the documents quote runs on CPUs")
    return example(name)


def quoted(document: str, pattern: str) -> tuple[str, ...]:
    """The groups of `pattern`'s one match in `document` (a path under the repository)."""
    matches = re.findall(pattern, (ROOT / document).read_text())
    assert len(matches) == 1, f"{document}: {len(matches)} matches of {pattern!r}"
    [match] = matches
    return match if isinstance(match, tuple) else (match,)


def run_script(*flags: str) -> str:
    command = [sys.executable, str(EXAMPLES / "sharded_training.py"), *flags]
    result = subprocess.run(
        command,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # progress goes to stderr: keep the order it was printed in
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-5000:]
    return result.stdout


def test_readme_and_flax_guide_quote_the_demo_accuracy(tmp_path):
    [result] = example_on_cpu("train_digits").main(["--out", str(tmp_path)])

    printed = f"{result['test_accuracy']:.1%}"
    assert quoted("README.md", r"reaches (\d+\.\d%) test accuracy") == (printed,)
    assert quoted("docs/flax.md", r"It reaches (\d+\.\d%) test accuracy") == (printed,)


def test_flax_guide_table_is_the_table_compare_writes(tmp_path):
    example_on_cpu("train_digits").main(["--compare", "--out", str(tmp_path)])

    def without_times(lines):  # the last column is the wall time
        return [line.rsplit("|", 2)[0] for line in lines if line.startswith("| ")]

    written = (tmp_path / "compare.md").read_text().splitlines()
    documented = (ROOT / "docs" / "flax.md").read_text().splitlines()
    start = documented.index(written[0])
    assert without_times(documented[start : start + len(written)]) == without_times(written)


def test_readme_quotes_the_ellipse_step_counts(tmp_path):
    steps = example_on_cpu("ellipse").main(["--out", str(tmp_path)])

    rms, gd = quoted(
        "README.md", r"of the minimum in (\d+) steps\s+against gradient descent's (\d+)"
    )
    assert (int(rms), int(gd)) == (steps["RMSprop"], steps["gradient descent"])


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [
        ((), r"`--devices 8` \(300 steps, float32 state\)\s+prints `test accuracy (0\.\d+)`"),
        (("--storage", "int8"), r"`--storage int8` prints `test accuracy (0\.\d+)`"),
    ],
    ids=["float32", "int8"],
)
def test_scaling_guide_quotes_the_sharded_accuracies(flags, pattern, tmp_path):
    output = run_script("--devices", "8", *flags, "--out", str(tmp_path))

    [printed] = re.findall(r"^test accuracy (0\.\d+)$", output, re.MULTILINE)
    assert quoted("docs/scaling.md", pattern) == (printed,)


def test_scaling_guide_shows_what_process_0_prints(tmp_path):
    flags = ["--processes", "2", "--devices", "2", "--storage", "int8"]
    assert quoted("docs/scaling.md", r"python examples/sharded_training.py (--processes .*)\n") == (
        " ".join(flags),
    )
    output = run_script(*flags, "--timeout", "240", "--out", str(tmp_path))

    def kept(lines):  # progress lines carry times, the output folder differs, JAX may warn
        return [
            line
            for line in lines
            if line.startswith(("4 devices", "step ", "test ", "params ", "state "))
        ]

    [block] = re.findall(
        r"```text\n(4 devices in 2 processes.*?)```",
        (ROOT / "docs" / "scaling.md").read_text(),
        re.DOTALL,
    )
    assert kept(output.splitlines()) == kept(block.splitlines())
