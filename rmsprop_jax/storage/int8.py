r"""Block-wise 8-bit storage of a moving average, with a logarithmic code book.

Each leaf is cut into blocks along its last axis; a block keeps one float32 scale, the largest
magnitude in it, and one byte per element. The second moment is non-negative and spans many
orders of magnitude, and what matters to RMSprop is its relative error (the step is
:math:`g/\sqrt{\nu}`), so the code book is logarithmic, which makes the relative error the
same at every magnitude:

.. math::

    \nu = s \cdot 2^{-(253 - c)\,h}, \quad c = 1, \dots, 253, \quad h = 40 / 252,

:math:`c = 0` is exactly 0, and the codes 254 and 255 stand for :math:`+\infty` and NaN. The
codes cover 12 orders of magnitude below the block's largest finite value,
:math:`2^{-40} \approx 9 \times 10^{-13}`, in steps of 11.6%. The first moment (`mu` of
centered RMSprop) is signed: a sign and 126 logarithmic levels over :math:`2^{-20}` of the
block's largest finite magnitude (whose square again spans 12 orders), with 127, -127 and
-128 for :math:`+\infty`, :math:`-\infty` and NaN.

Non-finite values are kept per element and take no part in the block scale: one element
whose squared gradient overflowed (or whose gradient was NaN) keeps its own non-finite
average, as float32 storage would, and the 255 others of its block are stored as if it were
not there.

Rounding between the two neighbouring codes is stochastic and unbiased,
:math:`E[\mathrm{decode}(\mathrm{encode}(x))] = x`, for the reason given in
:mod:`rmsprop_jax.storage.bfloat16`: a moving average moves by far less than one code step per
update. Values below the smallest code round to it or to 0, still unbiased; exact zeros stay
exactly zero. The noise does not pile up with the number of steps: an update moves the average
by a fraction :math:`1-\beta` of its distance to :math:`x`, and the code moves with a
probability proportional to that, so the stored value wanders over the codes next to the exact
average. For a constant :math:`x` its relative spread is 4.4% at decay 0.9 as at 0.99 (0.23%
for bfloat16), which RMSprop sees halved in :math:`\sqrt{\nu}`.

With centering, the rounding of `mu` (up to 17% of :math:`|\mu|`) adds to the variance
estimate through :math:`(g - \mu)^2`: when gradients are far larger than their noise, the
variance is overestimated and steps come out smaller than with float32, a bias towards caution
rather than towards a blow-up.

Block layout: a last axis of length :math:`n` is split into the fewest :math:`2^j` equal blocks
of at most 256 elements (256 for every power-of-two multiple of 256, 192 for 768 or 3072). A
leaf whose last axis is sharded into any power-of-two number of shards up to :math:`2^j` thus
holds whole blocks on every shard, and block scales are computed without communication. When
:math:`2^j` does not divide :math:`n`, blocks are 256 long and the last one is zero-padded
during the computation (the stored codes keep the leaf's shape). Leaves under 4096 elements
are not quantized: their scales would cost more than they save.

References:
  Dettmers et al., `8-bit Optimizers via Block-wise Quantization
  <https://arxiv.org/abs/2110.02861>`_, 2022.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import chex
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rmsprop_jax import _sharded_ops
from rmsprop_jax.storage import _rounding
from rmsprop_jax.storage._format import Parts, StorageFormat

BLOCK_SIZE = 256
MIN_ELEMENTS = 4096


class _CodeBook(NamedTuple):
    top: int  # the largest level code; level c stands for 2 ** ((c - top) * step).
    step: float  # log2 of the ratio of neighbouring levels.
    inf: int  # the code of +inf (its negative is -inf for a signed book).
    nan: int
    dtype: Any


_UNSIGNED = _CodeBook(top=253, step=40.0 / 252, inf=254, nan=255, dtype=jnp.uint8)
_SIGNED = _CodeBook(top=126, step=20.0 / 125, inf=127, nan=-128, dtype=jnp.int8)


class QuantizedMoment(NamedTuple):
    """An int8-stored moving average: one tree per part, each shaped like the parameters.

    Per parameter leaf, either `codes` (shaped like the leaf; uint8, or int8 for the signed
    `mu`) and `scales` (float32, shape `(*leaf.shape[:-1], blocks)`: each block's largest
    finite magnitude) with a placeholder in `dense`, or, for a leaf too small to compress,
    the average itself in `dense` with placeholders in `codes` and `scales`.
    """

    codes: Any
    scales: Any
    dense: Any


def block_layout(length: int) -> tuple[int, int]:
    """(number of blocks, block length) for a last axis of `length` elements."""
    blocks = 1
    while length > blocks * BLOCK_SIZE:
        blocks *= 2
    if length % blocks == 0:
        return blocks, length // blocks
    return -(-length // BLOCK_SIZE), BLOCK_SIZE


def _to_blocks(x: chex.Array) -> chex.Array:
    """(..., n) -> (..., blocks, block length), zero-padding the last block if needed."""
    return _sharded_ops.split_last_axis(x, *block_layout(x.shape[-1]))


def _from_blocks(x: chex.Array, like: chex.Array) -> chex.Array:
    """(..., blocks, block length) -> `like`'s shape, dropping the padding."""
    return _sharded_ops.merge_last_axes(x, like)


