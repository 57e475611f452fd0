r"""Block-wise 8-bit storage of a moving average, with codes taken from float32 bit patterns.

Each leaf is cut into blocks along its last axis; a block keeps one float32 scale, no smaller
than its largest finite magnitude, and one byte per element. The second moment is non-negative
and spans many orders of magnitude, and what matters to RMSprop is its relative error (the step
is g/√ν), so the code book is logarithmic-like: the levels are the float32 numbers with 3
mantissa bits, 8 evenly spaced per octave, counted down from the block scale,

.. math::

    \nu = s \cdot (1 + m/8) \cdot 2^{e}, \quad 8e + m = c - 253, \quad c = 1, \dots, 253,
    \ 0 \le m < 8,

so code 253 is the scale itself and code 1 is 1.5·2⁻³² ≈ 3.5·10⁻¹⁰ of it (9.5 orders of
magnitude); c = 0 is exactly 0, and the codes 254 and 255 stand for +∞ and NaN. Neighbouring
levels are 1/8 (just above a power of two) to 1/15 of the lower one apart, so a value in range
is stored within 12.5% of itself. The first moment (`mu` of centered RMSprop) is signed: a sign
and 126 levels down to 1.375·2⁻¹⁶ ≈ 2.1·10⁻⁵ of the block scale (4.7 orders; its
square spans 9.4), with 127, -127 and -128 for +∞, -∞ and NaN.

The codes are integer work on the bits of x/s: the level of code c is the float32 whose bits are
(c + 763) << 20 ((c + 890) << 20 signed), and a value is coded by adding 20 random bits below
its 3 kept mantissa bits and truncating. No logarithm or exponential is evaluated, which made
the step several times slower on CPUs.

Non-finite values are kept per element and take no part in the block scale: one element whose
squared gradient overflowed (or whose gradient was NaN) keeps its own non-finite average, as
float32 storage would, and the 255 others of its block are stored as if it were not there.

Rounding between the two neighbouring levels is stochastic and unbiased, E[decode(encode(x))]
= x, for the reason given in :mod:`rmsprop_jax.storage.bfloat16`: a moving average moves by far
less than one level per update. Within an octave the levels are evenly spaced, so adding uniform
bits below the kept ones and truncating rounds up with probability equal to the dropped
fraction. Below the smallest level, a signed value rounds to it or to 0, still unbiased; a
second moment is stored as the smallest level (never 0 unless it is 0), because the step divides
by it. Exact zeros stay exactly zero. The noise does not pile up with the number of steps: an
update moves the average by a fraction 1 - β of its distance to x, and the code moves with a
probability proportional to that, so the stored value wanders over the levels next to the exact
average: for a constant x its relative spread is 3.6% at decay 0.9 as at 0.99. RMSprop's step
divides by the stored average, so it sees that noise halved in √ν.

With centering, the rounding of `mu` (up to 12.5% of |μ|) adds to the variance estimate through
(g - μ)²: when gradients are far larger than their noise, the variance is overestimated and
steps come out smaller than with float32, a bias towards caution rather than towards a blow-up.

Block layout: a last axis of length n is split into the fewest 2ʲ equal blocks of at most 256
elements (256 for every power-of-two multiple of 256, 192 for 768 or 3072). A leaf whose last
axis is sharded into any power-of-two number of shards up to 2ʲ thus holds whole blocks on every
shard, and block scales are computed without communication. When 2ʲ does not divide n, blocks
are 256 long and the last one is zero-padded during the computation (the stored codes keep the
leaf's shape). Leaves under 4096 elements are not quantized: their scales would cost more than
they save.

Block scales: an encoding from scratch (:func:`encode`) takes each block's largest finite
magnitude. An update, ν_t = β ν_{t-1} + (1 - β) x, takes the same average of the largest finite
magnitudes of the two terms (:func:`_scales_after`),

.. math::

    s_t = \beta \max_{\text{block}} |\nu_{t-1}| + (1 - \beta) \max_{\text{block}} |x|
    \ \ge \max_{\text{block}} |\nu_t|,

computed from the stored codes and `x` alone, before the new average exists. For a
non-negative average (the second moment) each term is at most the new largest magnitude, so
the scale is at most twice it: the code book then reaches down at least 9.2 orders of magnitude
below the block's largest value instead of 9.5; relative errors are unchanged. For the signed
`mu` a gradient opposing the old average makes the scale larger than the new values by the
factor of the cancellation, for that step: the next one starts from the codes' largest value.
The scale depends only on the block's own elements, so the update of a block does not depend
on the rest of the leaf (or on how it is sharded or chunked).

An update is two passes over the leaf that write nothing its size but the new codes: one
variadic reduction (the largest finite |x| and the largest finite code of each block, into
which XLA fuses whatever computes `x`; centered, one reduction serves both the variance and
`mu`, see :func:`finite_maxima`), then the codes, each from its old code, its `x` and its
block's two scales (the new scales and their inverses are written once per block, not computed
again for each element), written in place of the old ones. The new average is never written in
float32 (an exact block maximum of it would have been: the reduction and the encoding both read
it). The step then reads the new codes back. With JAX releases before 0.7.2, which run this
update several times slower than a float32 step, leaves of two or more axes are updated a chunk
of rows at a time (:mod:`rmsprop_jax.storage._rows`) with the same result.

References:
  Dettmers et al., `8-bit Optimizers via Block-wise Quantization
  <https://arxiv.org/abs/2110.02861>`_, 2022.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from rmsprop_jax import _jax_compat, _sharded_ops
from rmsprop_jax.storage import _rounding
from rmsprop_jax.storage._format import Parts, StorageFormat, moving_average

BLOCK_SIZE = 256
MIN_ELEMENTS = 4096
# The first JAX release measured to run the two-pass update (`Int8.update`) of a large leaf
# faster than its row chunks; 0.5.3 and 0.6.2 ran it at about twice the chunks' time.
ONE_PASS_FROM = (0, 7, 2)


class _CodeBook(NamedTuple):
    top: int  # the largest level code; it stands for the block scale itself.
    offset: int  # level code c stands for the float32 whose bits are (c + offset) << 20.
    inf: int  # the code of +inf (its negative is -inf for a signed book).
    nan: int
    dtype: Any


# The float32 1.0 has bits 127 << 23 = (127 * 8) << 20: the top code decodes to 1.0 (times the
# block scale), 8 codes per octave below it.
_UNSIGNED = _CodeBook(top=253, offset=127 * 8 - 253, inf=254, nan=255, dtype=jnp.uint8)
_SIGNED = _CodeBook(top=126, offset=127 * 8 - 126, inf=127, nan=-128, dtype=jnp.int8)
_MANTISSA_SHIFT = 20  # 23 mantissa bits of a float32, 3 kept.


class QuantizedMoment(NamedTuple):
    """An int8-stored moving average: one tree per part, each shaped like the parameters.

    Per parameter leaf, either `codes` (shaped like the leaf; uint8, or int8 for the signed
    `mu`) and `scales` (float32, shape `(*leaf.shape[:-1], blocks)`: each block's scale, no
    smaller than its largest finite magnitude) with a placeholder in `dense`, or, for a leaf
    too small to compress, the average itself in `dense` with placeholders in `codes` and
    `scales`.

    Examples:
      >>> params = {"w": jnp.ones((64, 256)), "b": jnp.ones(8)}
      >>> nu = rj.rmsprop(1e-3, moment_storage="int8").init(params)[2].nu
      >>> nu.codes["w"].dtype, nu.codes["w"].shape, nu.scales["w"].shape, nu.dense["b"].shape
      (dtype('uint8'), (64, 256), (64, 1), (8,))
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


