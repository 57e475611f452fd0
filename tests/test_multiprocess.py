"""Two OS processes joined by `jax.distributed` on 127.0.0.1 train like a single device.

Each process runs `tests/_sharded_worker.py train` with 2 simulated CPU devices: 4 devices
in all, one mesh axis "fsdp" across both processes. Parameters, optimizer state and batch
are split over it, so each process holds half the model and the steps run CPU collectives
(gloo) between the processes. Each process then trains the same model on one of its own
devices, and reports both runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec

WORKER = Path(__file__).with_name("_sharded_worker.py")
PROCESSES = 2
TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(tmp_path: Path) -> list[dict]:
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    outs = [tmp_path / f"process{i}.json" for i in range(PROCESSES)]
    logs = [(tmp_path / f"process{i}.log").open("w+") for i in range(PROCESSES)]
    command = [sys.executable, str(WORKER), "train", "--num-processes", str(PROCESSES)]
    processes = [
        subprocess.Popen(
            [*command, "--process-id", str(i), "--port", str(port), "--out", str(outs[i])],
            env=env,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )
        for i in range(PROCESSES)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the processes did not finish within {TIMEOUT_S} s")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        messages = []
        for log in logs:
            log.seek(0)
            messages.append(log.read()[-4000:])
            log.close()
    for i, process in enumerate(processes):
        assert process.returncode == 0, f"process {i}:\n{messages[i]}"
    return [json.loads(out.read_text()) for out in outs]


@pytest.mark.slow
def test_two_processes_train_a_sharded_model_to_the_parameters_of_one_device(tmp_path):
    reports = _run_processes(tmp_path)
    for index, report in enumerate(reports):
        assert report["process_index"] == index
        assert report["process_count"] == PROCESSES
        assert report["global_devices"] == 4
        assert report["local_devices"] == 2
        # The state of the first layer is split over the 4 devices like its weights: each
        # process holds 2 of the 4 column blocks.
        assert report["sharded_nu_w1_same_sharding_as_w1"]
        # The repr is "P(...)" in newer JAX and "PartitionSpec(...)" in older.
        assert report["sharded_nu_w1_spec"] == str(PartitionSpec(None, "fsdp"))
        assert report["sharded_nu_w1_local_shards"] == [[64, 32], [64, 32]]
        assert report["sharded_count_fully_replicated"]
        assert report["sharded_eager_init_follows_params"]
        losses = report["sharded_losses"]
        assert losses[-1] < 0.5 * losses[0], losses
        np.testing.assert_allclose(losses, report["single_losses"], rtol=1e-5, atol=1e-6)
        for name, single in report["single_params"].items():
            np.testing.assert_allclose(
                report["sharded_params"][name], single, rtol=1e-5, atol=1e-5, err_msg=name
            )
    # Both processes gathered the same global parameters.
    assert reports[0]["sharded_params"] == reports[1]["sharded_params"]
