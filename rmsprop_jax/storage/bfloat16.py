r"""bfloat16 storage of a moving average, rounded stochastically so that small increments survive.

A moving average with decay β changes by a fraction (1 - β) of itself per step, while bfloat16
keeps 8 significant bits: a relative change under 2⁻⁹ (0.2%) is lost entirely by
round-to-nearest, so with `decay=0.999` the stored average would freeze at its first value.
Stochastic rounding rounds up with probability equal to the distance to the lower neighbour, so
the stored value is unbiased, E[round(x)] = x, and the average keeps moving in expectation. The
rounding bits are a pure function of the step count, the leaf's position in the tree and the
element's index (:mod:`rmsprop_jax.storage._rounding`), so a run is reproducible, resumes from a
checkpoint exactly, needs no random key in the state, and does not depend on how a leaf is
sharded.

The step divides by the stored (rounded) average, within 2⁻⁸ of the exact one: the new array
then depends on the old one only, and the step on the new one, so the donated array is
overwritten in place without a copy of the old one.

Compensated (Kahan) summation would avoid the noise but needs a second buffer, giving up the
memory the format exists to save.

Differentiating through an update (meta-learning the decay, say) treats the rounding as the
identity, a straight-through estimator: since the rounding is unbiased, that is the derivative
of the expected stored value. The derivatives are then those of float32 storage, evaluated
along the rounded trajectory, and they flow through the stored state from step to step.

References:
  Gupta et al., `Deep Learning with Limited Numerical Precision
  <https://arxiv.org/abs/1502.02551>`_, 2015.
  Zamirai et al., `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_, 2020.
"""

from __future__ import annotations

from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
from jax import lax

from rmsprop_jax.storage import _rounding
from rmsprop_jax.storage._format import Parts, StorageFormat


@jax.custom_jvp
def stochastic_round(x: chex.Array, seed: chex.Array) -> chex.Array:
    """Rounds `x` to bfloat16, up or down with probabilities that make the result unbiased.

    A float32 is a bfloat16 followed by 16 more mantissa bits. Adding 16 uniform random bits to
    those and truncating carries into the kept bits with probability equal to the dropped
    fraction. Zeros stay exactly zero (nothing carries), infinities stay infinite, NaN stays
    NaN.
    """
    x = x.astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    noise = _rounding.bits(seed, x) >> 16
    kept = ((bits + noise) >> 16).astype(jnp.uint16)
    rounded = lax.bitcast_convert_type(kept, jnp.bfloat16)
    # A NaN whose mantissa is all ones would carry into the sign bit and become -0.
    return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), rounded)


@stochastic_round.defjvp
def _stochastic_round_jvp(primals: Any, tangents: Any) -> tuple[chex.Array, chex.Array]:
    # Straight through: the derivative of E[round(x)] = x (bit operations have none).
    x, seed = primals
    x_dot, _ = tangents
    return stochastic_round(x, seed), jnp.asarray(x_dot, jnp.float32).astype(jnp.bfloat16)


class BFloat16(StorageFormat):
    """One bfloat16 array per real leaf, rounded stochastically; complex leaves stay dense."""

    name: ClassVar[str] = "bfloat16"

    def compresses(self, shape: tuple[int, ...], dtype: Any, *, signed: bool) -> bool:
        del shape, signed
        return not jnp.issubdtype(dtype, jnp.complexfloating)

    def create(self, like: Any, value: Any, *, signed: bool) -> Parts:
        del signed
        return (jnp.full_like(like, value, dtype=jnp.bfloat16),)

    def decode(self, parts: Parts, dtype: Any) -> chex.Array:
        return parts[0].astype(dtype)

    def encode(self, x: chex.Array, seed: chex.Array, *, signed: bool) -> Parts:
        del signed
        return (stochastic_round(x, seed),)


FORMAT = BFloat16()
