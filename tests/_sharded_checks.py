"""Layouts, measurements and a small sharded MLP for `_sharded_worker.py` (a child process).

Where a state leaf lives is measured here independently of `rmsprop_jax`: each leaf is
matched to its parameter by path, and for every device the slice of the leaf it holds is
compared with the slice of the parameter it holds, on the parameter axes the leaf keeps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

STORAGES = ("float32", "bfloat16", "int8", "factored")
# Between them, every variant: centered, momentum (heavy-ball and Nesterov), bias correction,
# coupled and decoupled weight decay.
VARIANTS: dict[str, dict[str, Any]] = {
    "centered_nesterov_decoupled": dict(
        centered=True, momentum=0.9, nesterov=True, weight_decay=1e-2, decoupled_weight_decay=True
    ),
    "bias_corrected_momentum_l2": dict(bias_correction=True, momentum=0.9, weight_decay=1e-2),
}
ALL = ("data", "model")
# FSDP: every parameter split over all 8 devices along its largest axis. Tensor parallel
# (Megatron): a column-parallel then a row-parallel layer over "model", replicated over "data",
# and one matrix split over both axes. Every per-device slice holds whole int8 blocks and a
# multiple of 16 elements along the last axis.
LAYOUTS = {
    "fsdp": {
        "w_in": ((64, 2048), P(None, ALL)),
        "b_in": ((2048,), P(ALL)),
        "w_out": ((2048, 128), P(ALL, None)),
        "b_out": ((128,), P(ALL)),
    },
    "tensor_parallel": {
        "w_col": ((128, 1024), P(None, "model")),
        "b_col": ((1024,), P("model")),
        "w_row": ((1024, 128), P("model", None)),
        "b_row": ((128,), P()),
        "w_2d": ((256, 512), P("data", "model")),
    },
}
_KINDS = ("codes", "scales", "row", "col")


def layout_params() -> tuple[dict, dict]:
    """(host parameters as float32 NumPy arrays, their PartitionSpecs)."""
    rng = np.random.default_rng(0)
    host = {
        layout: {
            name: rng.normal(size=shape).astype(np.float32) for name, (shape, _) in leaves.items()
        }
        for layout, leaves in LAYOUTS.items()
    }
    specs = {
        layout: {name: spec for name, (_, spec) in leaves.items()}
        for layout, leaves in LAYOUTS.items()
    }
    return host, specs


def _ranges(index: tuple, shape: tuple) -> tuple:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _device_ranges(array: jax.Array) -> dict:
    # Keyed by jaxlib's Device, which has no stubs (see pyproject.toml): Any to mypy.
    places: Mapping[Any, tuple] = array.sharding.devices_indices_map(array.shape)
    return {device.id: _ranges(index, array.shape) for device, index in places.items()}


def _expected_ranges(kind: str, param_ranges: tuple) -> tuple:
    """The slice of a (non-scale) state leaf that goes with a slice of its parameter."""
    if kind == "row":
        return param_ranges[:-1]
    if kind == "col":
        return param_ranges[:-2] + param_ranges[-1:]
    return param_ranges


def _whole_blocks(positions: tuple, block_length: int, blocks: int) -> tuple:
    """The int8 blocks that a slice of the last axis covers, or all when it splits a block."""
    start, stop = positions
    if start % block_length == 0 and stop % block_length == 0:
        return (start // block_length, stop // block_length)
    return (0, blocks)


def _param_of(path: tuple, params_by_path: dict, leaf: Any) -> tuple[Any, str]:
    """The parameter a state leaf belongs to, and which part of a compressed average it is.

    A compressed average holds one tree per part (`nu.codes["w"]`, `nu.row["w"]`, ...);
    its one-element placeholders belong to no parameter.
    """
    kind = "same"
    for index, key in enumerate(path):
        name = getattr(key, "name", None)
        if name in _KINDS or name == "dense":
            kind, path = ("same" if name == "dense" else name), path[:index] + path[index + 1 :]
            break
    for start in range(len(path)):
        if path[start:] in params_by_path:
            param = params_by_path[path[start:]]
            if np.shape(leaf) == (1,) and np.shape(param) != (1,):
                return None, kind
            return param, kind
    return None, kind


def placement_report(state: Any, params: Any, derived: Any) -> dict:
    """Where each leaf of `state` lives, against its parameter and against `derived`."""
    params_by_path = {tuple(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    devices = len(jax.devices())
    report: dict[str, Any] = {"leaves": 0, "misplaced": [], "disagrees_with_state_shardings": []}
    report.update({"replicated_but_kept_axis_sharded": [], "replicated_reduced_stats": []})
    report["scalars_replicated"] = True
    leaves = jax.tree_util.tree_leaves_with_path(state)
    for (path, leaf), want in zip(leaves, jax.tree.leaves(derived), strict=True):
        where = jax.tree_util.keystr(path)
        report["leaves"] += 1
        if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
            report["disagrees_with_state_shardings"].append(where)
        param, kind = _param_of(tuple(path), params_by_path, leaf)
        if param is None:
            replicated = leaf.sharding.is_fully_replicated
            report["scalars_replicated"] &= bool(
                replicated and len(leaf.sharding.device_set) == devices
            )
            continue
        param_ranges = _device_ranges(param)
        if kind == "scales":
            block_length = param.shape[-1] // leaf.shape[-1]
            expected = {
                d: (*r[:-1], _whole_blocks(r[-1], block_length, leaf.shape[-1]))
                for d, r in param_ranges.items()
            }
        else:
            expected = {d: _expected_ranges(kind, r) for d, r in param_ranges.items()}
        if _device_ranges(leaf) != expected:
            report["misplaced"].append(where)
        largest_shard = max(shard.data.size for shard in leaf.addressable_shards)
        if param.sharding.is_fully_replicated or largest_shard < leaf.size:
            continue
        kept_sharded = any(
            r != (0, n) for rs in expected.values() for r, n in zip(rs, leaf.shape, strict=True)
        )
        key = "replicated_but_kept_axis_sharded" if kept_sharded else "replicated_reduced_stats"
        report[key].append(where)
    return report


def _errors(run: Any, reference: Any) -> dict:
    """Largest |a - b| / (1 + |b|) over float leaves, elements beyond 1e-6, integer mismatches."""
    report = {"error": 0.0, "off": 0, "elements": 0, "code_mismatches": 0, "codes": 0}
    for a, b in zip(jax.tree.leaves(run), jax.tree.leaves(reference), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(a.dtype, np.integer):
            report["code_mismatches"] += int(np.sum(a != b))
            report["codes"] += a.size
            continue
        a, b = a.astype(np.float64), b.astype(np.float64)
        error = np.abs(a - b) / (1 + np.abs(b))
        report["error"] = max(report["error"], float(np.max(error, initial=0.0)))
        report["off"] += int(np.sum(error > 1e-6))
        report["elements"] += a.size
    return report


def compare_runs(run: tuple, reference: tuple) -> dict:
    """How far a (params, state) pair is from a reference pair, parameters and state apart."""
    params, state = (_errors(r, ref) for r, ref in zip(run, reference, strict=True))
    return {"params": params, "state": state}


def mlp_problem(
    samples: int = 256, features: int = 64, hidden: int = 128, classes: int = 10
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A fixed classification problem and initial MLP parameters, as NumPy arrays."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, features)).astype(np.float32)
    teacher = rng.normal(size=(features, classes))
    labels = np.argmax(x @ teacher, axis=1).astype(np.int32)
    params = {
        "w1": (rng.normal(size=(features, hidden)) / np.sqrt(features)).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "w2": (rng.normal(size=(hidden, classes)) / np.sqrt(hidden)).astype(np.float32),
        "b2": np.zeros(classes, np.float32),
    }
    return x, labels, params


def _fsdp_spec(shape: tuple, size: int) -> P:
    """Split the largest axis that the mesh size divides; replicate what cannot be split."""
    axes = sorted(range(len(shape)), key=lambda a: -shape[a])
    for axis in axes:
        if shape[axis] % size == 0:
            return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])
    return P()


def _on_host(x: jax.Array) -> np.ndarray:
    """The whole of `x`, gathered from the processes that hold its pieces."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _global(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def mlp_train(
    tx: optax.GradientTransformation, problem: tuple, mesh: jax.sharding.Mesh, steps: int = 8
) -> dict:
    """Trains the MLP with parameters, state and batch sharded over `mesh`'s "fsdp" axis."""
    x, labels, host_params = problem
    size = mesh.shape["fsdp"]
    shardings = {k: NamedSharding(mesh, _fsdp_spec(v.shape, size)) for k, v in host_params.items()}
    params = {k: _global(v, shardings[k]) for k, v in host_params.items()}
    x = _global(x, NamedSharding(mesh, P("fsdp", None)))
    labels = _global(labels, NamedSharding(mesh, P("fsdp")))

    def loss_fn(params, x, labels):
        hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
        logits = hidden @ params["w2"] + params["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, state, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    eager = tx.init(params)
    eager_follows = bool(
        eager[2].nu["w1"].sharding.is_equivalent_to(params["w1"].sharding, 2)
        and eager[2].count.sharding.is_fully_replicated
        and len(eager[2].count.sharding.device_set) == mesh.size
    )
    state = jax.jit(tx.init)(params)
    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state, x, labels)
        # Replicated: every process holds the whole loss.
        losses.append(float(loss.addressable_data(0)))
    nu = state[2].nu["w1"]
    return {
        "losses": losses,
        "params": {k: _on_host(v).tolist() for k, v in params.items()},
        "nu_w1_spec": str(nu.sharding.spec),
        "nu_w1_same_sharding_as_w1": bool(nu.sharding.is_equivalent_to(params["w1"].sharding, 2)),
        "nu_w1_local_shards": [list(s.data.shape) for s in nu.addressable_shards],
        "nu_w1_shape": list(nu.shape),
        "count_fully_replicated": bool(state[2].count.sharding.is_fully_replicated),
        "eager_init_follows_params": eager_follows,
    }
