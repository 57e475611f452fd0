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

The seeds of one step are one hash of an array of all of them (:func:`step_seeds`), each leaf
reading its own at a row its kernels take as an argument, so that same-shaped leaves share
their kernels (XLA compiles them once). At 512 leaves of 32768 elements, hashing each seed by
itself made tracing a float32 step take 2.6 s (optax's: 0.5 s), and the per-leaf constants made
compiling a bfloat16 step take 11 s instead of 2.8 s.

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
from jax import lax

from rmsprop_jax import _jax_compat, _runtime_integers, _sharded_ops

_GOLDEN = 0x9E3779B9
# `lowbias32`'s two rounds: xor-shift right by the first number, then multiply by the second.
_ROUNDS = ((16, 0x7FEB352D), (15, 0x846CA68B))
STREAMS = 2  # Stream 0 rounds the second moment, stream 1 the first (`mu`, centered).


def _lowbias32(x: chex.Array) -> chex.Array:
    for shift, multiplier in _ROUNDS:
        x = (x ^ (x >> shift)) * jnp.uint32(multiplier)
    return x ^ (x >> 16)


def _mix(x: chex.Array) -> chex.Array:
    """The multiply, xor-shift, multiply core of `lowbias32`: its high bits are well mixed
    (the low bits are not, and are not used)."""
    (_, first), (shift, second) = _ROUNDS
    x = x * jnp.uint32(first)
    return (x ^ (x >> shift)) * jnp.uint32(second)


def _seed_table(count: chex.Array, leaves: int) -> chex.Array:
    """Every seed of one step (`count`), shaped (leaves, STREAMS): one hash of one array."""
    leaf_and_stream = jnp.arange(1, leaves * STREAMS + 1, dtype=jnp.uint32)
    leaf_parts = _lowbias32(leaf_and_stream.reshape(leaves, STREAMS))
    return _lowbias32(jnp.asarray(count).astype(jnp.uint32) * jnp.uint32(_GOLDEN) ^ leaf_parts)


def _pick(table: chex.Array, row: Any, stream: int) -> chex.Array:
    # Both indices int32: with jax_enable_x64 a Python int would become an int64, and
    # dynamic_slice takes indices of one type.
    index = (lax.convert_element_type(row, jnp.int32), jnp.int32(stream))
    return lax.reshape(lax.dynamic_slice(table, index, (1, 1)), ())


def step_seeds(count: chex.Array, leaves: int) -> list[tuple[chex.Array, ...]]:
    """The uint32 seeds of one step (`count`): for each of `leaves` leaves, one per stream.

    They are computed together, one hash of an array of all of them, and each leaf reads its
    own at a row that reaches its kernels at run time
    (:func:`rmsprop_jax._runtime_integers.integers`): a constant row, or a constant seed, would
    be written into each leaf's kernels, which XLA would then compile once per leaf rather
    than once per shape (see the module docstring). Stream 0 rounds the second moment, 1 the
    first.

    Examples:
      >>> from rmsprop_jax.storage import _rounding
      >>> [(int(a), int(b)) for a, b in _rounding.step_seeds(jnp.int32(1), 2)]
      [(1573952294, 1585645556), (3510182084, 3870760449)]
    """
    table = _seed_table(count, leaves)
    rows = _runtime_integers.integers(range(leaves), count)
    return [tuple(_pick(table, row, stream) for stream in range(STREAMS)) for row in rows]


def seed(count: chex.Array, leaf_index: int, stream: int) -> chex.Array:
    """The uint32 seed of one step (`count`), one leaf and one stream."""
    return _pick(_seed_table(count, leaf_index + 1), leaf_index, stream)


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
