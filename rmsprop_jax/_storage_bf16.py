r"""bfloat16 storage of a moving average, rounded stochastically so that small increments survive.

A moving average with decay :math:`\beta` changes by a fraction :math:`(1-\beta)` of itself
per step, while bfloat16 keeps 8 significant bits: a relative change under :math:`2^{-9}`
(0.2%) is lost entirely by round-to-nearest, so with `decay=0.999` the stored average would
freeze at its first value. Stochastic rounding rounds up with probability equal to the
distance to the lower neighbour, so the stored value is unbiased,
:math:`E[\mathrm{round}(x)] = x`, and the average keeps moving in expectation. The rounding
bits are a pure function of the step count, the leaf's position in the tree and the element's
index (:mod:`rmsprop_jax._rounding_noise`), so a run is reproducible, resumes from a checkpoint
exactly, needs no random key in the state, and does not depend on how a leaf is sharded.

Compensated (Kahan) summation would avoid the noise but needs a second buffer, giving up the
memory the format exists to save.

References:
  Gupta et al., `Deep Learning with Limited Numerical Precision
  <https://arxiv.org/abs/1502.02551>`_, 2015.
  Zamirai et al., `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_, 2020.
"""

from __future__ import annotations

from typing import Any

import chex
import jax.numpy as jnp
from jax import lax

from rmsprop_jax import _rounding_noise


def stochastic_round(x: chex.Array, seed: chex.Array) -> chex.Array:
    """Rounds `x` to bfloat16, up or down with probabilities that make the result unbiased.

    A float32 is a bfloat16 followed by 16 more mantissa bits. Adding 16 uniform random bits to
    those and truncating carries into the kept bits with probability equal to the dropped
    fraction. Zeros stay exactly zero (nothing carries), infinities stay infinite, NaN stays
    NaN.
    """
    x = x.astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    noise = _rounding_noise.bits(seed, x) >> 16
    kept = ((bits + noise) >> 16).astype(jnp.uint16)
    rounded = lax.bitcast_convert_type(kept, jnp.bfloat16)
    # A NaN whose mantissa is all ones would carry into the sign bit and become -0.
    return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), rounded)


def init(leaf: chex.Array, value: Any) -> chex.Array:
    """A bfloat16 array shaped (and, when `leaf` is a sharded array, sharded) like `leaf`."""
    return jnp.full_like(leaf, value, dtype=jnp.bfloat16)


def decode(stored: chex.Array, dtype: Any) -> chex.Array:
    return stored.astype(dtype)


def update(
    stored: chex.Array, x: chex.Array, decay: Any, seed: chex.Array
) -> tuple[chex.Array, chex.Array]:
    """`decay * stored + (1 - decay) * x` in `x`'s dtype; returns (rounded, unrounded)."""
    average = decay * decode(stored, x.dtype) + (1 - decay) * x
    return stochastic_round(average, seed), average
