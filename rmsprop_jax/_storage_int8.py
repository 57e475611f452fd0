r"""Block-wise 8-bit storage of a moving average, with a logarithmic code book.

Each leaf is cut into blocks along its last axis; a block keeps one float32 scale, the largest
magnitude in it, and one byte per element. The second moment is non-negative and spans many
orders of magnitude, and what matters to RMSprop is its relative error (the step is
:math:`g/\sqrt{\nu}`), so the code book is logarithmic, which makes the relative error the
same at every magnitude:

.. math::

    \nu = s \cdot 2^{-(255 - c)\,h}, \quad c = 1, \dots, 255, \quad h = 40 / 254,

and :math:`c = 0` is exactly 0. The codes cover 12 orders of magnitude below the block's
largest value, :math:`2^{-40} \approx 9 \times 10^{-13}`, in steps of 11.5%. The first moment
(`mu` of centered RMSprop) is signed: a sign and 127 logarithmic levels over :math:`2^{-20}`
of the block's largest magnitude (whose square again spans 12 orders).

Rounding between the two neighbouring codes is stochastic and unbiased,
:math:`E[\mathrm{decode}(\mathrm{encode}(x))] = x`, for the reason given in
:mod:`rmsprop_jax._storage_bf16`: a moving average moves by far less than one code step per
update. Values below the smallest code round to it or to 0, still unbiased; exact zeros stay
exactly zero. The noise does not pile up with the number of steps: an update moves the average
by a fraction :math:`1-\beta` of its distance to :math:`x`, and the code moves with a
probability proportional to that, so the stored value wanders over the codes next to the exact
average. For a constant :math:`x` its relative spread is 4.4% at decay 0.9 as at 0.99 (0.23%
for bfloat16), which RMSprop sees halved in :math:`\sqrt{\nu}`.

With centering, the rounding of `mu` (up to 11.6% of :math:`|\mu|`) adds to the variance
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
from typing import Any, NamedTuple

import chex
import jax.numpy as jnp
import numpy as np

from rmsprop_jax import _rounding_noise, _sharded_ops

BLOCK_SIZE = 256
MIN_ELEMENTS = 4096
_UNSIGNED_TOP, _UNSIGNED_SPAN_LOG2 = 255, 40.0
_SIGNED_TOP, _SIGNED_SPAN_LOG2 = 127, 20.0


class QuantizedArray(NamedTuple):
    """A block-wise 8-bit array: codes shaped like the leaf, one float32 scale per block."""

    codes: chex.Array  # uint8 for a non-negative code book, int8 for a signed one.
    scales: chex.Array  # float32, shape (*leaf.shape[:-1], blocks): each block's largest |x|.


def compresses(leaf: chex.Array) -> bool:
    return np.size(leaf) >= MIN_ELEMENTS


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


def _code_book(signed: bool) -> tuple[int, float]:
    top, span = (_SIGNED_TOP, _SIGNED_SPAN_LOG2) if signed else (_UNSIGNED_TOP, _UNSIGNED_SPAN_LOG2)
    return top, span / (top - 1)


def _exp2(codes_from_top: chex.Array, step: float) -> chex.Array:
    """`2 ** (codes_from_top * step)`: XLA's CPU exp is vectorized and its exp2 is not (8x)."""
    return jnp.exp(codes_from_top * (step * math.log(2)))


def _level(magnitude_code: chex.Array, top: int, step: float) -> chex.Array:
    """The magnitude, relative to the block scale, that a code in [0, top] stands for."""
    code = magnitude_code.astype(jnp.float32)
    return jnp.where(code > 0, _exp2(code - top, step), 0.0)


def encode(x: chex.Array, seed: chex.Array, *, signed: bool) -> QuantizedArray:
    """Quantizes `x` (non-negative unless `signed`) with unbiased stochastic rounding.

    `seed` (uint32) selects the rounding bits, see :mod:`rmsprop_jax._rounding_noise`.
    """
    top, step = _code_book(signed)
    x = x.astype(jnp.float32)
    uniform = _to_blocks(_rounding_noise.uniform(seed, x))
    blocks = _to_blocks(x)
    magnitude = jnp.abs(blocks)
    scales = jnp.max(magnitude, axis=-1)
    relative = magnitude / jnp.where(scales > 0, scales, 1)[..., None]
    # log2(0) = -inf clips to code 0, whose level is exactly 0: zeros stay zeros.
    lower = jnp.clip(jnp.floor(top + jnp.log2(relative) / step), 0, top)
    # Neighbouring levels are a factor 2**step apart, so one exponential gives both. Past the top
    # code, `relative <= 1` makes the probability of rounding up 0.
    level = _exp2(lower - top, step)
    low, high = jnp.where(lower > 0, level, 0.0), level * 2.0**step
    round_up_probability = jnp.clip((relative - low) / (high - low), 0, 1)
    codes = lower + (uniform < round_up_probability)
    if signed:
        codes = _from_blocks(jnp.where(blocks < 0, -codes, codes), x).astype(jnp.int8)
    else:
        codes = _from_blocks(codes, x).astype(jnp.uint8)
    return QuantizedArray(codes=codes, scales=scales)


def decode(stored: QuantizedArray, dtype: Any) -> chex.Array:
    """The array `stored` stands for, in `dtype`."""
    signed = stored.codes.dtype == jnp.int8
    top, step = _code_book(signed)
    codes = _to_blocks(stored.codes.astype(jnp.int32))
    magnitude = _level(jnp.abs(codes), top, step) * stored.scales[..., None]
    values = jnp.where(codes < 0, -magnitude, magnitude) if signed else magnitude
    return _from_blocks(values, stored.codes).astype(dtype)


def init(leaf: chex.Array, value: Any, *, signed: bool) -> QuantizedArray:
    """`value` everywhere, exactly: the top code with scale |value| (or code 0 for 0).

    Built from `jnp.full_like(leaf, ...)`, so a sharded `leaf` gives sharded codes and scales.
    """
    value = jnp.asarray(value, jnp.float32)
    top = _SIGNED_TOP if signed else _UNSIGNED_TOP
    code = jnp.where(value != 0, top, 0) * jnp.where(value < 0, -1, 1)
    magnitude = jnp.full_like(leaf, jnp.abs(value), dtype=jnp.float32)
    return QuantizedArray(
        codes=jnp.full_like(leaf, code, dtype=jnp.int8 if signed else jnp.uint8),
        # Every block starts with an element of the leaf. A slice, not a max: XLA would spend
        # seconds folding a reduction over a large constant when `init` is jitted.
        scales=_sharded_ops.first_along(_to_blocks(magnitude), -1),
    )


def update(
    stored: QuantizedArray, x: chex.Array, decay: Any, seed: chex.Array
) -> tuple[QuantizedArray, chex.Array]:
    """`decay * stored + (1 - decay) * x` in `x`'s dtype; returns (quantized, unquantized)."""
    average = decay * decode(stored, x.dtype) + (1 - decay) * x
    return encode(average, seed, signed=stored.codes.dtype == jnp.int8), average
