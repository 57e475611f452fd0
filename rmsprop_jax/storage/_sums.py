"""The statistics of a large leaf from whole-leaf sums of what it averages (JAX 0.10.2+).

A format that keeps reductions of `x` (the factored format's row and column means) takes them,
from JAX 0.10.2 on, from two sums of `x` that XLA fuses with the computation of `x`
(:func:`fused_sums`); where a sum is not finite, from passes that count the non-finite
entries out (:func:`counted_means`), run only then (:func:`unless`). With older releases,
whose XLA:CPU fuses no producer into a reduction, such leaves are updated in row chunks
(:mod:`rmsprop_jax.storage._rows`).

The sums and the counting passes are written for XLA's fusion rules, not for differentiation;
each has a derivative rule that differentiates the plain reductions of `x` instead, so that
updates can be differentiated through (forward and reverse mode) as the float32 format's are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rmsprop_jax import _jax_compat
from rmsprop_jax.storage._format import never_from, tie
from rmsprop_jax.storage._rows import pack_flags

# The first JAX release whose XLA:CPU fuses an elementwise producer into a reduction (see
# :func:`fused_sums`); with older ones the sums would write `x` whole, and factored leaves are
# updated in chunks.
SUMS_FUSE_FROM = (0, 10, 2)


def sums_fuse() -> bool:
    """Whether the installed JAX computes :func:`fused_sums` without writing `x`."""
    return _jax_compat.JAX_VERSION >= SUMS_FUSE_FROM


def fused_sums(x_of: Callable[..., chex.Array], *arrays: Any) -> tuple[Any, Any]:
    """The sums of `x_of(*arrays)` along the last axis and along the one before, each computed
    in one pass over `arrays` without writing `x`.

    XLA fuses an elementwise producer into a reduction (on CPU from JAX 0.10.2, see
    :data:`SUMS_FUSE_FROM`), but not one read by two reductions: such an `x` (or any part of
    it common to both, as a conversion of a bfloat16 input) is written whole. So each
    reduction computes its own `x`, from its own copy of `arrays` out of one optimization
    barrier, which no compiler sees through (and which copies nothing): neither computation
    is merged with the other, or with one elsewhere in the program (the step's own |g|², say).
    A scalar constant (a decay, say) that `x_of` multiplies by would still be one broadcast
    common to both, written whole: scale the sums instead.

    XLA:CPU hands a sum of one operand to its library (YNN) kernels. For an `x` computed from
    two or more arrays (the centered spread from the gradient and `mu`), its own loop, which
    takes reductions of several operands, reads the row sums about twice as fast (on 2 AMD
    EPYC cores: 0.13-0.20 against 0.28-0.37 ns per element of the spread, from 512 x 512 to
    4096 x 4096; for the square of one array, both take about 0.1), so they are taken with a
    count of `x`'s non-finite entries as a second operand (:func:`_sum_counting`; the count is
    not needed, a non-finite entry making its row's sum non-finite). Across rows, the library
    kernel is the faster one (XLA's own loop: 4-13x slower).

    Examples:
      >>> x = jnp.arange(12.0).reshape(3, 4)
      >>> rows, cols = fused_sums(lambda a: a * a, x)
      >>> rows.tolist(), cols.tolist()
      ([14.0, 126.0, 366.0], [80.0, 107.0, 140.0, 179.0])
    """
    return _fused_sums(x_of, arrays)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fused_sums(x_of: Callable[..., chex.Array], arrays: tuple) -> tuple[Any, Any]:
    first, second = lax.optimization_barrier((arrays, arrays))
    x = x_of(*first)
    leaf_sized = sum(np.shape(a) == x.shape for a in jax.tree.leaves(first))
    rows = _sum_counting(x, ~jnp.isfinite(x), -1) if leaf_sized > 1 else jnp.sum(x, axis=-1)
    return rows, jnp.sum(x_of(*second), axis=-2)


@_fused_sums.defjvp
def _fused_sums_jvp(x_of, primals, tangents):
    (arrays,), (arrays_dot,) = primals, tangents
    _, x_dot = jax.jvp(x_of, arrays, arrays_dot)
    return _fused_sums(x_of, arrays), (jnp.sum(x_dot, axis=-1), jnp.sum(x_dot, axis=-2))


def _sum_counting(terms: chex.Array, counted: chex.Array, axis: int) -> chex.Array:
    """The sums of `terms` along `axis`, in one reduction with the count of the True entries
    of `counted` (a boolean array of the same shape): a reduction of two operands, which
    XLA:CPU computes in its own loop rather than in a library kernel. The count is tied to the
    sums (:func:`tie`), so that XLA keeps it."""
    sums, count = lax.reduce(
        (terms, counted.astype(jnp.int32)),
        (jnp.zeros((), terms.dtype), jnp.int32(0)),
        lambda a, b: (a[0] + b[0], a[1] + b[1]),
        (axis % terms.ndim,),
    )
    return tie(sums, never_from(count))


def counted_means(
    x_of: Callable[..., chex.Array], anchor: chex.Array, *arrays: Any, flagged: bool
) -> tuple[Any, Any, Any]:
    """The means of `x = x_of(*arrays)` along the last axis and along the one before, its
    non-finite entries counted as 0, and (where `flagged`) those entries flagged
    (:func:`rmsprop_jax.storage.pack_flags`, else None): for an `x` that :func:`fused_sums`
    cannot give (a non-finite entry, or a sum past float32's range). A mean is a sum of `x/n`,
    which cannot overflow where the mean is finite.

    Each is one pass over `arrays` that writes nothing the size of `x`: the means are
    variadic reductions that also count the non-finite entries (XLA:CPU fuses the select that
    leaves them out into its own reduction kernel; its library reductions, which take a
    single-operand sum, would have it written whole), and each pass computes its own `x`
    from `arrays` selected by a False of its own computed from `anchor` (an array of at
    least three elements), so that XLA merges no part of the three computations of `x`
    (which would then be written whole). Inside a loop, an `anchor` carried by the loop
    keeps XLA from hoisting the passes out of it (see :func:`unless`). The counts are not
    needed: each mean is tied to its count (:func:`tie`), so that XLA keeps them.

    Examples:
      >>> x = jnp.array([[1.0, jnp.inf], [3.0, 5.0]])
      >>> rows, cols, flags = counted_means(
      ...     lambda a: a, jnp.zeros(3), x, flagged=True)
      >>> rows.tolist(), cols.tolist(), flags.tolist()
      ([0.5, 4.0], [2.0, 2.5], [[2], [0]])
    """
    return _counted_means(x_of, flagged, anchor, arrays)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _counted_means(x_of, flagged, anchor, arrays):
    def selected(k: int) -> chex.Array:
        never = never_from(anchor.reshape(-1)[k])
        return x_of(*_unless_never(never, arrays))

    def mean(x: chex.Array, axis: int) -> chex.Array:
        finite = jnp.isfinite(x)
        return _sum_counting(_finite_terms(x, finite, axis), ~finite, axis)

    row_means, col_means = mean(selected(0), -1), mean(selected(1), -2)
    return row_means, col_means, pack_flags(~jnp.isfinite(selected(2))) if flagged else None


@_counted_means.defjvp
def _counted_means_jvp(x_of, flagged, primals, tangents):
    anchor, arrays = primals
    _, arrays_dot = tangents
    x, x_dot = jax.jvp(x_of, arrays, arrays_dot)
    finite = jnp.isfinite(x)

    def mean_dot(axis: int) -> chex.Array:
        return jnp.sum(_finite_terms(x_dot, finite, axis), axis=axis)

    row_means, col_means, flags = _counted_means(x_of, flagged, anchor, arrays)
    # The flags (integers, or None) have no derivative: float0 zeros.
    flags_dot = None if flags is None else np.zeros(np.shape(flags), jax.dtypes.float0)
    return (row_means, col_means, flags), (mean_dot(-1), mean_dot(-2), flags_dot)


def _finite_terms(x: chex.Array, finite: chex.Array, axis: int) -> chex.Array:
    """The terms of a mean along `axis` of `x` (or of its tangent) with the entries not
    `finite` (in `x`) left out: x/n there, 0 elsewhere."""
    return jnp.where(finite, x * (1.0 / x.shape[axis]), 0)


def unless(
    done: chex.Array,
    fn: Callable[..., Any],
    *operands: Any,
    otherwise: Any,
    carried: tuple[Any, ...] = (),
) -> tuple[Any, tuple[Any, ...]]:
    """`otherwise` where `done` (a boolean scalar), else `fn(anchor, *operands, *carried)` (of
    the same structure as `otherwise`), computed only where needed; and `carried`.

    A loop of at most one iteration rather than a `lax.cond`: under `jax.vmap`, a `lax.cond`
    whose predicate is batched computes both branches for every member, where the loop runs
    only if some member needs it. `anchor` is the first array of `otherwise` as the loop
    carries it: `fn` must make its work depend on it (as :func:`counted_means` does), or XLA
    hoists the work out of the loop, and it always runs. `carried` (a tuple of trees of
    arrays, bfloat16 ones say) is passed through the loop and rewritten unchanged in it: XLA
    would otherwise convert a loop-invariant bfloat16 input to float32 once before a loop
    whose predicate is batched (written whole, 4 bytes per element). The caller uses the
    `carried` returned in place of its own, so that the loop can rewrite them in place.

    Differentiated, the tangent is `otherwise`'s where `done`, else `fn`'s, both computed (JAX
    differentiates no while loop in reverse mode).

    Examples:
      >>> a = jnp.arange(3.0)
      >>> def fn(anchor, a):
      ...     return a + 0 * anchor
      >>> unless(jnp.bool_(True), fn, a, otherwise=-a)[0].tolist()
      [-0.0, -1.0, -2.0]
      >>> unless(jnp.bool_(False), fn, a, otherwise=-a)[0].tolist()
      [0.0, 1.0, 2.0]
    """
    return _unless(fn, done, operands, otherwise, tuple(carried))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _unless(fn, done, operands, otherwise, carried):
    def body(carry: tuple[chex.Array, Any, Any]) -> tuple[chex.Array, Any, Any]:
        _, result, inputs = carry
        anchor = jax.tree.leaves(result)[0]
        never = never_from(anchor.reshape(-1)[0])
        # Rewritten with the same values by a select XLA cannot resolve, so that they are
        # not loop-invariant. (`fn` reading them as the loop received them, rather than as
        # rewritten, has XLA copy them.)
        inputs = _unless_never(never, inputs)
        return jnp.bool_(True), fn(anchor, *operands, *inputs), inputs

    _, result, carried = lax.while_loop(lambda carry: ~carry[0], body, (done, otherwise, carried))
    return result, carried


@_unless.defjvp
def _unless_jvp(fn, primals, tangents):
    done, operands, otherwise, carried = primals
    _, operands_dot, otherwise_dot, carried_dot = tangents
    anchor = jax.tree.leaves(otherwise)[0]
    _, computed_dot = jax.jvp(
        lambda ops, inputs: fn(anchor, *ops, *inputs),
        (operands, carried),
        (operands_dot, carried_dot),
    )

    def chosen(if_done: Any, if_not: Any) -> Any:
        if getattr(if_done, "dtype", None) == jax.dtypes.float0:
            return if_done
        return jnp.where(done, if_done, if_not)

    result_dot = jax.tree.map(chosen, otherwise_dot, computed_dot)
    return _unless(fn, done, operands, otherwise, carried), (result_dot, carried_dot)


def _unless_never(never: chex.Array, tree: Any) -> Any:
    """Each array of `tree` unchanged, as a select by `never` (False, computed so that no
    compiler folds it) of the array or 0: XLA then treats the result as a new value, computed
    from whatever `never` depends on. A Python scalar stays weakly typed."""
    return jax.tree.map(lambda a: jnp.where(never, lax.full_like(a, 0, shape=()), a), tree)