def _level(magnitude_code: chex.Array, book: _CodeBook) -> chex.Array:
    """The level (a fraction of the block scale, in (0, 1]) of codes 1..top: integer work only."""
    bits = (magnitude_code + book.offset).astype(jnp.uint32) << _MANTISSA_SHIFT
    return lax.bitcast_convert_type(bits, jnp.float32)


def _smallest_level(book: _CodeBook) -> float:
    return float(np.array((1 + book.offset) << _MANTISSA_SHIFT, np.uint32).view(np.float32))


def block_anchor(param: chex.Array) -> chex.Array:
    """A slice of `param` shaped like its block scales: each block's first element."""
    return _to_blocks(param)[..., 0]


def block_scales(blocks: chex.Array) -> chex.Array:
    """Each block's largest finite magnitude (0 for a block with none)."""
    return jnp.max(_finite_magnitude(blocks), axis=-1)


def _finite_magnitude(x: chex.Array) -> chex.Array:
    """|x|, and 0 where `x` is not finite: what a block scale is the largest of."""
    return jnp.where(jnp.isfinite(x), jnp.abs(x), 0)


def _inverse(scales: chex.Array) -> chex.Array:
    """1 / scale, and 0 (1 / ∞) for a block of zeros. A division: XLA writes it once rather
    than computing it again for every element that reads it (see :func:`_written_once`)."""
    return 1 / jnp.where(scales > 0, scales, jnp.inf)


def _written_once(per_block: chex.Array) -> chex.Array:
    """`per_block` (finite) unchanged, as its remainder by +∞, so that XLA writes it once.

    XLA copies a cheap elementwise producer into every kernel that reads it: a per-block
    array computed from a reduction (a new block scale) and read by the kernels of the whole
    leaf would be computed again for every element, some 15 operations each (measured: the
    plain int8 step 9% slower). A remainder is an operation XLA does not copy into its readers.
    """
    return lax.rem(per_block, jnp.asarray(jnp.inf, per_block.dtype))


