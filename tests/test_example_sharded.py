"""examples/sharded_training.py runs as documented: two processes, sharded MLP, figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec

EXAMPLE = Path(__file__).parents[1] / "examples" / "sharded_training.py"


@pytest.mark.slow
def test_two_process_example_trains_and_shows_where_the_state_lives(tmp_path):
    command = [sys.executable, str(EXAMPLE), "--processes", "2", "--devices", "2"]
    command += ["--steps", "6", "--batch", "64", "--timeout", "120", "--out", str(tmp_path)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    # One process speaks for both: each line once, no interleaving.
    assert "4 devices in 2 processes, 2 per process" in output
    assert len(re.findall(r"^test accuracy 0\.\d+$", output, re.MULTILINE)) == 1, output
    # The second moment of w2 (512 x 512, rows split over 4 devices) lives like w2: process 1
    # holds rows 256:512 on its two devices.
    states = re.findall(r"^state nu\['w2'\] \(512, 512\) float32 .*", output, re.MULTILINE)
    assert len(states) == 1, output[-3000:]
    # The repr is "P(...)" in newer JAX and "PartitionSpec(...)" in older.
    assert f"sharded as {PartitionSpec('fsdp')}" in states[0]
    assert "2 (process 1): 256:384 x 0:512" in states[0]
    assert "3 (process 1): 384:512 x 0:512" in states[0]
    assert "\r" not in output  # not a terminal: plain progress lines, no bar
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "placement.png").stat().st_size > 0
