"""Updating the stored averages of a large leaf in chunks of rows, to bound the step's memory.

A format whose new parts depend on reductions of `x` that XLA would not fuse with the
computation of `x` (the factored format's row and column means: XLA:CPU fuses a producer into
a reduction only where the reduction is its one reader, and before JAX 0.10.2 never) would have
`x` materialized for the whole leaf (4 bytes per parameter) before the parts are written.
Updating the leaf a chunk of rows at a time, in a `jax.lax.fori_loop` whose carry is the
(donated) stored parts, bounds that temporary to one chunk (:data:`CHUNK_ELEMENTS` elements)
and writes every new part in place. In chunks, the row means are written a chunk at a time and
the column means of a matrix, a statistic over all rows, are carried through the loop and
folded chunk by chunk (`summed` in :func:`update_by_rows`). `"int8"` is updated in chunks only
with JAX releases before 0.7.2 (see :data:`rmsprop_jax.storage.int8.ONE_PASS_FROM`), and
`"factored"` only with releases before 0.10.2, whose XLA:CPU fuses no producer into a
reduction: from 0.10.2 on, its statistics come from whole-leaf reductions that compute `x`
themselves (:mod:`rmsprop_jax.storage._sums`).

XLA:CPU has no bfloat16 dynamic slices: it writes a bfloat16 chunk (the centered `mu` of the
factored format, with JAX before 0.10.2) by converting the whole carried array to float32 and
back, so such a leaf's update takes time proportional to its size times its number of chunks
(and it reads one by converting the whole array first).

Chunks are strided: the leaf's leading axis of R rows is viewed as G × R/G (G = gcd(R, 64)) and
a chunk takes the same few rows of every group, so a leaf whose rows are split over up to 64
devices (any power of two dividing R) finds each chunk on every device and the loop needs no
communication. The stochastic-rounding bits of every element are those of the unchunked update
(see :func:`rmsprop_jax.storage._rounding.chunk_rows`): the result does not depend on the
chunking.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rmsprop_jax import _sharded_ops
from rmsprop_jax.storage import _rounding
from rmsprop_jax.storage._format import never_from, tie

CHUNK_ELEMENTS = 1 << 15
_MAX_GROUPS = 64


def layout(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(groups, rows per group, rows per chunk and group) for a leaf of `shape`, or None when
    the leaf is not worth chunking (under two chunks, or fewer than two axes)."""
    if len(shape) < 2 or math.prod(shape) <= 2 * CHUNK_ELEMENTS:
        return None
    rows, row_elements = shape[0], math.prod(shape[1:])
    # At most a chunk's worth of rows in the groups (a power of two, so it still divides
    # evenly among devices).
    most = 1 << max(0, (CHUNK_ELEMENTS // row_elements).bit_length() - 1)
    groups = math.gcd(rows, min(_MAX_GROUPS, most))
    group_rows = rows // groups
    step = max(1, CHUNK_ELEMENTS // (groups * row_elements))
    while group_rows % step:
        step -= 1
    return None if step == group_rows else (groups, group_rows, step)


def applies(fmt: Any, g: chex.Array, *, signed: bool) -> bool:
    """Whether `fmt` updates a leaf shaped like `g` in row chunks."""
    return (
        fmt.updates_in_row_chunks
        and fmt.compresses(g.shape, g.dtype, signed=signed)
        and layout(g.shape) is not None
        # Reshapes of explicitly sharded axes need their sharding spelled out; such leaves
        # are updated in one pass.
        and _sharded_ops.explicit_sharding(g) is None
    )


def flags_like(g: chex.Array) -> chex.Array:
    """Room for one flag per element of `g`, packed 8 to a byte along the last axis."""
    return jnp.zeros((*g.shape[:-1], -(-g.shape[-1] // 8)), jnp.uint8)


def pack_flags(flags: chex.Array) -> chex.Array:
    """Boolean `flags` packed 8 to a byte along the last axis (bit `k` of byte `j` is entry
    `8 j + k`), shaped as :func:`flags_like`; row-wise, so a row chunk packs its own rows."""
    length = flags.shape[-1]
    padded = jnp.pad(flags, [(0, 0)] * (flags.ndim - 1) + [(0, -length % 8)])
    bits = padded.reshape(*flags.shape[:-1], -1, 8).astype(jnp.uint8)
    return jnp.sum(bits << jnp.arange(8, dtype=jnp.uint8), axis=-1).astype(jnp.uint8)


def unpack_flags(packed: chex.Array, shape: tuple[int, ...]) -> chex.Array:
    """The boolean flags of an array of `shape` from :func:`pack_flags`, elementwise: XLA
    fuses the unpacking into whatever reads the flags."""
    bits = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., : shape[-1]].astype(bool)


def _aligned(anchor: chex.Array, like: chex.Array) -> chex.Array:
    """`anchor` (a chunk of another part of the same rows) made to broadcast against `like`,
    each element of `like` taking one on the same rows and within the same last-axis block,
    so that the two are placed alike when sharded."""
    if anchor.shape == like.shape:
        return anchor
    *rows, length = anchor.shape
    if tuple(rows) == like.shape[:-1] and length % like.shape[-1] == 0:
        return anchor.reshape(*rows, like.shape[-1], -1)[..., 0]
    if tuple(rows) == like.shape[:-1] and like.shape[-1] % length == 0:
        repeats = like.shape[-1] // length
        return jnp.broadcast_to(anchor[..., None], (*rows, length, repeats)).reshape(like.shape)
    return anchor.reshape(-1)[:1]


def update_by_rows(
    fn: Callable[..., Any],
    g: chex.Array,
    *stored: Any,
    summed: Sequence[bool] = (),
) -> Any:
    """`fn(g, *stored)` computed a chunk of rows at a time, each stored array updated in place.

    An array that is a statistic over the leaf's rows (the column means of a factored matrix,
    flagged in `summed`) has no rows to cut into chunks: it is carried through the loop whole,
    each chunk's `fn` receiving it as the chunks before left it and returning it with its own
    rows folded in (see :func:`rmsprop_jax.storage._rounding.first_chunk`).

    Args:
      fn: maps a gradient and stored leaves (tuples of arrays, or None) to new stored leaves
        of the same structure; it must be row-wise (row `i` of every output depends only on
        row `i` of the inputs), except for the `summed` arrays, and return every array without
        the leaf's rows (one-element placeholders) unchanged.
      g: the gradient, of at least two axes, with a :func:`layout`.
      *stored: the stored leaves.
      summed: per array of `stored` (in `jax.tree.leaves` order; missing entries are False),
        whether it is folded over the rows rather than written a chunk at a time.

    Returns:
      The new stored leaves, as `fn(g, *stored)` would return them.
    """
    chunking = layout(g.shape)
    if chunking is None:
        raise ValueError(f"A leaf of shape {g.shape} is not updated by rows (see `layout`).")
    groups, group_rows, step = chunking
    rows = g.shape[0]
    leaves, treedef = jax.tree.flatten(stored)
    summed = [*summed, *[False] * (len(leaves) - len(summed))]
    if len(summed) != len(leaves):
        raise ValueError(f"`summed` has {len(summed)} entries for {len(leaves)} stored arrays.")
    rowed = [
        not s and np.ndim(x) >= 1 and np.shape(x)[0] == rows and np.shape(x) != (1,)
        for x, s in zip(leaves, summed, strict=True)
    ]
    carried = [r or s for r, s in zip(rowed, summed, strict=True)]

    def grouped(x):
        return x.reshape(groups, group_rows, *x.shape[1:])

    def chunk_of(x, first):
        return lax.dynamic_slice_in_dim(x, first, step, axis=1).reshape(groups * step, *x.shape[2:])

    chunk_count = group_rows // step

    def body(i, carry):
        first = i * step
        chunks = iter(carry)
        inputs = []
        for x, r, c in zip(leaves, rowed, carried, strict=True):
            inputs.append(chunk_of(next(chunks), first) if r else next(chunks) if c else x)
        with _rounding.chunk_rows(group_rows, step, first):
            outputs = jax.tree.leaves(fn(chunk_of(grouped(g), first), *treedef.unflatten(inputs)))
        carry = list(carry)
        # The last array written: a chunk read back from it ties the next write to it.
        last: Any = None
        position = 0
        for x, r, c in zip(outputs, rowed, carried, strict=True):
            if not c:
                continue
            # XLA recomputes each new chunk inside the fusion that writes it, from the old
            # chunks, and a later stored leaf may read an earlier one's old chunk (centered:
            # the variance reads the old mu), a format's codes their old scales, a statistic
            # over the rows the old chunks of later leaves. Unless the writes are ordered, XLA
            # copies whole carried arrays each iteration. So each chunk is written after the
            # one before (the stored leaves in order, parts in order), tied to a chunk read
            # back from the array written before (another chunk's rows, so that no
            # simplification turns the read into the value written), or to the statistic
            # over the rows computed before.
            if last is not None:
                x = tie(x, never_from(_aligned(last, x) if r else last.reshape(-1)[:1]))
            if not r:  # A statistic over the rows: carried whole, small.
                carry[position] = x.astype(carry[position].dtype)
                last = carry[position].reshape(-1)[:1]
                position += 1
                continue
            update = x.reshape(groups, step, *x.shape[1:]).astype(carry[position].dtype)
            carry[position] = lax.dynamic_update_slice_in_dim(carry[position], update, first, 1)
            back = chunk_of(carry[position], ((i + 1) % chunk_count) * step)
            position += 1
            last = back
        return tuple(carry)

    carry = tuple(
        grouped(x) if r else x for x, r, c in zip(leaves, rowed, carried, strict=True) if c
    )
    carry = iter(lax.fori_loop(0, chunk_count, body, carry))
    new = [next(carry).reshape(x.shape) if c else x for x, c in zip(leaves, carried, strict=True)]
    return treedef.unflatten(new)
