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
    for process in (0, 1):
        assert f"[process {process}/2] 2 local of 4 devices" in output
        assert re.search(rf"\[process {process}/2\] test accuracy 0\.\d+", output), output
    # The second moment of w2 (512 x 512, rows split over 4 devices) lives like w2: process 1
    # holds rows 256:512 on its two devices.
    states = re.findall(r"\[process 1/2\] state nu\['w2'\] \(512, 512\) float32 .*", output)
    assert states, output[-3000:]
    # The repr is "P(...)" in newer JAX and "PartitionSpec(...)" in older.
    assert f"sharded as {PartitionSpec('fsdp')}" in states[0]
    assert "256:384 x 0:512" in states[0] and "384:512 x 0:512" in states[0]
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "placement.png").stat().st_size > 0
