"""One process of a multi-process run: `jax.distributed` on 127.0.0.1, 2 devices each.

The multi-process tests start this script once per process and read back a JSON report:

    python tests/_sharded_worker.py train --num-processes 2 --process-id 0 --port 12345 \
        --out report0.json

It trains a small MLP sharded over all processes and reports the final parameters next to
those of a single-device run made by the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ARGS = argparse.ArgumentParser()
ARGS.add_argument("mode", choices=["train"])
ARGS.add_argument("--out", required=True)
ARGS.add_argument("--num-processes", type=int, default=1)
ARGS.add_argument("--process-id", type=int, default=0)
ARGS.add_argument("--port", type=int, default=0)
OPTIONS = ARGS.parse_args()
DEVICES = 2
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    + [f"{_DEVICE_FLAG}={DEVICES}"]
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import rmsprop_jax as rj  # noqa: E402


def train() -> dict:
    """One process of a multi-process run on 127.0.0.1 (or a single process)."""
    from _sharded_checks import mlp_problem, mlp_train

    if OPTIONS.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{OPTIONS.port}",
            num_processes=OPTIONS.num_processes,
            process_id=OPTIONS.process_id,
            initialization_timeout=60,
        )
    assert jax.process_count() == OPTIONS.num_processes
    mesh = jax.make_mesh(
        (jax.device_count(),), ("fsdp",), axis_types=(AxisType.Auto,), devices=jax.devices()
    )
    problem = mlp_problem()
    tx = rj.rmsprop(3e-3, centered=True, momentum=0.9, moment_storage="float32")
    sharded = mlp_train(tx, problem, mesh)
    local = jax.make_mesh(
        (1,), ("fsdp",), axis_types=(AxisType.Auto,), devices=jax.local_devices()[:1]
    )
    single = mlp_train(tx, problem, local)
    report = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "global_devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
    }
    report.update({f"sharded_{k}": v for k, v in sharded.items()})
    report.update({f"single_{k}": v for k, v in single.items()})
    if OPTIONS.num_processes > 1:
        jax.distributed.shutdown()
    return report


if __name__ == "__main__":
    result = train()
    with open(OPTIONS.out, "w") as f:
        json.dump(result, f)
