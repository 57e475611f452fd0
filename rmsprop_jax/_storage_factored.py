r"""Factored storage of a non-negative moving average: row and column means (Adafactor).

For a leaf of shape (..., R, C) whose last two axes both have at least 128 entries, only the
moving averages of the row means and the column means of :math:`x` (:math:`g^2` for RMSprop)
are kept, :math:`R + C` numbers per matrix instead of :math:`RC`, and the full average is
rebuilt as their normalized outer product,

.. math::

    r_t = \beta r_{t-1} + (1 - \beta)\, \overline{x_t}^{\,\mathrm{cols}}, \quad
    c_t = \beta c_{t-1} + (1 - \beta)\, \overline{x_t}^{\,\mathrm{rows}}, \quad
    \hat\nu_t = r_t c_t^\top / \overline{r_t},

the rank-one matrix that minimizes the generalized Kullback-Leibler divergence to the full
average given its row and column sums (Shazeer and Stern 2018). Because the rebuild is linear
in :math:`r_t` and in :math:`c_t`, bias correction can be applied to :math:`\hat\nu_t` as if it
were the full average. Where every row mean is 0 (nothing seen yet, `initial_scale=0`) the
estimate is 0, and a zero gradient then gives a zero step. Other leaves are stored as they are.

References:
  Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
  <https://arxiv.org/abs/1804.04235>`_, 2018.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax.numpy as jnp

from rmsprop_jax import _sharded_ops

MIN_DIM_SIZE = 128


class FactoredMoment(NamedTuple):
    """Moving averages of the row and column means of a non-negative matrix-shaped quantity."""

    row: chex.Array  # shape (..., R): averages over the last axis.
    col: chex.Array  # shape (..., C): averages over the second-to-last axis.


def compresses(leaf: chex.Array) -> bool:
    shape = jnp.shape(leaf)
    return len(shape) >= 2 and min(shape[-2:]) >= MIN_DIM_SIZE


def init(leaf: chex.Array, value: Any, dtype: Any) -> FactoredMoment:
    """Row and column averages of the constant `value` (sharded along `leaf`'s axes)."""
    full = jnp.full_like(leaf, value, dtype=dtype)
    # Slices, not means: exact, and XLA would spend seconds folding a reduction over a large
    # constant when `init` is jitted.
    return FactoredMoment(
        row=_sharded_ops.first_along(full, -1), col=_sharded_ops.first_along(full, -2)
    )


def decode(stored: FactoredMoment, dtype: Any) -> chex.Array:
    r"""The rank-one estimate :math:`r c^\top / \overline{r}` of the full average."""
    row, col = stored.row.astype(dtype), stored.col.astype(dtype)
    row_mean = jnp.mean(row, axis=-1, keepdims=True)
    normalized = jnp.where(row_mean > 0, row / jnp.where(row_mean > 0, row_mean, 1), 0)
    return normalized[..., :, None] * col[..., None, :]


def update(
    stored: FactoredMoment, x: chex.Array, decay: Any, seed: Any = None
) -> tuple[FactoredMoment, chex.Array]:
    """Averages `x`'s row and column means into `stored`; returns (new, rebuilt estimate).

    `seed` is unused: the statistics are stored in full precision, without rounding.
    """
    del seed
    new = FactoredMoment(
        row=decay * stored.row + (1 - decay) * jnp.mean(x, axis=-1),
        col=decay * stored.col + (1 - decay) * jnp.mean(x, axis=-2),
    )
    return new, decode(new, x.dtype)
