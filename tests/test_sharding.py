"""Optimizer state sharded like its parameters, on 8 simulated CPU devices.

XLA reads the number of simulated CPU devices once, when JAX starts, and this process has
started it already: `tests/_sharded_worker.py layouts` does the work in a child process and
writes a JSON report, which one test reads (one test, so that `pytest -n` starts one child:
the compilations take about a minute).

What the child runs: a (2, 4) mesh ("data", "model"); an FSDP layout (every parameter split
over all 8 devices along its largest axis) and a tensor-parallel one (Megatron column- and
row-parallel layers over "model", one matrix over both axes, one replicated bias); every
storage format; two variants that between them cover centered, heavy-ball and Nesterov
momentum, bias correction, coupled and decoupled weight decay; automatic sharding
(`Mesh(..., Auto)`) and explicit sharding (`jax.set_mesh` with Explicit axes); `init` and
10 `update` steps under `jax.jit` with no `out_shardings`, against the same on one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import needs_jax_0_10_placement

WORKER = Path(__file__).with_name("_sharded_worker.py")
STORAGES = {"float32", "bfloat16", "int8", "factored"}
# Column statistics of a matrix split by rows (and row statistics of one split by columns)
# are means over the split axis: every device needs all of them.
FACTORED_REDUCED_OVER_SPLIT_AXIS = {
    "[2].nu.col['fsdp']['w_out']",
    "[2].nu.col['tensor_parallel']['w_row']",
    "[2].nu.row['tensor_parallel']['w_col']",
}
# bfloat16 and int8 round stochastically: a last-bit difference between the sharded and the
# single-device programs (another fusion, another summation order) moves an isolated element
# to the neighbouring code, about once per 10^5 element-steps here; never a whole shard.
STOCHASTIC_ROUNDING_ALLOWANCE = 1e-3


def _layouts_report(tmp_path) -> dict:
    out = tmp_path / "layouts.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    process = subprocess.run(
        [sys.executable, str(WORKER), "layouts", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    return json.loads(out.read_text())


def _check_placement(label: str, placement: dict, storage: str) -> None:
    assert placement["leaves"] >= 19, (label, placement["leaves"])
    assert placement["misplaced"] == [], f"{label}: leaves not on their parameter's devices"
    assert placement["disagrees_with_state_shardings"] == [], f"{label}: state_shardings is off"
    assert placement["replicated_but_kept_axis_sharded"] == [], f"{label}: replicated leaves"
    reduced = FACTORED_REDUCED_OVER_SPLIT_AXIS if storage == "factored" else set()
    assert set(placement["replicated_reduced_stats"]) == reduced, label
    assert placement["scalars_replicated"], f"{label}: a step count is not on all 8 devices"


def _check_results(label: str, errors: dict, storage: str) -> None:
    assert errors["elements"] > 0, label
    if storage in ("float32", "factored"):
        assert errors["error"] <= 1e-6, (label, errors)
        assert errors["code_mismatches"] == 0, (label, errors)
        return
    allowance = STOCHASTIC_ROUNDING_ALLOWANCE
    assert errors["off"] <= allowance * errors["elements"], (label, errors)
    assert errors["code_mismatches"] <= allowance * max(errors["codes"], 1), (label, errors)
    assert errors["error"] <= 1e-2, (label, errors)


@pytest.mark.slow
@needs_jax_0_10_placement
def test_state_lives_with_its_parameter_and_matches_the_single_device_run(tmp_path):
    """Every state leaf, after `init` and after 10 steps, is placed like its parameter.

    Same-shaped leaves (`nu`, `mu`, momentum, int8 codes) on each device hold exactly the
    slice of the parameter that device holds; int8 block scales the blocks of those slices;
    factored row and column statistics the parameter's slices along the axes they keep. No
    leaf is replicated while its parameter is split along an axis it keeps; step counts are
    replicated. `rj.sharding.state_shardings` predicts all of it, and the parameters and
    states equal those of the same steps on one device within 1e-6 (relative above 1).

    `state_shardings` from arrays, from ShapeDtypeStructs and from shapes plus shardings
    agree, and work as `out_shardings` of a jitted `init`; `abstract_state` restores an
    orbax checkpoint onto the devices, with its types; an eager `init` places the state the
    same way. `rj.pack_small_leaves` packs only leaves that are not split over devices and
    gives the single-device results.
    """
    report = _layouts_report(tmp_path)
    runs = report["runs"]
    configurations = {(r["mesh"], r["variant"], r["storage"]) for r in runs}
    assert len(configurations) == len(runs) == 12
    assert {r["storage"] for r in runs if r["mesh"] == "explicit"} == STORAGES
    for run in runs:
        label = f"{run['mesh']} mesh, {run['variant']}, {run['storage']}"
        _check_placement(f"{label}, after init", run["init"], run["storage"])
        _check_placement(f"{label}, after 10 steps", run["final"], run["storage"])
        _check_results(f"{label}, parameters", run["params"], run["storage"])
        _check_results(f"{label}, state", run["state"], run["storage"])

    abstract = report["abstract"]
    assert set(abstract) == STORAGES
    for storage in ("int8", "factored"):
        checks = abstract[storage]
        assert checks["inputs_agree"], storage
        assert checks["abstract_state_matches_eval_shape"], storage
        assert checks["abstract_state_shardings"], storage
        assert checks["out_shardings_init_equals_plain_jit"], storage
        _check_placement(
            f"{storage}, jit(init, out_shardings)", checks["out_shardings_init"], storage
        )
    assert abstract["int8"]["orbax_restore"] == {
        "same_structure": True,
        "same_shardings": True,
        "same_values": True,
    }
    for storage in STORAGES:
        _check_placement(f"{storage}, eager init", abstract[storage]["eager_init"], storage)

    # rj.pack_small_leaves (max_size 2048): with automatic sharding every bias is packed;
    # with explicit sharding only the replicated one (b_row, 128 elements), since a bias split
    # over devices says so in its type. Unpacked state follows its parameter either way.
    packing = report["packing"]
    assert packing["auto"]["packed_sizes"] == {"float32": 2048 + 128 + 1024 + 128}
    assert packing["explicit"]["packed_sizes"] == {"float32": 128}
    for mesh in ("auto", "explicit"):
        assert packing[mesh]["unpacked_state_placed_like_params"], mesh
        assert packing[mesh]["params"]["elements"] > 0, mesh
        assert packing[mesh]["params"]["error"] <= 1e-6, (mesh, packing[mesh]["params"])
