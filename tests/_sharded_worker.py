"""Sharding checks that need a fresh JAX: 8 simulated devices, or one of several processes.

XLA reads the number of simulated CPU devices once, when JAX starts, so the tests run this
script in child processes and read back a JSON report:

    python tests/_sharded_worker.py layouts --out report.json
    python tests/_sharded_worker.py train --num-processes 2 --process-id 0 --port 12345 \
        --out report0.json

`layouts` trains FSDP and tensor-parallel layouts on a (2, 4) mesh of 8 devices, with every
variant and storage format, and measures where each state leaf lives and how far the results
are from a single-device run. `train` joins `jax.distributed` on 127.0.0.1 with 2 local
devices per process, trains a small MLP sharded over all processes, and reports the final
parameters next to those of a single-device run made by the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

ARGS = argparse.ArgumentParser()
ARGS.add_argument("mode", choices=["layouts", "train"])
ARGS.add_argument("--out", required=True)
ARGS.add_argument("--num-processes", type=int, default=1)
ARGS.add_argument("--process-id", type=int, default=0)
ARGS.add_argument("--port", type=int, default=0)
OPTIONS = ARGS.parse_args()
DEVICES = 8 if OPTIONS.mode == "layouts" else 2
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _sharded_checks import (  # noqa: E402
    STORAGES,
    VARIANTS,
    compare_runs,
    layout_params,
    placement_report,
)

import rmsprop_jax as rj  # noqa: E402
from rmsprop_jax import _jax_compat  # noqa: E402

STEPS = 10


def _named(mesh: jax.sharding.Mesh, specs: dict) -> dict:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def _train(tx, params, grads, shardings=None):
    """Init and `STEPS` jitted steps; returns (state after init, params, state)."""
    init = jax.jit(tx.init, out_shardings=shardings)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state = init(params)
    initial = state
    for g in grads:
        params, state = step(params, state, g)
    return initial, params, state


def layouts() -> dict:
    assert jax.device_count() == 8, jax.devices()
    host, specs = layout_params()
    rng = np.random.default_rng(1)
    host_grads = [
        jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), host)
        for _ in range(STEPS)
    ]
    single = jax.devices()[0]
    reference = {}
    runs = []
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
        shardings = _named(mesh, specs)
        explicit = axis_type == AxisType.Explicit
        for variant, options in VARIANTS.items():
            if explicit and variant != "centered_nesterov_decoupled":
                continue
            for storage in STORAGES:
                tx = rj.rmsprop(1e-2, moment_storage=storage, **options)
                if (variant, storage) not in reference:
                    on_one = jax.device_put(host, single)
                    grads = [jax.device_put(g, single) for g in host_grads]
                    reference[variant, storage] = _train(tx, on_one, grads)[1:]
                params = jax.device_put(host, shardings)
                abstract = jax.tree.map(
                    lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding),
                    params,
                )
                with _jax_compat.set_mesh(mesh) if explicit else contextlib.nullcontext():
                    grads = [jax.device_put(g, shardings) for g in host_grads]
                    initial, params, state = _train(tx, params, grads)
                    derived = rj.sharding.state_shardings(tx, abstract)
                record = {
                    "mesh": "explicit" if explicit else "auto",
                    "variant": variant,
                    "storage": storage,
                    "init": placement_report(initial, params, derived),
                    "final": placement_report(state, params, derived),
                }
                record.update(compare_runs((params, state), reference[variant, storage]))
                runs.append(record)
                print("checked", record["mesh"], variant, storage, flush=True)
    return {"runs": runs, "abstract": _abstract_inputs(), "packing": _packing(host_grads)}


def _packing(host_grads: list) -> dict:
    """`rj.pack_small_leaves` on both meshes against plain `rj.rmsprop` on one device."""
    host, specs = layout_params()
    inner = dict(centered=True, momentum=0.9, weight_decay=1e-2, decoupled_weight_decay=True)
    on_one = jax.device_put(host, jax.devices()[0])
    grads = [jax.device_put(g, jax.devices()[0]) for g in host_grads]
    reference = _train(rj.rmsprop(1e-2, **inner), on_one, grads)[1:]
    tx = rj.pack_small_leaves(rj.rmsprop(1e-2, **inner), max_size=2048)
    report = {}
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
        shardings = _named(mesh, specs)
        explicit = axis_type == AxisType.Explicit
        params = jax.device_put(host, shardings)
        with _jax_compat.set_mesh(mesh) if explicit else contextlib.nullcontext():
            grads = [jax.device_put(g, shardings) for g in host_grads]
            _, params, state = _train(tx, params, grads)
        nu = state[2].nu
        kept = jax.tree_util.tree_leaves_with_path(nu.leaves)
        big = {jax.tree_util.keystr(path): leaf for path, leaf in kept}
        big_params = {
            jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if jax.tree_util.keystr(path) in big
        }
        report["explicit" if explicit else "auto"] = {
            "unpacked": sorted(big),
            "packed_sizes": {name: int(v.size) for name, v in nu.packed.items()},
            "unpacked_state_placed_like_params": all(
                big[name].sharding.is_equivalent_to(big_params[name].sharding, big[name].ndim)
                for name in big
            ),
            "params": compare_runs((params, ()), (reference[0], ()))["params"],
        }
    return report


def _abstract_inputs() -> dict:
    """`state_shardings` from arrays, from ShapeDtypeStructs, from shapes plus shardings."""
    host, specs = layout_params()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    shardings = _named(mesh, specs)
    params = jax.device_put(host, shardings)
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), host)
    placed = jax.tree.map(
        lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), host, shardings
    )
    report = {}
    # The formats whose state leaves have shapes of their own; the others are like float32.
    for storage in ("int8", "factored"):
        tx = rj.rmsprop(1e-2, moment_storage=storage, centered=True, momentum=0.9)
        from_arrays = rj.sharding.state_shardings(tx, params)
        from_structs = rj.sharding.state_shardings(tx, placed)
        from_shapes = rj.sharding.state_shardings(tx, shapes, shardings)
        abstract_state = rj.sharding.abstract_state(tx, placed)
        evaluated = jax.eval_shape(tx.init, placed)
        state = jax.jit(tx.init, out_shardings=from_structs)(params)
        plain = jax.jit(tx.init)(params)
        report[storage] = {
            "inputs_agree": jax.tree.leaves(from_arrays) == jax.tree.leaves(from_structs)
            and jax.tree.leaves(from_structs) == jax.tree.leaves(from_shapes),
            "abstract_state_matches_eval_shape": [
                (a.shape, str(a.dtype)) for a in jax.tree.leaves(abstract_state)
            ]
            == [(a.shape, str(a.dtype)) for a in jax.tree.leaves(evaluated)],
            "abstract_state_shardings": jax.tree.leaves(
                jax.tree.map(lambda a: a.sharding, abstract_state)
            )
            == jax.tree.leaves(from_structs),
            "out_shardings_init": placement_report(state, params, from_structs),
            "out_shardings_init_equals_plain_jit": all(
                bool(np.array_equal(np.asarray(a), np.asarray(b)))
                for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(plain), strict=True)
            ),
        }
    report["int8"]["orbax_restore"] = _orbax_round_trip(params)
    for storage in STORAGES:
        tx = rj.rmsprop(1e-2, moment_storage=storage, centered=True, momentum=0.9)
        expected = rj.sharding.state_shardings(tx, params)
        report[storage] = report.get(storage, {})
        report[storage]["eager_init"] = placement_report(tx.init(params), params, expected)
    return report


def _orbax_round_trip(params: dict) -> dict:
    """Saves a sharded int8 state with orbax and restores it onto `abstract_state`."""
    import tempfile

    import orbax.checkpoint as ocp

    tx = rj.rmsprop(1e-2, moment_storage="int8", centered=True, momentum=0.9)
    state = jax.jit(tx.init)(params)
    state = jax.jit(lambda s, p: tx.update(p, s, p)[1])(state, params)
    with tempfile.TemporaryDirectory() as directory, ocp.CheckpointManager(directory) as manager:
        manager.save(1, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        target = rj.sharding.abstract_state(tx, params)
        restored = manager.restore(1, args=ocp.args.StandardRestore(target))
    pairs = list(zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True))
    return {
        "same_structure": jax.tree.structure(restored) == jax.tree.structure(state),
        "same_shardings": all(a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in pairs),
        "same_values": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs),
    }


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
    result = layouts() if OPTIONS.mode == "layouts" else train()
    with open(OPTIONS.out, "w") as f:
        json.dump(result, f)
