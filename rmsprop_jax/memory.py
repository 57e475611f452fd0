"""How much memory an optimizer state takes, in total and per parameter."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from rmsprop_jax import _validation, grouping, storage, transform

# The states that keep a moment tree shaped like the parameters, and the field that holds it.
_MOMENT_FIELDS = {
    transform.ScaleByRmsState: "nu",
    transform.ScaleByCenteredRmsState: "nu",
    transform.ScaleByCenteredVarianceState: "variance",
}


class StateMemory(NamedTuple):
    """Bytes held by an optimizer state, as :func:`state_bytes` counts them.

    Examples:
      >>> params = {"w": jnp.ones(1000)}
      >>> rj.state_bytes(rj.rmsprop(1e-3).init(params), params)
      StateMemory(total_bytes=4004, bytes_per_parameter=4.004)
    """

    total_bytes: int  # every array in the state, step counters and block scales included.
    bytes_per_parameter: float  # total_bytes / the number of parameter elements.


def _is_number(leaf: Any) -> bool:
    """A Python or NumPy scalar: a static hyperparameter in a state, one element in params."""
    return isinstance(leaf, bool | int | float | complex | np.generic)


def _array_bytes(leaf: Any, *, what: str) -> int:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        if _is_number(leaf):
            return 0
        raise TypeError(
            f"`{what}` has a leaf of type {type(leaf).__name__}, which is not an array."
        )
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
        itemsize = math.prod(data.shape) * np.dtype(data.dtype).itemsize
    else:
        itemsize = np.dtype(dtype).itemsize
    return math.prod(shape) * itemsize


def state_bytes(state: Any, params: Any) -> StateMemory:
    """Counts the bytes of `state` and divides them by the number of elements of `params`.

    Leaves may be arrays or `jax.ShapeDtypeStruct` leaves, so the figure for a model too large to
    allocate comes from `jax.eval_shape(optimizer.init, abstract_params)`. Python numbers in
    the state (static hyperparameters) take no device memory and count as 0.

    Args:
      state: an optimizer state, for example `rj.rmsprop(1e-3, moment_storage="int8").init(params)`.
      params: the parameters (or their shapes) the state was built for. The moments the
        state keeps must be shaped like leaves of `params`, in the order of its leaves
        (`params` may hold more leaves: those a masked or partitioned optimizer keeps no
        state for).

    Raises:
      ValueError: where a moment in `state` matches no leaf of `params` in that order (the
        state was made for other parameters).
      TypeError: `state` or `params` is an optimizer rather than a state or parameters,
        `params` holds an optimizer state (the arguments swapped), or a leaf of `params` is
        not an array, a `jax.ShapeDtypeStruct` or a number (a string such as "int8": every
        parameter counted as one element, the figure was meaningless).

    Returns:
      A :class:`StateMemory` with the total bytes and the bytes per parameter element.

    Examples:
      >>> params = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
      >>> state = jax.eval_shape(rj.rmsprop(1e-3, moment_storage="int8").init, params)
      >>> round(rj.state_bytes(state, params).bytes_per_parameter, 4)
      1.0156
    """
    _check_arguments(state, params)
    _check_made_for(state, params)
    total = sum(_array_bytes(leaf, what="state") for leaf in jax.tree.leaves(state))
    parameters = sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params))
    if parameters == 0:
        raise ValueError("`params` has no elements, so bytes per parameter is undefined.")
    return StateMemory(total_bytes=int(total), bytes_per_parameter=total / parameters)


def _is_state(node: Any) -> bool:
    """Whether `node` is a state of an optax or rmsprop_jax transformation (a NamedTuple)."""
    kind = type(node)
    return (
        isinstance(node, tuple)
        and hasattr(node, "_fields")
        and kind.__name__.endswith("State")
        and kind.__module__.split(".")[0] in ("optax", "rmsprop_jax")
    )


def _check_arguments(state: Any, params: Any) -> None:
    """Raises `TypeError` for an optimizer in place of the state or the parameters, and for a
    leaf of `params` that has no shape (it would count as one element)."""
    usage = (
        "pass the state an optimizer made and its parameters: "
        "rj.state_bytes(tx.init(params), params)"
    )
    for name, value in (("state", state), ("params", params)):
        if isinstance(value, optax.GradientTransformation):
            raise TypeError(f"`{name}` is an optimizer (an optax.GradientTransformation): {usage}.")
    nodes = jax.tree.leaves(params, is_leaf=_is_state)
    states = list(dict.fromkeys(type(node).__name__ for node in nodes if _is_state(node)))
    if states:
        raise TypeError(
            f"`params` holds an optimizer state ({', '.join(states)}), so the two arguments are "
            f"swapped or `params` is a state: {usage}."
        )
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        has_shape = hasattr(leaf, "shape") and hasattr(leaf, "dtype")
        if not (has_shape or _is_number(leaf)):
            raise TypeError(
                f"`params` has a leaf of type {type(leaf).__name__} "
                f"({_validation.shown(leaf, 40)}) at {jax.tree_util.keystr(path) or '<root>'}, "
                f"which is not an array, a jax.ShapeDtypeStruct or a number: {usage}."
            )


def _moment_shapes(stored: Any) -> list[tuple[Any, tuple[int, ...]]]:
    """(path, parameter shape) for each leaf that the stored moment `stored` keeps."""
    layout = grouping._state_layout(stored)  # a packed moment: the parameters' layout
    if layout is not None:
        slots = jax.tree_util.tree_flatten_with_path(
            layout, is_leaf=lambda x: isinstance(x, grouping.LeafSlot)
        )[0]
        return [(path, tuple(slot.shape)) for path, slot in slots]
    fmt = storage.format_of(stored)
    logical = stored if fmt is None else storage.logical_shapes(fmt, stored)
    return [
        (path, np.shape(leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(logical)[0]
    ]


def _moment_shapes_for(leaf: Any) -> tuple[tuple[int, ...], ...]:
    """The shapes a moment for the parameter `leaf` may have: its own, and for a complex
    parameter also its real view's (..., 2), which the PyTorch presets keep."""
    shape = tuple(np.shape(leaf))
    dtype = getattr(leaf, "dtype", None)
    if jax.dtypes.issubdtype(np.result_type(leaf) if dtype is None else dtype, np.complexfloating):
        return shape, (*shape, 2)
    return (shape,)


def _check_made_for(state: Any, params: Any) -> None:
    """Raises `ValueError` unless the moments kept in `state` are for leaves of `params`.

    Matched in order, by shape, so that wrappers that change paths but not the order of leaves
    (Flax NNX variables against a pure state) do not matter: the moments of each moment state,
    flattened, must be shaped as a subsequence of the leaves of `params` (a masked or
    partitioned optimizer keeps moments for some leaves only).
    """
    param_leaves = jax.tree.leaves(params)
    kinds = tuple(_MOMENT_FIELDS)
    for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds)):
        if not isinstance(node, kinds):
            continue
        remaining = iter(param_leaves)
        for path, shape in _moment_shapes(getattr(node, _MOMENT_FIELDS[type(node)])):
            if not any(shape in _moment_shapes_for(leaf) for leaf in remaining):
                shapes = _validation.listed([str(np.shape(leaf)) for leaf in param_leaves], 8)
                raise ValueError(
                    f"The state keeps a moment of shape {shape} at "
                    f"{jax.tree_util.keystr(path) or '<root>'} that no leaf of `params` matches "
                    f"in order (its leaves have shapes {shapes}): pass the parameters the "
                    "state was made for."
                )
