"""examples/ellipse.py: RMSprop beats gradient descent where gradient descent zig-zags."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ellipse.py"


def load_example():
    spec = importlib.util.spec_from_file_location("ellipse_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rmsprop_reaches_the_minimum_in_fewer_steps_than_oscillating_gradient_descent(
    tmp_path, capsys
):
    steps = load_example().main(["--out", str(tmp_path)])
    assert steps["RMSprop"] is not None and steps["gradient descent"] is not None
    assert steps["RMSprop"] < steps["gradient descent"]
    assert (tmp_path / "ellipse.png").stat().st_size > 10_000
    assert "fewer steps than gradient descent" in capsys.readouterr().out


def test_gradient_descent_oscillates_across_the_steep_axis_at_the_default_rate(tmp_path):
    example = load_example()
    points = example.trajectory(example.optax.sgd(0.019), 10)
    signs = [1 if y > 0 else -1 for y in points[:, 1]]
    assert all(a != b for a, b in itertools.pairwise(signs))
