r"""The moving averages of a large compressed leaf, updated without a whole-leaf temporary.

A leaf that its storage format updates in row chunks (:func:`rmsprop_jax.storage.updates_by_rows`:
large `"factored"` leaves, and `"int8"` ones with JAX before 0.7.2) has its averages updated a
chunk of rows at a time (:func:`rmsprop_jax.storage.update_by_rows`), and the step then divides
by what they store. A format that updates from the means of x (`"factored"`, with JAX 0.10.2
and newer) takes them instead from two fused sums of x where those are finite, else from
counting passes that leave the non-finite entries out (:func:`rmsprop_jax.storage.fused_sums`,
:func:`rmsprop_jax.storage.counted_means`); centered, μ is then written elementwise, in
place, no chunk loop runs at all.

A format that leaves non-finite values out of its statistics (`"factored"`) gets them back for
the step from what was averaged in: |g|² is recomputed from the gradient; the centered spread
β |g - μ_{t-1}|² is not, since μ_{t-1} is overwritten, so its non-finite elements are flagged,
one bit per element.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

from rmsprop_jax import storage
from rmsprop_jax.storage._format import abs_sq

# (g, stored nu, stored mu) -> (new stored nu, new stored mu, variance estimate, what was
# averaged into nu): one leaf's update, as `scale_by_rms` computes it.
Moments = Callable[[chex.Array, Any, Any], tuple[Any, Any, chex.Array, chex.Array]]
# (g, stored mu, *earlier, sources=None) -> (new stored mu, its value): the first moment's
# update, as `moments` computes it, written once the arrays `earlier` are (see
# `storage.after`); given `g`'s sources, it computes `g` from them, read after `earlier`.
FirstMoment = Callable[..., tuple[Any, chex.Array]]
# (gradient_of, arrays): a leaf's gradient is `gradient_of(*arrays)` (a gradient and its
# parameter, say, for g + λp), for sums that read the arrays rather than a written gradient.
Sources = tuple[Callable[..., chex.Array], tuple[Any, ...]]


def moments_by_rows(
    moments: Moments,
    first_moment: FirstMoment,
    fmt: storage.StorageFormat,
    mu_fmt: storage.StorageFormat,
    g: chex.Array,
    nu: Any,
    mu: Any,
    *,
    decay: Any,
    centered: bool,
    sources: Sources | None = None,
) -> tuple[Any, Any, chex.Array]:
    """`moments(g, nu, mu)` of a large compressed leaf, a chunk of rows at a time or from the
    means of what is averaged in (see the module's docstring).

    Args:
      moments: the leaf's update (see :data:`Moments`); row-wise, so that a chunk of rows of
        its inputs gives the same rows of its outputs.
      first_moment: the update of `mu` alone (see :data:`FirstMoment`), as `moments` does it.
      fmt: the storage format of `nu`; it updates a leaf shaped like `g` in row chunks.
      mu_fmt: the storage format of `mu`.
      g: the gradient.
      nu: the stored second moment (or centered variance) of the leaf.
      mu: the stored first moment (centered), or None.
      decay: β.
      centered: whether `mu` is kept.
      sources: where `g` is computed from other arrays, that computation and the arrays: the
        means from sums then read the arrays and compute `g` in each sum, which a written `g`
        would not be (see :func:`storage.fused_sums`).

    Returns:
      The new stored `nu` and `mu` and the variance estimate the step divides by.

    Examples:
      >>> from rmsprop_jax import _large_leaves, storage
      >>> from rmsprop_jax.storage._format import abs_sq
      >>> fmt = storage.get("factored")
      >>> g = jnp.ones((512, 256))
      >>> nu = fmt.split(fmt.init({"w": g}, 0.0, signed=False, dtype_of=jnp.result_type),
      ...                jax.tree.structure({"w": g}))[0]
      >>> def moments(g, nu, mu):
      ...     new_nu, variance = fmt.leaf_update(nu, abs_sq(g), 0.5, jnp.uint32(0), signed=False)
      ...     return new_nu, mu, variance, abs_sq(g)
      >>> def first_moment(g, mu, *earlier):  # Not centered: no mu to update.
      ...     return mu, None
      >>> nu, _, variance = _large_leaves.moments_by_rows(
      ...     moments, first_moment, fmt, fmt, g, nu, None, decay=0.5, centered=False)
      >>> float(variance[0, 0]), nu[0].shape, nu[1].shape
      (0.5, (512,), (256,))
    """
    keeps_variance = centered and fmt.stores_centered_variance
    flagged = keeps_variance and not fmt.stores_non_finite

    if storage.updates_from_sums(fmt) and (flagged or not centered):
        nu, mu, flags = _from_means(
            fmt,
            mu_fmt,
            first_moment,
            g,
            nu,
            mu,
            decay=decay,
            centered=centered,
            sources=sources,
        )
    else:

        def by_rows(g, nu, mu, flags):
            nu, mu, _, folded = moments(g, nu, mu)
            return nu, mu, storage.pack_flags(~jnp.isfinite(folded)) if flagged else None

        flags = storage.flags_like(g) if flagged else None
        nu, mu, flags = storage.update_by_rows(
            by_rows, g, nu, mu, flags, summed=fmt.leaf_summed_over_rows(nu, g.shape)
        )
    if fmt.stores_non_finite:
        folded = None
    elif flagged:
        folded = _spread_where_not_finite(flags, mu, mu_fmt, g, decay)
    else:
        folded = abs_sq(g)
    return nu, mu, fmt.leaf_average_after_rows(nu, g, folded)


def _from_means(
    fmt: storage.StorageFormat,
    mu_fmt: storage.StorageFormat,
    first_moment: FirstMoment,
    g: chex.Array,
    nu: Any,
    mu: Any,
    *,
    decay: Any,
    centered: bool,
    sources: Sources | None,
) -> tuple[Any, Any, chex.Array | None]:
    r"""The new `nu` and `mu` of a leaf whose format updates from the means of x
    (|g|², or centered the spread β |g - μ_{t-1}|² as in `moments`), and the flags of x's
    non-finite entries (centered; None otherwise).

    Where every x is finite and no sum overflows (as the two fused sums show: a sum of
    non-negative terms is finite only if each is), the means are the sums over n; otherwise
    they are counted, the non-finite entries left out and flagged
    (:func:`storage.counted_means`, run only then: :func:`storage.unless`). μ is then
    written elementwise in place, after the means have read μ_{t-1}.
    """
    gradient_of, arrays = (lambda g: g, (g,)) if sources is None else sources
    count = len(arrays)

    def squared(*arrays: Any) -> chex.Array:
        return abs_sq(gradient_of(*arrays))

    # What the counting passes compute x from: the functions they are given (which JAX's
    # derivative rules of those passes take as static) close over no traced value, and the
    # decay comes as an operand.
    x_of: Callable[..., chex.Array] = squared
    operands: tuple[Any, ...] = arrays
    carried: tuple[Any, ...] = ()
    if centered:

        def distance(*arrays_and_mu: Any) -> chex.Array:
            g = gradient_of(*arrays_and_mu[:count])
            return squared_distance(g, arrays_and_mu[count], mu_fmt)

        def spread(scale: Any, *arrays_and_mu: Any) -> chex.Array:
            return scale * distance(*arrays_and_mu)

        # decay times the sums of |g - mu|**2: a constant inside them would be written whole
        # (see `fused_sums`).
        sums = tuple(decay * s for s in storage.fused_sums(distance, *arrays, mu))
        x_of, operands, carried = spread, (decay, *arrays), (mu,)
    else:
        sums = storage.fused_sums(squared, *arrays)
    finite = jnp.all(jnp.isfinite(sums[0])) & jnp.all(jnp.isfinite(sums[1]))
    from_sums = (
        sums[0] * (1.0 / g.shape[-1]),
        sums[1] * (1.0 / g.shape[-2]),
        storage.flags_like(g) if centered else None,
    )

    counted = functools.partial(storage.counted_means, x_of, flagged=centered)
    (row_means, col_means, flags), carried = storage.unless(
        finite, counted, *operands, otherwise=from_sums, carried=carried
    )
    nu = fmt.leaf_update_from_means(nu, row_means, col_means, decay)
    if centered:
        (mu,) = carried  # mu_{t-1}, as the loop passed it on.
        mu, _ = first_moment(g, mu, row_means, sources=sources)
    return nu, mu, flags


def squared_distance(g: chex.Array, mu: Any, mu_fmt: storage.StorageFormat) -> chex.Array:
    """|g - μ|² of a gradient and a stored first moment (of format `mu_fmt`): the centered
    spread, before its factor β."""
    return abs_sq(g - mu_fmt.leaf_decode(mu, g, signed=True))


def _spread_where_not_finite(
    flags: chex.Array, new_mu: Any, mu_fmt: storage.StorageFormat, g: chex.Array, decay: Any
) -> chex.Array:
    r"""The spread β |g - μ_{t-1}|² where it was not finite (0 elsewhere),
    once μ_{t-1} is overwritten: `flags` (see :func:`storage.pack_flags`) marks
    those elements, and each gets the value that gives the step its spread gives. That is
    NaN for β = 0 (0 times an infinite square) and where μ_t is NaN
    (μ_{t-1} or `g` was NaN), else +∞ (an overflowed square, or an
    infinite μ_{t-1}; where `g` is infinite the step is NaN with either value).
    """
    # Read behind a barrier: the written buffer, not a conversion XLA would copy it through.
    mu = mu_fmt.leaf_decode(jax.lax.optimization_barrier(new_mu), g, signed=True)
    value = jnp.where(jnp.isnan(mu) | (decay == 0), jnp.nan, jnp.inf)
    return jnp.where(storage.unpack_flags(flags, g.shape), value, 0).astype(g.dtype)
