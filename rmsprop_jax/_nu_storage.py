r"""Compressed storage of RMSprop's moving averages: which leaves are compressed, and how.

Every format offers the same three operations on one leaf, dispatched on the type of what is
stored, so the state needs no Python objects:

- `init(leaf, value)`: the stored form of an array shaped like `leaf` filled with `value`;
- `update(stored, x, decay, seed) -> (stored', estimate)`: the moving average
  `decay * stored + (1 - decay) * x`, stored again, and its float32 (or wider) value, which this
  step uses before any rounding;
- `decode(stored, dtype)`: the stored average as an array.

| format       | second moment `nu`                    | first moment `mu` (centered)   |
|--------------|---------------------------------------|--------------------------------|
| `"bfloat16"` | bfloat16, stochastic rounding         | the same                       |
| `"int8"`     | `QuantizedArray`, logarithmic codes   | `QuantizedArray`, signed codes |
| `"factored"` | `FactoredMoment` (row, column means)  | bfloat16, stochastic rounding  |

Leaves a format does not compress (under 4096 elements for int8; not a matrix with two axes of
at least 128 for factored; complex `mu`, for which no bfloat16 exists) stay in the compute dtype.

Centered RMSprop divides by the root of the variance :math:`\nu - \mu^2`. When both are stored
with rounding errors of a fraction of a percent, that difference loses every significant digit
once the variance falls below about 1% of :math:`\nu`, and a clamp to 0 turns it into a step of
:math:`g/\epsilon`. So, in these formats, the `nu` field of a centered state holds the variance
itself, updated with the identity (exact, free of cancellation)

.. math::

    \nu_t - \mu_t^2
    = \beta (\nu_{t-1} - \mu_{t-1}^2) + (1-\beta)\,\beta\,|g_t - \mu_{t-1}|^2,

which is a moving average of the non-negative :math:`\beta |g_t - \mu_{t-1}|^2`: every format
stores it with a bounded relative error, and factoring it is as meaningful as factoring
:math:`g^2`. (With `"float32"` the state keeps :math:`\nu` itself, as every framework does.)
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import (
    _placement,
    _precision,
    _rounding_noise,
    _storage_bf16,
    _storage_factored,
    _storage_int8,
)
from rmsprop_jax._storage_factored import FactoredMoment
from rmsprop_jax._storage_int8 import QuantizedArray

# The stochastic rounding bits derive from the step count, the leaf's position and the stream.
_SECOND_MOMENT_STREAM, _FIRST_MOMENT_STREAM = 0, 1


def _abs_sq(x: chex.Array) -> chex.Array:
    return jnp.real(x * jnp.conj(x)) if jnp.iscomplexobj(x) else x**2


def _init_leaf(nu_storage: str, leaf: chex.Array, value: Any, *, first_moment: bool) -> Any:
    dtype = leaf.dtype if first_moment else _precision.real_dtype(leaf.dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.full_like(leaf, value, dtype=dtype)
    if nu_storage == "bfloat16" or (nu_storage == "factored" and first_moment):
        return _storage_bf16.init(leaf, value)
    if nu_storage == "int8" and _storage_int8.compresses(leaf):
        return _storage_int8.init(leaf, value, signed=first_moment)
    if nu_storage == "factored" and not first_moment and _storage_factored.compresses(leaf):
        return _storage_factored.init(leaf, value, dtype)
    return jnp.full_like(leaf, value, dtype=dtype)


def _decode_leaf(stored: Any, dtype: Any) -> chex.Array:
    if isinstance(stored, QuantizedArray):
        return _storage_int8.decode(stored, dtype)
    if isinstance(stored, FactoredMoment):
        return _storage_factored.decode(stored, dtype)
    return stored.astype(dtype)


def _update_leaf(stored: Any, x: chex.Array, decay: Any, seed: chex.Array) -> tuple[Any, Any]:
    if isinstance(stored, QuantizedArray):
        return _storage_int8.update(stored, x, decay, seed)
    if isinstance(stored, FactoredMoment):
        return _storage_factored.update(stored, x, decay, seed)
    if stored.dtype == jnp.bfloat16:
        return _storage_bf16.update(stored, x, decay, seed)
    average = (1 - decay) * x + decay * stored
    return average, average


def init(nu_storage: str, params: Any, initial_scale: Any, centered: bool) -> tuple[Any, Any]:
    """The stored (mu, nu) for `params`; mu is None unless `centered`.

    For centered, `nu` starts at the variance `initial_scale - 0**2`.
    """
    nu = jax.tree.map(
        lambda p: _init_leaf(nu_storage, p, initial_scale, first_moment=False), params
    )
    if not centered:
        return None, nu
    mu = jax.tree.map(lambda p: _init_leaf(nu_storage, p, 0.0, first_moment=True), params)
    return mu, nu


def update(
    updates: optax.Updates, mu: Any, nu: Any, decay: Any, count: chex.Array
) -> tuple[Any, Any, optax.Updates]:
    """Folds the gradients into the stored averages.

    Returns the new stored (mu, nu) and, per leaf, the float estimate the step divides by:
    the second moment, or the variance when `mu` is not None (centered).
    """
    grads, treedef = jax.tree.flatten(updates, is_leaf=lambda x: x is None)
    nus = treedef.flatten_up_to(nu)
    mus = [None] * len(grads) if mu is None else treedef.flatten_up_to(mu)
    new_mus, new_nus, estimates = [], [], []  # type: list[Any], list[Any], list[Any]
    for index, (g, stored_nu, stored_mu) in enumerate(zip(grads, nus, mus, strict=True)):
        if g is None:
            new_mus.append(None)
            new_nus.append(None)
            estimates.append(None)
            continue
        nu_seed = _rounding_noise.seed(count, index, _SECOND_MOMENT_STREAM)
        if mu is None:
            stored_nu, estimate = _update_leaf(stored_nu, _abs_sq(g), decay, nu_seed)
        else:
            previous_mu = _decode_leaf(stored_mu, g.dtype)
            mu_seed = _rounding_noise.seed(count, index, _FIRST_MOMENT_STREAM)
            stored_mu, _ = _update_leaf(stored_mu, g, decay, mu_seed)
            spread = decay * _abs_sq(g - previous_mu)
            stored_nu, estimate = _update_leaf(stored_nu, spread, decay, nu_seed)
        new_mus.append(stored_mu)
        new_nus.append(stored_nu)
        estimates.append(estimate)
    new_mu = None if mu is None else treedef.unflatten(new_mus)
    return new_mu, treedef.unflatten(new_nus), treedef.unflatten(estimates)


def logical_shapes(nu: Any) -> Any:
    """`nu` with each stored leaf replaced by a `jax.ShapeDtypeStruct` of the array it encodes."""

    def shape_of(stored: Any) -> Any:
        if isinstance(stored, QuantizedArray | FactoredMoment):
            return jax.ShapeDtypeStruct(_placement.logical_shape(stored), jnp.float32)
        return stored

    return jax.tree.map(shape_of, nu, is_leaf=_placement.is_stored_leaf)


def decode(nu: Any, dtype: Any = jnp.float32) -> Any:
    """The arrays a stored tree stands for (`nu`, or `mu`), in `dtype`."""
    return jax.tree.map(
        lambda s: None if s is None else _decode_leaf(s, dtype),
        nu,
        is_leaf=_placement.is_stored_leaf,
    )
