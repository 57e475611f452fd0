"""The figures README.md and docs/ quote from an example, a code block of their own or the
conformance tests' output are what those print.

Each test runs a documented command as written (its flags and seed; only the output folder
differs, and pytest writes no cache) and compares the numbers the text quotes from it. Times
are left out: they follow the machine. A change of the optimizer, an example or a conformance
test that moves a trajectory fails here: rerun the command and update the text with what it
prints.

The figures were printed on x86-64 CPUs with the JAX release below (and, for the conformance
figures, the PyTorch and Keras releases porting.md names); another release may round
differently, so with any other the tests skip."""

from __future__ import annotations

import contextlib
import decimal
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import import_reference_framework
from helpers import example

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

DOCUMENTED_JAX = "0.10.2"

pytestmark = [
    pytest.mark.slow,  # most tests train an example or run conformance tests
    pytest.mark.skipif(
        jax.__version__ != DOCUMENTED_JAX,
        reason=f"the documents quote runs with JAX {DOCUMENTED_JAX}, not {jax.__version__}",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def require_cpu() -> None:
    if jax.default_backend() != "cpu":
        pytest.skip("the documents quote runs on CPUs")


def example_on_cpu(name):
    require_cpu()
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


# For each row of porting.md's conformance table (by its first cell), the lines the
# conformance tests print for each figure the row quotes, in the row's order. A figure is the
# largest difference its lines print (a row covers several settings, or both directions).
CONFORMANCE_LINES = {
    "PyTorch parameter groups": [r"\d+ torch param groups, "],
    "multi-group PyTorch checkpoints": [r"torch \d+ steps in \d+ groups, then here: "],
    "`StepLR(": [r"StepLR: ", r"RMSprop under StepLR, "],
    "`StepLR` stepped once per epoch": [r"StepLR-per-epoch: ", r"RMSprop under StepLR-per-epoch, "],
    "`MultiStepLR(": [r"MultiStepLR: ", r"RMSprop under MultiStepLR, "],
    "`ExponentialLR(": [r"ExponentialLR: ", r"RMSprop under ExponentialLR, "],
    "`LinearLR(": [r"LinearLR: ", r"RMSprop under LinearLR, "],
    "`ConstantLR(": [r"ConstantLR: ", r"RMSprop under ConstantLR, "],
    "`CosineAnnealingLR(": [r"CosineAnnealingLR: ", r"RMSprop under CosineAnnealingLR, "],
    "`CosineAnnealingWarmRestarts(": [
        r"CosineAnnealingWarmRestarts(-Tmult1)?: ",
        r"RMSprop under CosineAnnealingWarmRestarts(-Tmult1)?, ",
    ],
    "`OneCycleLR(": [
        r"OneCycleLR(-three-phase-linear)?: ",
        r"RMSprop under OneCycleLR(-three-phase-linear)?, ",
        r"RMSprop under OneCycleLR with momentum: ",
    ],
    "`PolynomialLR(": [r"PolynomialLR: ", r"RMSprop under PolynomialLR, "],
    "`LambdaLR(": [r"LambdaLR: ", r"RMSprop under LambdaLR, "],
    "`SequentialLR(": [r"SequentialLR: ", r"RMSprop under SequentialLR, "],
    "`ReduceLROnPlateau(": [r"RMSprop under ReduceLROnPlateau "],
    "Keras `use_ema=True`": [r"keras_rmsprop use_ema "],
    "Keras optimizer state": [
        r"(Keras \d+ steps, keras_rmsprop|keras_rmsprop \d+ steps, Keras) after: "
    ],
    "`jax.example_libraries.optimizers.rmsprop(": [r"rmsprop preset, "],
    "`jax.example_libraries.optimizers.rmsprop_momentum(": [r"rmsprop_momentum preset, "],
    "its `OptimizerState`": [r"rmsprop(_momentum)? converted at \d+: "],
}


def conformance_table() -> dict[str, list[str]]:
    """Each row of porting.md's conformance table: its key in CONFORMANCE_LINES -> figures."""
    lines = (ROOT / "docs" / "porting.md").read_text().splitlines()
    start = lines.index("| feature | matching call | test | worst relative difference |") + 2
    table = {}
    for row in lines[start:]:
        if not row.startswith("| "):
            break
        cells = row[2:-2].split(" | ")
        keys = [key for key in CONFORMANCE_LINES if cells[0].startswith(key)]
        assert len(keys) == 1, f"porting.md: no one key of CONFORMANCE_LINES for {cells[0]!r}"
        table[keys[0]] = cells[-1].split("; ")
    return table


def two_digits(printed: str) -> str:
    """A printed figure as porting.md writes it, rounded half up: "9.35e-08" -> "9.4e-8"."""
    mantissa, exponent = printed.split("e")
    rounded = decimal.Decimal(mantissa).quantize(decimal.Decimal("0.1"), decimal.ROUND_HALF_UP)
    return f"{rounded}e{int(exponent)}"


def test_porting_guide_quotes_the_conformance_figures():
    """Each figure of porting.md's table is what its documented command prints now."""
    require_cpu()
    torch = import_reference_framework("torch")
    keras = import_reference_framework("keras")
    text = (ROOT / "docs" / "porting.md").read_text()
    torch_version, keras_version = quoted(
        "docs/porting.md", r"the real framework \(PyTorch ([\d.]+), Keras ([\d.]+)\)"
    )
    if not (
        torch.__version__.startswith(torch_version) and keras.__version__.startswith(keras_version)
    ):
        pytest.skip(f"porting.md quotes runs with PyTorch {torch_version}, Keras {keras_version}")
    [command] = re.findall(
        r"as this command prints it:\s+```bash\n(python -m pytest .*?)```", text, re.DOTALL
    )
    result = subprocess.run(
        [sys.executable, *command.replace("\\\n", " ").split()[1:], "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-5000:]
    # Without the test file's name and the marks of passed or skipped tests before an output.
    printed = [re.sub(r"^(\S+\.py )?[.sx]*", "", line) for line in result.stdout.splitlines()]

    def measured(pattern: str) -> str:
        figures = [
            figure
            for line in printed
            if (match := re.match(pattern, line))
            for figure in re.findall(r"\d\.\d+e[-+]\d+", line[match.end() :])
        ]
        assert figures, f"no line printed matches {pattern!r}"
        return two_digits(max(figures, key=float))

    table = conformance_table()
    assert sorted(table) == sorted(CONFORMANCE_LINES)
    stale = {
        key: (table[key], printed_figures)
        for key, patterns in CONFORMANCE_LINES.items()
        if table[key] != (printed_figures := [measured(pattern) for pattern in patterns])
    }
    assert not stale, f"porting.md quotes (left) what the tests do not print (right): {stale}"


@pytest.mark.parametrize(
    "claim",
    [
        r"this\s+prints\s+(\d\.\d\d)\s+bytes\s+per\s+parameter\s+for\s+int8\s+throughout,\s+"
        r"(\d\.\d\d)\s+mixed",
        r"this\s+prints\s+(\d\.\d\d)\s+and\s+(\d\.\d\d)\s+bytes\s+per\s+parameter",
    ],
    ids=["int8-and-mixed", "mu"],
)
def test_storage_guide_quotes_what_its_state_size_examples_print(claim):
    text = (ROOT / "docs" / "storage.md").read_text()
    [match] = list(re.finditer(claim, text))
    block = re.search(r"```python\n(.*?)```", text[match.end() :], re.DOTALL)
    assert block is not None, f"storage.md: no example after {match.group(0)!r}"
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(block.group(1), {})
    printed = re.findall(r": (\d\.\d\d) bytes per parameter$", output.getvalue(), re.MULTILINE)
    assert tuple(printed) == match.groups()