def _per_element(per_block: chex.Array, like: chex.Array) -> chex.Array:
    """An array shaped like the block scales of `like`, spread to `like`'s shape: each element
    gets its block's entry. Computed elementwise, so that XLA reads `like`-shaped arrays in
    their own shape (a fusion that reads them through the blocked view cannot write a result
    in place of one of them)."""
    _, block_length = block_layout(like.shape[-1])
    spread = jnp.broadcast_to(per_block[..., None], (*per_block.shape, block_length))
    return _from_blocks(spread, like)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _codes(
    x: chex.Array, inverse: chex.Array, bits: chex.Array, book: _CodeBook, signed: bool
) -> chex.Array:
    """The codes of `x` (float32) given 1 / its block scale (broadcast against `x`), in the
    code book's dtype. Not differentiable (see :func:`_codes_jvp`)."""
    relative = (jnp.abs(x) if signed else x) * inverse  # A second moment is not negative.
    smallest = _smallest_level(book)
    # Within an octave the levels are evenly spaced, 2**-20 units of the kept bits apart:
    # adding 20 uniform bits below them and truncating rounds up with probability equal to
    # the dropped fraction (as bfloat16's stochastic rounding does).
    field = (lax.bitcast_convert_type(relative, jnp.uint32) + (bits >> 12)) >> _MANTISSA_SHIFT
    in_range = jnp.minimum(field.astype(jnp.int32) - book.offset, book.top)
    if signed:
        # Below the smallest level: that level with probability relative / smallest, else 0.
        uniform = (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24 * smallest)
        below = (uniform < relative).astype(jnp.int32)
        codes = jnp.where(relative >= smallest, in_range, below)
        codes = jnp.where(jnp.isinf(x), book.inf, codes)
        codes = jnp.where(x < 0, -codes, codes)
    else:
        # A second moment is never rounded to 0 unless it is 0 (the step divides by it):
        # below the smallest level (where `in_range` < 1), the smallest level.
        codes = jnp.where(relative > 0, jnp.maximum(in_range, 1), 0)
        codes = jnp.where(x == jnp.inf, book.inf, codes)
    # The last operation has two inputs the size of the leaf (not a conversion of one): XLA
    # then writes its result once and lets every reader read it (the step reads the codes
    # an update writes), rather than computing it again inside each reader.
    return jnp.where(jnp.isnan(x), book.nan, codes.astype(book.dtype))


@_codes.defjvp
def _codes_jvp(book: _CodeBook, signed: bool, primals: Any, tangents: Any) -> Any:
    del book, signed, primals, tangents
    raise TypeError(
        "An update with moment_storage='int8' was differentiated (jax.grad, jax.jvp, ...) with "
        "respect to something its stored average depends on (gradients, decay, parameters): "
        "the average is stored as integer codes, which carry no derivative, so the result "
        "would silently leave out every path through it. To differentiate through updates, "
        "use moment_storage='float32', or 'bfloat16' (differentiated as if its rounding were "
        "exact)."
    )


def _values(code: chex.Array, scale: chex.Array, book: _CodeBook) -> chex.Array:
    """What `code` (int32) stands for, given its block's scale (broadcast against it)."""
    magnitude_code = jnp.abs(code) if book is _SIGNED else code
    level = jnp.where(magnitude_code > 0, _level(magnitude_code, book), 0)
    magnitude = jnp.where(magnitude_code == book.inf, jnp.inf, level * scale)
    values = jnp.where(code < 0, -magnitude, magnitude) if book is _SIGNED else magnitude
    return jnp.where(code == book.nan, jnp.nan, values)


def encode(x: chex.Array, seed: chex.Array, *, signed: bool) -> tuple[chex.Array, chex.Array]:
    """Quantizes `x` (non-negative unless `signed`) with unbiased stochastic rounding.

    Returns (codes, scales), each block's scale its largest finite magnitude. `seed` (uint32)
    selects the rounding bits, see :mod:`rmsprop_jax.storage._rounding`.
    """
    book = _SIGNED if signed else _UNSIGNED
    x = x.astype(jnp.float32)
    blocks = _to_blocks(x)
    scales = block_scales(blocks)
    bits = _to_blocks(_rounding.bits(seed, x))
    codes = _codes(blocks, _inverse(scales)[..., None], bits, book, signed)
    return _from_blocks(codes, x), scales


def decode(codes: chex.Array, scales: chex.Array, dtype: Any) -> chex.Array:
    """The array that `codes` and `scales` stand for, in `dtype`."""
    book = _SIGNED if codes.dtype == jnp.int8 else _UNSIGNED
    values = _values(_to_blocks(codes.astype(jnp.int32)), scales[..., None], book)
    return _from_blocks(values, codes).astype(dtype)


