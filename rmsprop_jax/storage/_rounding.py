"""Random bits for stochastic rounding: an integer hash of a per-step seed and the element index.

Stochastic rounding needs, per stored element and step, a few uniform bits independent of the
value being rounded and of the other elements. `jax.random` (threefry) provides them at about
80 integer operations per 32 bits, which made a bfloat16 step 8 times as slow as a float32 one
on CPU. A counter-based hash gives them at 4: the element's global index in its leaf plus a
32-bit seed (mixed from the step count, the leaf's position and the stream, first or second
moment, by the full `lowbias32` hash, once per leaf and step) goes through the core of
`lowbias32`, a multiply, an xor-shift and a multiply. Only the high bits of the result are
used (the top 16 for bfloat16, the top 20 or 24 for int8): a product's high bits depend on
every bit of its factors, and the xor-shift between the two multiplies folds the well-mixed
high bits of the first into the low bits of the second, so neighbouring indices give
unrelated values, as do consecutive steps of one element (`tests/test_storage_codecs.py`
checks the fields used for uniformity and for correlation across neighbours, rows and
steps). The low bits of the result are not mixed and are never used. Each step's rounding
would stay unbiased with any bits uniform over the seed; the mix is what keeps the errors of
neighbouring elements independent. The bits are reproducible, need no key in the state, and
do not depend on how a leaf is sharded or batched: the index is the global one, and
`jax.lax.broadcasted_iota` is partitioned by the compiler like any elementwise operation.

References:
  Wellons, `Prospecting for Hash Functions <https://nullprogram.com/blog/2018/07/31/>`_, 2018.
  Salmon et al., `Parallel Random Numbers: As Easy as 1, 2, 3
  <https://doi.org/10.1145/2063384.2063405>`_, 2011 (counter-based generators).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import chex
import jax.numpy as jnp

from rmsprop_jax import _jax_compat, _sharded_ops

_GOLDEN = 0x9E3779B9


def _lowbias32(x: chex.Array) -> chex.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _mix(x: chex.Array) -> chex.Array:
    """The multiply, xor-shift, multiply core of `lowbias32`: its high bits are well mixed
    (the low bits are not, and are not used)."""
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    return x * jnp.uint32(0x846CA68B)


def seed(count: chex.Array, leaf_index: int, stream: int) -> chex.Array:
    """A uint32 seed for one step (`count`), one leaf and one stream."""
    leaf = _lowbias32(jnp.uint32((2 * leaf_index + stream + 1) & 0xFFFFFFFF))
    return _lowbias32(jnp.asarray(count).astype(jnp.uint32) * jnp.uint32(_GOLDEN) ^ leaf)


# Set while a leaf is updated in row chunks (`rmsprop_jax.storage._rows`): how the rows of a
# chunk map to the rows of the leaf, so that every element keeps its bits.
_CHUNK_ROWS: contextvars.ContextVar[Any] = contextvars.ContextVar("chunk_rows", default=None)


@contextlib.contextmanager
def chunk_rows(group_stride: int, group_rows: int, first_row: Any) -> Iterator[None]:
    """Arrays seen by :func:`bits` are row chunks of a leaf: chunk row `q` is leaf row
    `(q // group_rows) * group_stride + first_row + q % group_rows`."""
    token = _CHUNK_ROWS.set((group_stride, group_rows, first_row))
    try:
        yield
    finally:
        _CHUNK_ROWS.reset(token)


def in_chunk() -> bool:
    """Whether the arrays being traced are row chunks of a leaf (see :func:`chunk_rows`)."""
    return _CHUNK_ROWS.get() is not None


def leaf_rows(chunk_rows: int) -> int:
    """The number of rows of the leaf whose chunks of `chunk_rows` rows are being traced."""
    group_stride, group_rows, _ = _CHUNK_ROWS.get()
    return chunk_rows // group_rows * group_stride


def first_chunk() -> chex.Array:
    """Whether the chunk being traced is the leaf's first (a traced boolean)."""
    _, _, first_row = _CHUNK_ROWS.get()
    return jnp.asarray(first_row) == 0


def bits(step_seed: chex.Array, like: chex.Array) -> chex.Array:
    """uint32 values shaped (and, with explicit sharding, sharded) like `like`, whose top 24
    bits are uniform random bits (see the module docstring)."""
    sharding = _sharded_ops.explicit_sharding(like)
    index = jnp.zeros((), jnp.uint32)
    stride = 1
    chunk = _CHUNK_ROWS.get()
    for axis in reversed(range(like.ndim)):
        iota = _jax_compat.broadcasted_iota(jnp.uint32, like.shape, axis, sharding)
        if axis == 0 and chunk is not None:
            group_stride, group_rows, first_row = chunk
            iota = (
                (iota // group_rows) * jnp.uint32(group_stride)
                + jnp.asarray(first_row).astype(jnp.uint32)
                + iota % group_rows
            )
        index = index + iota * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= like.shape[axis]
    step_seed = jnp.asarray(step_seed, jnp.uint32)
    return _mix(index + step_seed)


def uniform(step_seed: chex.Array, like: chex.Array) -> chex.Array:
    """Uniform float32 values in [0, 1), on a grid of 2**-24, shaped like `like`."""
    return (bits(step_seed, like) >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
