r"""Factored storage of a non-negative moving average: row and column means (Adafactor).

For a leaf of shape (..., R, C) whose last two axes both have at least 128 entries, only the
moving averages of the row means and the column means of x (g² for RMSprop) are kept, R + C
numbers per matrix instead of RC, and the full average is rebuilt as their normalized outer
product,

.. math::

    r_t = \beta r_{t-1} + (1 - \beta)\, \overline{x_t}^{\,\mathrm{cols}}, \quad
    c_t = \beta c_{t-1} + (1 - \beta)\, \overline{x_t}^{\,\mathrm{rows}}, \quad
    \hat\nu_t = r_t c_t^\top / \overline{r_t},

the rank-one matrix that minimizes the generalized Kullback-Leibler divergence to the full
average given its row and column sums (Shazeer and Stern 2018). Because the rebuild is linear in
r_t and in c_t, bias correction can be applied to ν̂_t as if it were the full average. Where
every row mean is 0 (nothing seen yet, `initial_scale=0`) the estimate is 0, and a zero gradient
then gives a zero step. Other leaves are stored as they are.

Means are taken as sums of x/n, which cannot overflow where the mean itself is representable. A
non-finite entry of x (a NaN or infinite gradient, or a square that overflowed) counts as 0 in
the statistics, so it changes no other element's estimate; its own estimate in that step is the
non-finite value itself (so the update is non-finite, or 0 for an overflowed square, as with
float32 storage). The statistics cannot remember it: from the next step on, that element's
estimate is rebuilt from the row and column means again, where float32 storage would keep the
non-finite value.

How the statistics are computed. Both are reductions of x, along the last axis and along the
second-to-last, and XLA:CPU fuses a producer into a reduction only where the reduction is its
one reader (before JAX 0.10.2: never): read by both in one pass, x (a float32 array of the whole
leaf) would be materialized.

From JAX 0.10.2 on, each statistic of a large leaf is first computed as one fused sum of x,
each sum computing its own x from the gradient (and, centered, from μ_{t-1}:
x = β |g - μ_{t-1}|²) (:func:`rmsprop_jax.storage._sums.fused_sums`); a sum of non-negative
numbers is finite only if every term is, so when both are finite no x was non-finite and no sum
overflowed, and the means are the sums times 1/C and 1/R. Otherwise (a NaN or infinite
gradient, a square or a sum past float32's range) the means are counted in passes that leave
the non-finite entries out and flag them (:func:`rmsprop_jax.storage._sums.counted_means`),
run only then (:func:`rmsprop_jax.storage._sums.unless`). Centered, μ is written afterwards,
elementwise and in place.

With older JAX releases, a leaf large enough to be updated in row chunks
(:mod:`rmsprop_jax.storage._rows`) is read once, a chunk K of rows at a time; each chunk
squares its own gradient rows (or forms their spread from the stored μ), writes its rows of r_t
in place, and adds its share to the column statistic carried through the loop,

.. math::

    c_t = \beta c_{t-1} + \sum_K (1 - \beta) \sum_{i \in K} x_{t,i} / R,

where R is the leaf's row count (for a stack of matrices, a chunk holds whole matrices and
computes their column means as in one pass). The sums of x/R and the non-finite entries counted
as 0 are those of the one-pass update; only the order of the additions differs (float32
rounding).

The step then reads the gradient, the two statistics and the parameters, elementwise:
ν̂_t is a broadcast product, never a full array. Where the step needs the non-finite entries of
x themselves, they are recomputed from the gradient (|g|²); the centered spread depends on the
μ_{t-1} that is overwritten, so its non-finite entries are flagged, one bit per element (1/8
byte per parameter while the step runs).

References:
  Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
  <https://arxiv.org/abs/1804.04235>`_, 2018.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import chex
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rmsprop_jax import _sharded_ops
from rmsprop_jax.storage import _rounding
from rmsprop_jax.storage._format import Parts, StorageFormat, moving_average

MIN_DIM_SIZE = 128


class FactoredMoment(NamedTuple):
    """A factored moving average: one tree per part, each shaped like the parameters.

    Per parameter leaf of shape (..., R, C), either `row` (shape (..., R), the averages over
    the last axis) and `col` (shape (..., C), over the second-to-last) with a placeholder in
    `dense`, or, for a leaf that is not such a matrix, the average itself in `dense` with
    placeholders in `row` and `col`.

    Examples:
      >>> params = {"w": jnp.ones((128, 256)), "b": jnp.ones(8)}
      >>> nu = rj.rmsprop(1e-3, moment_storage="factored").init(params)[2].nu
      >>> nu.row["w"].shape, nu.col["w"].shape, nu.dense["b"].shape, nu.dense["w"].shape
      ((128,), (256,), (8,), (1,))
    """

    row: Any
    col: Any
    dense: Any


def safe_mean(x: chex.Array, axis: int) -> chex.Array:
    """The mean along `axis` as a sum of `x / n`: no overflow where the mean is finite."""
    return jnp.sum(x * (1.0 / x.shape[axis]), axis=axis)


def decode(row: chex.Array, col: chex.Array, dtype: Any) -> chex.Array:
    r"""The rank-one estimate r cᵀ / mean(r) of the full average."""
    row, col = row.astype(dtype), col.astype(dtype)
    row_mean = safe_mean(row, -1)[..., None]
    # XLA:CPU divides through the reciprocal, which flushes to 0 for divisors beyond 2**126:
    # scale such means (and their rows) down first.
    scale = jnp.where(row_mean > 2.0**100, 2.0**-64, 1.0).astype(dtype)
    divisor = jnp.where(row_mean > 0, row_mean * scale, 1)
    normalized = jnp.where(row_mean > 0, (row * scale) / divisor, 0)
    return normalized[..., :, None] * col[..., None, :]


class Factored(StorageFormat):
    """Row and column statistics for matrices of at least 128 x 128; other leaves dense."""

    name: ClassVar[str] = "factored"
    container: ClassVar[type] = FactoredMoment
    # `mu` has no rank-one structure (it is signed); it is stored as bfloat16. Its statistics
    # read the stored `mu` through their own barriers: kept as float32 or 8-bit codes, `mu`
    # would be written whole once more (2 to 3 bytes per parameter of temporaries).
    first_moment_name: ClassVar[str] = "bfloat16"
    first_moment_names: ClassVar[tuple[str, ...]] = ("bfloat16",)
    rounds: ClassVar[bool] = False
    # The statistics reduce `x` along both axes: in one pass, XLA:CPU would materialize `x`.
    updates_in_row_chunks: ClassVar[bool] = True
    stores_non_finite: ClassVar[bool] = False
    # Without non-finite entries, the statistics are the sums of `x` along each axis.
    updates_from_sums: ClassVar[bool] = True

    def compresses(self, shape: tuple[int, ...], dtype: Any, *, signed: bool) -> bool:
        return (
            not signed
            and len(shape) >= 2
            and min(shape[-2:]) >= MIN_DIM_SIZE
            and not jnp.issubdtype(dtype, jnp.complexfloating)
        )

    def create(self, like: Any, value: Any, *, signed: bool) -> Parts:
        del signed
        full = jnp.full_like(like, value, dtype=jnp.finfo(jnp.result_type(like)).dtype)
        # Slices, not means: exact, and XLA would spend seconds folding a reduction over a
        # large constant when `init` is jitted.
        return _sharded_ops.first_along(full, -1), _sharded_ops.first_along(full, -2)

    def decode(self, parts: Parts, dtype: Any) -> chex.Array:
        row, col = parts
        return decode(row, col, dtype)

    def update(
        self, parts: Parts, x: chex.Array, decay: Any, seed: chex.Array, *, signed: bool
    ) -> tuple[Parts, chex.Array | None]:
        """Averages `x`'s row and column means into the statistics (no rounding: no seed).

        Within a row chunk (:mod:`rmsprop_jax.storage._rows`) of a matrix, `col` is the
        column statistic as the chunks before left it, and comes back with this chunk's rows
        folded in; the average is then known only after the last chunk
        (:meth:`average_after_rows`), and None is returned in its place.
        """
        del seed, signed
        row, col = parts
        counted = jnp.where(jnp.isfinite(x), x, 0)
        row = moving_average(row, safe_mean(counted, -1), decay)
        if not _rounding.in_chunk():
            col = moving_average(col, safe_mean(counted, -2), decay)
            return (row, col), self.average_after_rows((row, col), x.dtype, x)
        if x.ndim == 2:
            # c_t = beta c_{t-1} + sum_k (1 - beta) sum_{i in chunk k} x_i / R.
            share = jnp.sum(counted * (1.0 / _rounding.leaf_rows(x.shape[0])), axis=0)
            col = jnp.where(_rounding.first_chunk(), decay * col, col) + (1 - decay) * share
        else:  # Chunks of whole matrices.
            col = moving_average(col, safe_mean(counted, -2), decay)
        return (row, col), None

    def update_from_means(
        self, parts: Parts, row_means: chex.Array, col_means: chex.Array, decay: Any
    ) -> Parts:
        """Folds the means of `x` along the last axis and along the one before into the row
        and column statistics."""
        row, col = parts
        return moving_average(row, row_means, decay), moving_average(col, col_means, decay)

    def summed_over_rows(self, shape: tuple[int, ...]) -> tuple[bool, ...]:
        # A matrix's column statistic is a mean over its rows; a stack's is one per matrix.
        return False, len(shape) == 2

    def average_after_rows(self, parts: Parts, dtype: Any, folded: Any) -> chex.Array:
        row, col = parts
        return jnp.where(jnp.isfinite(folded), decode(row, col, dtype), folded)

    def logical_shape(self, parts: Parts) -> tuple[int, ...]:
        row, col = parts
        return (*row.shape, col.shape[-1])

    def part_shardings(self, sharding: Any, shape: tuple[int, ...]) -> Parts:
        entries = _sharded_ops.padded_spec(
            getattr(sharding, "spec", None) or PartitionSpec(), len(shape)
        )
        return (
            _sharded_ops.with_entries(sharding, entries[:-1], "row statistic"),
            _sharded_ops.with_entries(sharding, entries[:-2] + entries[-1:], "column statistic"),
        )

    def tie(self, parts: Parts, param: chex.Array) -> Parts:
        row, col = parts
        return (
            _sharded_ops.plus_zero_from(param[..., 0], row),
            _sharded_ops.plus_zero_from(param[..., 0, :], col),
        )


FORMAT = Factored()
