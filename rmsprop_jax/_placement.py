"""Where optimizer state lives: on the devices, and in the layout, of its parameter.

A state leaf follows one parameter (`nu`, `mu` and momentum buffers: the same shape; int8
codes: the same shape; int8 block scales and factored row / column statistics: the
parameter's shape with its last axis, respectively one of its last two axes, reduced).

Three ways of running need three mechanisms:

- Eagerly, `jnp.full_like(param, ...)` takes the concrete parameter's sharding, and the
  reductions computing scales or statistics follow it.
- Under `jax.jit` with explicit sharding (`jax.sharding.AxisType.Explicit`, the default axis
  type of `jax.make_mesh`), the sharding is part of each traced value's type; `full_like`
  follows it, and reshapes of a sharded axis must be told the result's sharding
  (see :mod:`rmsprop_jax._sharded_ops`).
- Under `jax.jit` with automatic sharding, a traced parameter carries no sharding, and state
  built from constants (zeros, the initial scale) does not depend on the parameter's values:
  the compiler would place it as it sees fit, in practice all on one device. So
  :func:`follow_params` adds to each state leaf a zero computed from its parameter (or, for
  a reduced leaf, from a slice of the parameter of the leaf's shape), and sharding
  propagation places the sum like the parameter. `update` needs nothing of the kind: the
  new state is computed from the old state and the gradients, and is placed like them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rmsprop_jax import _sharded_ops, _storage_int8
from rmsprop_jax._storage_factored import FactoredMoment
from rmsprop_jax._storage_int8 import QuantizedArray


def is_stored_leaf(x: Any) -> bool:
    """A state leaf as the optimizer stores it: an array, or a compressed array."""
    return x is None or isinstance(x, QuantizedArray | FactoredMoment)


def logical_shape(stored: Any) -> tuple[int, ...]:
    """The shape of the parameter-sized array a stored leaf stands for."""
    if isinstance(stored, QuantizedArray):
        return tuple(stored.codes.shape)
    if isinstance(stored, FactoredMoment):
        return (*stored.row.shape, stored.col.shape[-1])
    return tuple(np.shape(stored))


def matched_leaves(state: Any, params: Any) -> Iterator[tuple[Any, Any, Any]]:
    """Yields (path, stored leaf, parameter or None) for every stored leaf of `state`.

    A stored leaf belongs to the parameter whose path is the longest suffix of the leaf's
    path and whose shape is the leaf's (logical) shape: `state[2].nu["dense"]["w"]` belongs to
    `params["dense"]["w"]`. Leaves matching no parameter (step counts) come with None.
    """
    by_path = {tuple(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    for path, stored in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_stored_leaf):
        if stored is None:
            continue
        shape = logical_shape(stored)
        param = None
        for start in range(len(path) + 1):
            candidate = by_path.get(tuple(path[start:]))
            if candidate is not None and tuple(np.shape(candidate)) == shape:
                param = candidate
                break
        yield path, stored, param


def _block_anchor(param: jax.Array) -> jax.Array:
    """A slice of `param` shaped like its int8 block scales: each block's first element."""
    blocks, block_length = _storage_int8.block_layout(param.shape[-1])
    return _sharded_ops.split_last_axis(param, blocks, block_length)[..., 0]


def _follow(stored: Any, param: Any) -> Any:
    if isinstance(stored, QuantizedArray):
        return QuantizedArray(
            codes=_sharded_ops.plus_zero_from(param, stored.codes),
            scales=_sharded_ops.plus_zero_from(_block_anchor(param), stored.scales),
        )
    if isinstance(stored, FactoredMoment):
        return FactoredMoment(
            row=_sharded_ops.plus_zero_from(param[..., 0], stored.row),
            col=_sharded_ops.plus_zero_from(param[..., 0, :], stored.col),
        )
    return _sharded_ops.plus_zero_from(param, stored)


def _replicated_on_mesh(params: Any) -> NamedSharding | None:
    """Replicated on the mesh of the first concrete parameter placed with a NamedSharding."""
    for param in jax.tree.leaves(params):
        sharding = getattr(param, "sharding", None)
        if isinstance(param, jax.Array) and isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    return None


def _replicate_scalar(leaf: Any, replicated: NamedSharding) -> Any:
    if not isinstance(leaf, jax.Array) or leaf.ndim or not leaf.is_fully_addressable:
        return leaf
    if leaf.sharding.is_equivalent_to(replicated, 0):
        return leaf
    # From the host: every process holds the same fresh scalar, and may pass it to a mesh
    # that spans other processes' devices.
    return jax.device_put(np.asarray(leaf), replicated)


def follow_params(state: Any, params: Any) -> Any:
    """`state` with each leaf placed like its parameter, and scalars replicated.

    Traced with automatic sharding, each leaf is tied to its parameter; the compiler
    replicates the scalars. Eagerly, leaves built with `full_like` are placed already, and
    scalars (step counts) are put on all devices of the parameters' mesh, as `jax.jit` would
    put them. With explicit sharding, the types place everything.
    """
    leaves = jax.tree.leaves(params)
    if not any(_sharded_ops.is_auto_traced(p) for p in leaves):
        replicated = _replicated_on_mesh(params)
        if replicated is None or any(isinstance(p, jax.core.Tracer) for p in leaves):
            return state
        return jax.tree.map(lambda leaf: _replicate_scalar(leaf, replicated), state)
    placed = {}
    for path, stored, param in matched_leaves(state, params):
        if param is not None and _sharded_ops.is_auto_traced(param):
            placed[tuple(path)] = _follow(stored, param)
    return jax.tree_util.tree_map_with_path(
        lambda path, stored: placed.get(tuple(path), stored), state, is_leaf=is_stored_leaf
    )
