"""Reading packed leaves back out of their buffers, so that same-shaped leaves share a kernel.

The updates of the leaves :func:`rmsprop_jax.pack_small_leaves` packs come out of the wrapped
transformation as one vector per dtype; each leaf is the slice `buffer[start:start + size]`
of it. Written with constant starts, every slice is fused (with the parameter update that
reads it) into a kernel of its own: the start is part of the kernel's code, so XLA compiles
one kernel per leaf, where the unpacked step's same-shaped leaves share one compiled kernel.
At 2048 leaves of 512 elements that made the packed step take about 4x as long to compile as
the unpacked one (benchmarks/README.md, "Grouping leaves").

Here the starts reach the slicing kernels as run-time values: they are the results of a
`jax.lax.cond` whose predicate (is the first packed gradient element NaN?) is known only when
the step runs and whose branches both return the same starts. XLA can fold neither the
condition nor the starts, so each leaf is a `dynamic_slice` whose start is an argument of its
kernel; kernels of leaves with the same shape, dtype and buffer are then the same code, and
XLA compiles it once. The cost at run time is one conditional, which reads one element and
returns constants (about 2 sqrt(n) of them for n leaves, each start being the sum of two), and
one scalar addition per leaf; paired with constant starts on the same trees, the step time
did not change beyond noise (benchmarks/README.md).

This applies on CPU only (through :func:`jax.lax.platform_dependent`, chosen when the step is
lowered): a GPU runs a conditional by copying its predicate to the host and waiting for it,
which would stall every step, so other platforms keep the constant starts. So do JAX releases
before 0.7.2: their XLA compiles even identical kernels one by one, and there run-time starts
only cost time (JAX 0.5.3, 512 leaves: 1.26x the compile time and 1.10x the step time of
constant starts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rmsprop_jax import _jax_compat

# Starts are int32 (JAX's default integer width); past this a buffer keeps constant starts.
_MAX_START = np.iinfo(np.int32).max
# The oldest JAX measured whose CPU compiler shares identical kernels (0.6.2 does not).
SHARED_KERNELS_FROM = (0, 7, 2)


def _constant_starts(starts: Sequence[int]) -> tuple[jax.Array, ...]:
    return tuple(jnp.int32(start) for start in starts)


def _runtime_starts(starts: Sequence[int], witness: jax.Array) -> tuple[jax.Array, ...]:
    """`starts` as int32 scalars that XLA cannot fold into the kernels that read them."""
    # XLA copies each result of a conditional into place on every step, a few microseconds
    # each on CPU. So each start is the sum of two results, the start of its chunk of about
    # sqrt(n) leaves and its offset within the chunk: for leaves of one size these take about
    # 2 sqrt(n) distinct values (90 at 2048 leaves), not n.
    chunk = max(1, math.isqrt(len(starts)))
    bases = [starts[i - i % chunk] for i in range(len(starts))]
    within = [start - starts[i - i % chunk] for i, start in enumerate(starts)]
    values = sorted(set(bases) | set(within))
    constants = tuple(np.int32(value) for value in values)
    first = jnp.ravel(witness)[0]
    # True only for a NaN. Both branches return the same constants, but XLA cannot know which
    # branch runs, so it cannot put the constants in the place of the results.
    results = lax.cond(first != first, lambda: constants, lambda: constants)
    result = {value: results[i] for i, value in enumerate(values)}
    return tuple(result[base] + result[offset] for base, offset in zip(bases, within, strict=True))


def leaf_starts(starts: Sequence[int], witness: jax.Array | None) -> tuple[jax.Array, ...]:
    """Where each packed leaf starts in its buffer, as scalars fit for `lax.dynamic_slice`.

    Args:
      starts: the offset of each packed leaf in its buffer, in elements.
      witness: a packed gradient leaf (any array with an element; None only when no leaf is
        packed); only its first element is read, on CPU, to make a condition XLA cannot
        evaluate while compiling.

    Returns:
      One int32 scalar per start: on CPU with JAX 0.7.2 or newer computed at run time (see
      the module docstring), elsewhere constants.
    """
    if not starts or witness is None:
        return ()
    if max(starts) > _MAX_START or _jax_compat.JAX_VERSION < SHARED_KERNELS_FROM:
        return _constant_starts(starts)
    return lax.platform_dependent(
        witness,
        cpu=lambda witness: _runtime_starts(starts, witness),
        default=lambda _: _constant_starts(starts),
    )


def unpack(
    packed: dict[str, jax.Array], slots: Sequence[Any], kept: Sequence[Any], like: Sequence[Any]
) -> list[Any]:
    """The leaves read back from `packed`: `kept[i]` where `slots[i]` was not packed.

    Args:
      packed: each buffer by name, as the wrapped transformation returned it.
      slots: the :class:`rmsprop_jax.grouping.LeafSlot` of each leaf, in tree order.
      kept: each leaf that was not packed (None where it was), in tree order.
      like: the gradient leaves, in tree order: each leaf read from a buffer gets the shape
        of its slot and the dtype of its gradient (a buffer holding float16 and float32
        gradients gives float16 updates for the former).

    Returns:
      The leaves, in tree order.
    """
    packed_leaves = [i for i, slot in enumerate(slots) if slot.buffer is not None]
    ends = dict.fromkeys(packed, 0)
    starts, sizes = [], []
    for i in packed_leaves:
        sizes.append(int(np.prod(slots[i].shape, dtype=int)))
        starts.append(ends[slots[i].buffer])
        ends[slots[i].buffer] += sizes[-1]
    witness = like[packed_leaves[0]] if packed_leaves else None
    out = list(kept)
    for i, start, size in zip(packed_leaves, leaf_starts(starts, witness), sizes, strict=True):
        values = lax.dynamic_slice(packed[slots[i].buffer], (start,), (size,))
        out[i] = values.reshape(slots[i].shape).astype(jnp.result_type(like[i]))
    return out
