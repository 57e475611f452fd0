"""How much memory an optimizer state takes, in total and per parameter."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np


class StateMemory(NamedTuple):
    """Bytes held by an optimizer state, as :func:`state_bytes` counts them.

    Examples:
      >>> params = {"w": jnp.ones(1000)}
      >>> rj.state_bytes(rj.rmsprop(1e-3).init(params), params)
      StateMemory(total_bytes=4004, bytes_per_parameter=4.004)
    """

    total_bytes: int  # every array in the state, step counters and block scales included.
    bytes_per_parameter: float  # total_bytes / the number of parameter elements.


def _array_bytes(leaf: Any, *, what: str) -> int:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        if isinstance(leaf, bool | int | float | complex):
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
      params: the parameters (or their shapes) the state was built for.

    Returns:
      A :class:`StateMemory` with the total bytes and the bytes per parameter element.

    Examples:
      >>> params = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
      >>> state = jax.eval_shape(rj.rmsprop(1e-3, moment_storage="int8").init, params)
      >>> round(rj.state_bytes(state, params).bytes_per_parameter, 4)
      1.0156
    """
    total = sum(_array_bytes(leaf, what="state") for leaf in jax.tree.leaves(state))
    parameters = sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params))
    if parameters == 0:
        raise ValueError("`params` has no elements, so bytes per parameter is undefined.")
    return StateMemory(total_bytes=int(total), bytes_per_parameter=total / parameters)
