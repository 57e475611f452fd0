"""Integers that reach the compiled step as run-time values, so that kernels differing only in
them are one piece of code.

A kernel that reads a constant (where a packed leaf starts in its buffer, which leaf's rounding
seed to take) has the constant written into its code: XLA then compiles one kernel per leaf,
where same-shaped leaves would otherwise share one. With many leaves that multiplies the
compile time: a bfloat16 step of 512 leaves compiled in 11 s instead of 2.8 s, and a step packing
2048 leaves in 25.9 s where the unpacked step took 6.7 s (benchmarks/README.md).

Here the integers are the results of a `jax.lax.cond` whose predicate (is the first element of
`witness` NaN?) is known only when the step runs and whose branches both return the same
constants. XLA can fold neither the condition nor its results, so a kernel that reads such an
integer takes it as an argument, and the kernels of same-shaped leaves are the same code, which
XLA compiles once. XLA copies each result of a conditional into place on every step, a few
microseconds each on CPU, so each integer is the sum of two results, the first of its chunk of
about sqrt(n) integers and its offset from it: n integers cost about 2 sqrt(n) results.

This applies on CPU only (through :func:`jax.lax.platform_dependent`, chosen when the step is
lowered): a GPU runs a conditional by copying its predicate to the host and waiting for it,
which would stall every step, so other platforms get constants. So do JAX releases before
0.7.2: their XLA compiles even identical kernels one by one, and there run-time integers only
cost time (JAX 0.5.3, 512 packed leaves: 1.26x the compile time and 1.10x the step time of
constants).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rmsprop_jax import _jax_compat

# The integers are int32 (JAX's default integer width); past this they stay constants.
_MAX = np.iinfo(np.int32).max
# The oldest JAX measured whose CPU compiler shares identical kernels (0.6.2 does not).
SHARED_KERNELS_FROM = (0, 7, 2)


def _constants(values: Sequence[int]) -> tuple[jax.Array, ...]:
    return tuple(jnp.int32(value) for value in values)


def _run_time(values: Sequence[int], witness: jax.Array) -> tuple[jax.Array, ...]:
    chunk = max(1, math.isqrt(len(values)))
    bases = [values[i - i % chunk] for i in range(len(values))]
    offsets = [value - base for value, base in zip(values, bases, strict=True)]
    distinct = sorted(set(bases) | set(offsets))
    constants = tuple(np.int32(value) for value in distinct)
    first = jnp.ravel(witness)[0]
    if not jnp.issubdtype(first.dtype, jnp.inexact):
        # A float (complex ones stay complex), so that XLA cannot rewrite `first != first`
        # as False.
        first = first.astype(jnp.float32)
    # True only for a NaN. Both branches return the same constants, but XLA cannot know which
    # branch runs, so it cannot put the constants in the place of the results.
    results = lax.cond(first != first, lambda: constants, lambda: constants)
    result = {value: results[i] for i, value in enumerate(distinct)}
    return tuple(result[base] + result[offset] for base, offset in zip(bases, offsets, strict=True))


def integers(values: Sequence[int], witness: jax.Array | None) -> tuple[jax.Array, ...]:
    """`values` as int32 scalars that XLA cannot fold into the kernels that read them.

    Args:
      values: non-negative integers.
      witness: an array with an element, known only when the step runs (a gradient, the step
        count); only its first element is read, on CPU, to make a condition XLA cannot
        evaluate while compiling. None gives constants.

    Returns:
      One int32 scalar per value: on CPU with JAX 0.7.2 or newer computed at run time (see the
      module docstring), elsewhere constants.

    Examples:
      >>> from rmsprop_jax import _runtime_integers
      >>> jax.jit(lambda g: _runtime_integers.integers([0, 3, 5], g))(jnp.ones(2))
      (Array(0, dtype=int32), Array(3, dtype=int32), Array(5, dtype=int32))
    """
    if not values or witness is None:
        return ()
    if max(values) > _MAX or _jax_compat.JAX_VERSION < SHARED_KERNELS_FROM:
        return _constants(values)
    return lax.platform_dependent(
        witness,
        cpu=lambda witness: _run_time(values, witness),
        default=lambda _: _constants(values),
    )