def _exp2(codes_from_top: chex.Array, step: float) -> chex.Array:
    """`2 ** (codes_from_top * step)`: XLA's CPU exp is vectorized and its exp2 is not (8x)."""
    return jnp.exp(codes_from_top * (step * math.log(2)))


def block_anchor(param: chex.Array) -> chex.Array:
    """A slice of `param` shaped like its block scales: each block's first element."""
    return _to_blocks(param)[..., 0]


def encode(x: chex.Array, seed: chex.Array, *, signed: bool) -> tuple[chex.Array, chex.Array]:
    """Quantizes `x` (non-negative unless `signed`) with unbiased stochastic rounding.

    Returns (codes, scales). `seed` (uint32) selects the rounding bits, see
    :mod:`rmsprop_jax.storage._rounding`.
    """
    book = _SIGNED if signed else _UNSIGNED
    x = x.astype(jnp.float32)
    uniform = _to_blocks(_rounding.uniform(seed, x))
    blocks = _to_blocks(x)
    finite = jnp.isfinite(blocks)
    magnitude = jnp.where(finite, jnp.abs(blocks), 0)
    scales = jnp.max(magnitude, axis=-1)
    relative = magnitude / jnp.where(scales > 0, scales, 1)[..., None]
    # log2(0) = -inf clips to code 0, whose level is exactly 0: zeros stay zeros.
    lower = jnp.clip(jnp.floor(book.top + jnp.log2(relative) / book.step), 0, book.top)
    # Neighbouring levels are a factor 2**step apart, so one exponential gives both. Past the top
    # code, `relative <= 1` makes the probability of rounding up 0.
    level = _exp2(lower - book.top, book.step)
    low, high = jnp.where(lower > 0, level, 0.0), level * 2.0**book.step
    round_up_probability = jnp.clip((relative - low) / (high - low), 0, 1)
    codes = jnp.minimum(lower + (uniform < round_up_probability), book.top)
    codes = jnp.where(jnp.isinf(blocks), book.inf, codes)
    if signed:
        codes = jnp.where(blocks < 0, -codes, codes)
    codes = jnp.where(jnp.isnan(blocks), book.nan, codes)
    return _from_blocks(codes, x).astype(book.dtype), scales


def decode(codes: chex.Array, scales: chex.Array, dtype: Any) -> chex.Array:
    """The array that `codes` and `scales` stand for, in `dtype`."""
    signed = codes.dtype == jnp.int8
    book = _SIGNED if signed else _UNSIGNED
    code = _to_blocks(codes.astype(jnp.int32))
    magnitude_code = jnp.abs(code)
    level = jnp.where(
        magnitude_code > 0, _exp2((magnitude_code - book.top).astype(jnp.float32), book.step), 0
    )
    magnitude = jnp.where(magnitude_code == book.inf, jnp.inf, level * scales[..., None])
    values = jnp.where(code < 0, -magnitude, magnitude) if signed else magnitude
    values = jnp.where(code == book.nan, jnp.nan, values)
    return _from_blocks(values, codes).astype(dtype)


class Int8(StorageFormat):
    """Block-wise 8-bit logarithmic codes for leaves of at least 4096 elements."""

    name: ClassVar[str] = "int8"
    container: ClassVar[type] = QuantizedMoment
    first_moment_name: ClassVar[str] = "int8"

    def compresses(self, shape: tuple[int, ...], dtype: Any, *, signed: bool) -> bool:
        del signed
        return math.prod(shape) >= MIN_ELEMENTS and not jnp.issubdtype(dtype, jnp.complexfloating)

    def create(self, like: Any, value: Any, *, signed: bool) -> Parts:
        """`value` everywhere, exactly: the top code with scale |value| (or code 0 for 0)."""
        book = _SIGNED if signed else _UNSIGNED
        value = jnp.asarray(value, jnp.float32)
        code = jnp.where(value != 0, book.top, 0) * jnp.where(value < 0, -1, 1)
        magnitude = jnp.full_like(like, jnp.abs(value), dtype=jnp.float32)
        # Every block starts with an element of the leaf. A slice, not a max: XLA would spend
        # seconds folding a reduction over a large constant when `init` is jitted.
        scales = _sharded_ops.first_along(_to_blocks(magnitude), -1)
        return jnp.full_like(like, code, dtype=book.dtype), scales

    def decode(self, parts: Parts, dtype: Any) -> chex.Array:
        codes, scales = parts
        return decode(codes, scales, dtype)

    def encode(self, x: chex.Array, seed: chex.Array, *, signed: bool) -> Parts:
        return encode(x, seed, signed=signed)

    def part_shardings(self, sharding: Any, shape: tuple[int, ...]) -> Parts:
        entries = _sharded_ops.padded_spec(
            getattr(sharding, "spec", None) or PartitionSpec(), len(shape)
        )
        blocks_entry = None
        if hasattr(sharding, "mesh"):
            blocks, block_length = block_layout(shape[-1])
            blocks_entry, _ = _sharded_ops.split_entry(
                entries[-1], blocks, block_length, shape[-1], dict(sharding.mesh.shape)
            )
        return sharding, _sharded_ops.with_entries(
            sharding, (*entries[:-1], blocks_entry), "block scales"
        )

    def tie(self, parts: Parts, param: chex.Array) -> Parts:
        codes, scales = parts
        return (
            _sharded_ops.plus_zero_from(param, codes),
            _sharded_ops.plus_zero_from(block_anchor(param), scales),
        )


FORMAT = Int8()
