"""Where optimizer state lives: on the devices, and in the layout, of its parameter.

A state leaf follows one parameter (`nu`, `mu` and momentum buffers: the same shape); the
parts of a compressed average (int8 block scales, factored row and column statistics) have
shapes of their own, and their format says where they live (`tie`, `part_shardings`).

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
  :func:`follow_params` ties each state leaf to its parameter (a zero computed from the
  parameter, or from a slice of it shaped like the part), and sharding propagation places it
  like the parameter. `update` needs nothing of the kind: the new state is computed from the
  old state and the gradients, and is placed like them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rmsprop_jax import _sharded_ops, _wrappers, storage

# (stored leaf as a tuple of arrays, its format or None for a plain array, the parameter)
# -> the same tuple, transformed.
Placer = Callable[[tuple, Any, Any], tuple]


def is_stored_leaf(x: Any) -> bool:
    """A node of the state that placement handles whole: None, or a compressed container."""
    return x is None or storage.is_container(x)


def _param_lookup(params: Any) -> dict[tuple, Any]:
    return {tuple(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _find_param(path: tuple, shape: tuple, by_path: dict[tuple, Any]) -> Any:
    """The parameter whose path is the longest suffix of `path`, if its shape is `shape`."""
    for start in range(len(path) + 1):
        candidate = by_path.get(tuple(path[start:]))
        if candidate is not None and tuple(np.shape(candidate)) == shape:
            return candidate
    return None


def map_stored(state: Any, params: Any, place: Placer) -> Any:
    """`state` with every stored leaf that belongs to a parameter replaced by `place(...)`.

    A plain array belongs to the parameter whose path is the longest suffix of its own and
    whose shape is its shape (`state[2].nu["dense"]["w"]` to `params["dense"]["w"]`); the
    leaves of a compressed container belong to the parameter at the path within the
    container's trees. Leaves that belong to no parameter (step counts) go to
    `place(leaf, None, None)`.
    """
    by_path = _param_lookup(params)

    def visit(path: tuple, node: Any) -> Any:
        if node is None:
            return None
        fmt = storage.format_of(node)
        if fmt is None:
            param = _find_param(path, tuple(np.shape(node)), by_path)
            return place((node,), None, param)[0]
        treedef, leaf_paths = fmt.leaf_paths(node)
        placed = []
        for leaf_path, stored_leaf in zip(leaf_paths, fmt.split(node, treedef), strict=True):
            param = _find_param(leaf_path, fmt.leaf_logical_shape(stored_leaf), by_path)
            placed.append(place(stored_leaf, fmt, param))
        return fmt.join(placed, treedef)

    return jax.tree_util.tree_map_with_path(visit, state, is_leaf=is_stored_leaf)


def replicated_sharding(params: Any) -> NamedSharding | None:
    """Replicated on the mesh of the first parameter placed with a `NamedSharding`."""
    for param in jax.tree.leaves(params):
        sharding = getattr(param, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    return None


def _replicate_scalar(leaf: Any, replicated: NamedSharding) -> Any:
    # Step counts, and the one-element placeholders of compressed averages.
    if not isinstance(leaf, jax.Array) or leaf.size != 1 or not leaf.is_fully_addressable:
        return leaf
    if leaf.sharding.is_equivalent_to(replicated, 0):
        return leaf
    # From the host: every process holds the same fresh scalar, and may pass it to a mesh
    # that spans other processes' devices.
    return jax.device_put(np.asarray(leaf), replicated)


def _tie(stored_leaf: tuple, fmt: Any, param: Any) -> tuple:
    if param is None or not _sharded_ops.is_auto_traced(param):
        return stored_leaf
    if fmt is None:
        return (_sharded_ops.plus_zero_from(param, stored_leaf[0]),)
    return fmt.leaf_tie(stored_leaf, param)


def follow_params(state: Any, params: Any) -> Any:
    """`state` with each leaf placed like its parameter, and scalars replicated.

    Traced with automatic sharding, each leaf is tied to its parameter; the compiler
    replicates the scalars. Eagerly, leaves built with `full_like` are placed already, and
    scalars (step counts) are put on all devices of the parameters' mesh, as `jax.jit` would
    put them. With explicit sharding, the types place everything.
    """
    leaves = jax.tree.leaves(params)
    if any(_sharded_ops.is_auto_traced(p) for p in leaves):
        return map_stored(state, params, _tie)
    concrete = [p for p in leaves if isinstance(p, jax.Array)]
    replicated = replicated_sharding(concrete)
    if replicated is None or any(isinstance(p, jax.core.Tracer) for p in leaves):
        return state
    return jax.tree.map(lambda leaf: _replicate_scalar(leaf, replicated), state)


def placed(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`inner` whose new state is placed like the parameters (once per optimizer)."""
    return _wrappers.map_transformation(inner, after_init=follow_params, once="placement")
