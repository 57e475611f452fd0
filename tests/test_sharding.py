"""Optimizer state sharded like its parameters, on 8 simulated CPU devices.

What runs: a (2, 4) mesh ("data", "model"); an FSDP layout (every parameter split
over all 8 devices along its largest axis) and a tensor-parallel one (Megatron column- and
row-parallel layers over "model", one matrix over both axes, one replicated bias); every
storage format; two variants that between them cover centered, heavy-ball and Nesterov
momentum, bias correction, coupled and decoupled weight decay; automatic sharding
(`Mesh(..., Auto)`) and explicit sharding (`jax.set_mesh` with Explicit axes); `init` and
10 `update` steps under `jax.jit` with no `out_shardings`, against the same on one device.
(One test, so that the minute of compilations runs once.)
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import jax
import numpy as np
import optax
import pytest
from _sharded_checks import STORAGES, VARIANTS, compare_runs, layout_params, placement_report
from conftest import needs_simulated_devices
from helpers import needs_jax_0_10_placement
from jax.sharding import AxisType, NamedSharding

import rmsprop_jax as rj
from rmsprop_jax import _jax_compat

STEPS = 10
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
    inner: dict[str, Any] = dict(
        centered=True, momentum=0.9, weight_decay=1e-2, decoupled_weight_decay=True
    )
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


def _check_placement(label: str, placement: dict, storage: str) -> None:
    assert placement["leaves"] >= 19, (label, placement["leaves"])
    assert placement["misplaced"] == [], f"{label}: leaves not on their parameter's devices"
    assert placement["disagrees_with_state_shardings"] == [], f"{label}: state_shardings is off"
    assert placement["replicated_but_kept_axis_sharded"] == [], f"{label}: replicated leaves"
    reduced = FACTORED_REDUCED_OVER_SPLIT_AXIS if storage == "factored" else set()
    # The second moment is `nu`, or `variance` for centered compressed states.
    replicated = {p.replace(".variance.", ".nu.") for p in placement["replicated_reduced_stats"]}
    assert replicated == reduced, label
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
@needs_simulated_devices
@needs_jax_0_10_placement
def test_state_lives_with_its_parameter_and_matches_the_single_device_run():
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
    report = layouts()
    runs = report["runs"]
    configurations = {(r["mesh"], r["variant"], r["storage"]) for r in runs}
    assert len(configurations) == len(runs) == 12
    assert {r["storage"] for r in runs if r["mesh"] == "explicit"} == set(STORAGES)
    for run in runs:
        label = f"{run['mesh']} mesh, {run['variant']}, {run['storage']}"
        _check_placement(f"{label}, after init", run["init"], run["storage"])
        _check_placement(f"{label}, after 10 steps", run["final"], run["storage"])
        _check_results(f"{label}, parameters", run["params"], run["storage"])
        _check_results(f"{label}, state", run["state"], run["storage"])

    abstract = report["abstract"]
    assert set(abstract) == set(STORAGES)
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


@pytest.mark.parametrize("function", [rj.sharding.state_shardings, rj.sharding.abstract_state])
def test_a_factory_instead_of_a_transformation_is_named(function):
    # `rj.rmsprop` itself (not called) failed inside jax.eval_shape with an AttributeError.
    params = {"w": jax.ShapeDtypeStruct((4, 2), np.float32)}
    for tx in (rj.rmsprop, 1e-3):
        with pytest.raises(TypeError, match=r"`tx` must be an optax.GradientTransformation, got"):
            function(tx, params)
    # Arguments swapped: the parameters are named by their type, not printed array by array.
    with pytest.raises(TypeError, match=r"GradientTransformation, got a dict; pass a built"):
        function({"w": np.ones((64, 64), np.float32)}, rj.rmsprop(1e-3))


def _one_mesh_axis() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), ("d",), axis_types=(AxisType.Auto,))


@needs_simulated_devices
@pytest.mark.parametrize("storage", STORAGES)
def test_one_sharding_serves_every_parameter(storage):
    # As jax.jit's out_shardings and jax.device_put take one sharding for a whole tree; a lone
    # sharding was refused for not having the structure of `params`.
    mesh = _one_mesh_axis()
    params = {
        "w": jax.ShapeDtypeStruct((64, 512), np.float32),
        "b": jax.ShapeDtypeStruct((512,), np.float32),
    }
    tx = rj.rmsprop(1e-2, moment_storage=storage, centered=True, momentum=0.9)
    for spec in (jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec("d")):
        one = NamedSharding(mesh, spec)
        tree = {"w": one, "b": one}
        assert rj.sharding.state_shardings(tx, params, one) == rj.sharding.state_shardings(
            tx, params, tree
        )
        assert jax.tree.leaves(rj.sharding.abstract_state(tx, params, one)) == jax.tree.leaves(
            rj.sharding.abstract_state(tx, params, tree)
        )


@needs_simulated_devices
@pytest.mark.parametrize("function", [rj.sharding.state_shardings, rj.sharding.abstract_state])
@pytest.mark.parametrize(
    ("shape", "spec", "reason"),
    [
        # Accepted before; JAX refused the state only when jax.jit placed it.
        ((6, 512), ("d",), "implies that array axis 0 is partitioned 8 times"),
        # Refused before by JAX, naming no parameter.
        ((512,), (None, "d"), "rank at least 2"),
        ((), ("d",), "rank at least 1"),
    ],
)
def test_a_sharding_that_cannot_split_its_parameter_is_refused_naming_it(
    function, shape, spec, reason
):
    sharding = NamedSharding(_one_mesh_axis(), jax.sharding.PartitionSpec(*spec))
    params = {
        "ok": jax.ShapeDtypeStruct((8, 16), np.float32),
        "w": jax.ShapeDtypeStruct(shape, np.float32),
    }
    shardings = {
        "ok": NamedSharding(_one_mesh_axis(), jax.sharding.PartitionSpec("d")),
        "w": sharding,
    }
    expected = rf"params\['w'\] \(shape {re.escape(str(shape))}\) cannot take the sharding given"
    with pytest.raises(ValueError, match=expected + rf"(.|\n)*{reason}"):
        function(rj.rmsprop(1e-2, moment_storage="int8"), params, shardings)
