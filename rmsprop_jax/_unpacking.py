"""Reading packed leaves back out of their buffers, so that same-shaped leaves share a kernel.

The updates of the leaves :func:`rmsprop_jax.pack_small_leaves` packs come out of the wrapped
transformation as one vector per dtype; each leaf is the slice `buffer[start:start + size]`
of it. Written with constant starts, every slice is fused (with the parameter update that
reads it) into a kernel of its own: the start is part of the kernel's code, so XLA compiles
one kernel per leaf, where the unpacked step's same-shaped leaves share one compiled kernel.
At 2048 leaves of 512 elements that made the packed step take about 4x as long to compile as
the unpacked one (benchmarks/README.md, "Grouping leaves").

Here the starts reach the slicing kernels as run-time values
(:func:`rmsprop_jax._runtime_integers.integers`), so each leaf is a `dynamic_slice` whose start
is an argument of its kernel; kernels of leaves with the same shape, dtype and buffer are then
the same code, and XLA compiles it once (on CPU with JAX 0.7.2 or newer; elsewhere the starts
stay constants). Paired with constant starts on the same trees, the step time did not change
beyond noise (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rmsprop_jax import _runtime_integers


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
    for i, start, size in zip(
        packed_leaves, _runtime_integers.integers(starts, witness), sizes, strict=True
    ):
        values = lax.dynamic_slice(packed[slots[i].buffer], (start,), (size,))
        out[i] = values.reshape(slots[i].shape).astype(jnp.result_type(like[i]))
    return out