def finite_maxima(
    averages: list[tuple[chex.Array, chex.Array, bool]],
) -> list[tuple[chex.Array, chex.Array]]:
    """For each (x, codes, signed) of leaves of one shape: per block, the largest finite |x|
    and the largest magnitude of a code of `codes` that stands for a finite value (0 where
    there is none), all in one pass over them.

    One variadic reduction: XLA fuses the elementwise work on each `x` (which may be computed
    from other arrays) into it and writes nothing the size of the leaf. (A reduction of one
    operand is taken by XLA:CPU's library fusions, which leave a select or a bitcast producer
    outside, written whole.) The averages of one leaf that a step updates together (the
    centered variance and `mu`) share it: their common inputs are read once.
    """
    operands: list[chex.Array] = []
    for x, codes, signed in averages:
        # A block scale is a choice of code book, not differentiated (nor differentiable:
        # JAX has no derivative for variadic reductions); the codes refuse instead (`_codes`).
        x = lax.stop_gradient(x)
        book = _SIGNED if signed else _UNSIGNED
        blocks = _to_blocks(x.astype(jnp.float32))
        code = jnp.abs(_to_blocks(codes.astype(jnp.int32)))
        operands += [_finite_magnitude(blocks), jnp.where(code <= book.top, code, 0)]
    reduced = lax.reduce(
        tuple(operands),
        (jnp.float32(0), jnp.int32(0)) * len(averages),
        lambda a, b: tuple(jnp.maximum(p, q) for p, q in zip(a, b, strict=True)),
        (operands[0].ndim - 1,),
    )
    return [(reduced[i], reduced[i + 1]) for i in range(0, len(reduced), 2)]


def _scales_after(
    codes: chex.Array,
    scales: chex.Array,
    x: chex.Array,
    decay: Any,
    book: _CodeBook,
    maxima: tuple[chex.Array, chex.Array] | None = None,
) -> chex.Array:
    """The block scales of the new average `decay * old + (1 - decay) * x`: the same average
    of the largest finite magnitudes of the old average and of `x`, a bound on the largest
    finite magnitude of the new one (at most twice it for a non-negative average). `maxima`,
    where given, are those of :func:`finite_maxima` for `x` and `codes`."""
    if maxima is None:
        (maxima,) = finite_maxima([(x, codes, book is _SIGNED)])
    x_max, code_max = maxima
    old_max = jnp.where(code_max > 0, _level(code_max, book), 0) * scales
    new = moving_average(old_max, x_max, decay).astype(jnp.float32)
    return _written_once(jnp.minimum(new, jnp.finfo(jnp.float32).max))


class Int8(StorageFormat):
    """Block-wise 8-bit codes (3 mantissa bits) for leaves of at least 4096 elements."""

    name: ClassVar[str] = "int8"
    container: ClassVar[type] = QuantizedMoment
    # Centered, `mu` as bfloat16 rather than 8-bit codes: 1 byte per parameter more, but the
    # update neither decodes nor encodes it, nor takes its block maxima (centered with
    # momentum, the step 15-18% shorter in benchmarks/memory.py's record).
    # `first_moment_storage="int8"` keeps the codes.
    first_moment_name: ClassVar[str] = "bfloat16"
    updates_in_row_chunks: ClassVar[bool] = _jax_compat.JAX_VERSION < ONE_PASS_FROM

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

    def update(
        self,
        parts: Parts,
        x: chex.Array,
        decay: Any,
        seed: chex.Array,
        *,
        signed: bool,
        block_maxima: Any = None,
    ) -> tuple[Parts, chex.Array]:
        """Folds `x` into the average in two passes over the leaf, writing nothing its size
        but the new codes: the new block scales (:func:`_scales_after`, one reduction, or
        `block_maxima` from a reduction shared with another average, see
        :func:`finite_maxima`), then the codes, each computed from its old code, its element
        of `x` and the two scales of its block (written in place of the old codes)."""
        book = _SIGNED if signed else _UNSIGNED
        codes, scales = parts
        new_scales = _scales_after(codes, scales, x, decay, book, block_maxima)
        old = _values(codes.astype(jnp.int32), _per_element(scales, codes), book)
        average = moving_average(old.astype(x.dtype), x, decay).astype(jnp.float32)
        inverse = _per_element(_inverse(new_scales), codes)
        # The step decodes the codes just written; XLA does not compute them again inside the
        # step (see `_codes`), from the old codes, which would then have to be copied before
        # being overwritten.
        new_codes = _codes(average, inverse, _rounding.bits(seed, codes), book, signed)
        return (new_codes, new_scales), decode(new_codes, new_scales, x.dtype)

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
