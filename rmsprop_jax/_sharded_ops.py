"""Array operations that keep their inputs' shardings: reshapes of a sharded axis, ties.

With explicit sharding (`jax.sharding.AxisType.Explicit`, the default axis type of
`jax.make_mesh`), the sharding of every traced value is part of its type and JAX refuses to
guess the sharding of a reshape that splits or merges a sharded axis, and it would generate
random numbers replicated on every device unless told otherwise. These helpers say what the
result's sharding is. With automatic sharding, and eagerly, they are the plain operations
and the compiler's sharding propagation places the result; where it has nothing to go by
(a constant, or an axis padded and cut again), :func:`plus_zero_from` ties a value to an
array whose placement it should share.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rmsprop_jax import _jax_compat


def mesh_axis_types(x: Any) -> tuple | None:
    """The axis types of the mesh a traced value's type refers to; None for other values.

    A JAX without axis types (or a type without a sharding) reads as all-automatic: ().
    """
    if not isinstance(x, jax.core.Tracer):
        return None
    mesh = getattr(getattr(_jax_compat.typeof(x), "sharding", None), "mesh", None)
    return tuple(getattr(mesh, "axis_types", ()))


def is_auto_traced(x: Any) -> bool:
    """Whether `x` is traced with automatic sharding (its type carries no sharding)."""
    types = mesh_axis_types(x)
    return types is not None and all(_jax_compat.is_axis_type(t, "Auto") for t in types)


def plus_zero_from(anchor: jax.Array, value: jax.Array) -> jax.Array:
    """`value + 0`, with a 0 computed from `anchor`'s values, so placed like `anchor`.

    `(x != x) & (x == x)` is False for every x, NaN included, but no compiler folds it to a
    constant, so sharding propagation places the sum like `anchor` (of the same shape).
    `jax.experimental.shard_alike` does not do this job: ties between values of one shape
    are lowered once, into one sharding group, and equal constants (the zeros of two
    parameters' states) are merged, so differently sharded parameters would be forced to
    share one sharding.
    """
    zero = ((anchor != anchor) & (anchor == anchor)).astype(value.dtype)
    return value + zero


def explicit_sharding(x: Any) -> NamedSharding | None:
    """`x`'s sharding when it is traced with explicit sharding (part of its type), else None."""
    types = mesh_axis_types(x)
    if not types or not any(_jax_compat.is_axis_type(t, "Explicit") for t in types):
        return None
    return _jax_compat.typeof(x).sharding


def padded_spec(spec: PartitionSpec, ndim: int) -> tuple:
    """The entries of `spec` for an array of `ndim` axes (missing trailing entries are None)."""
    entries = tuple(spec)
    return entries + (None,) * (ndim - len(entries))


def axis_names(entry: Any) -> tuple[str, ...]:
    """The mesh axes of a `PartitionSpec` entry (None, a name, or a tuple of names)."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def as_entry(names: tuple[str, ...]) -> Any:
    """The `PartitionSpec` entry for mesh axes `names`: None, a name, or a tuple."""
    if not names:
        return None
    return names[0] if len(names) == 1 else tuple(names)


def shard_count(entry: Any, axis_sizes: dict[str, int]) -> int:
    """How many pieces a `PartitionSpec` entry cuts its axis into."""
    return int(np.prod([axis_sizes[name] for name in axis_names(entry)], dtype=int))


def split_entry(
    entry: Any, blocks: int, block_length: int, length: int, axis_sizes: dict[str, int]
) -> tuple[Any, Any]:
    """The entries of (blocks, block length) when an axis sharded as `entry` is split in two.

    The blocks take the longest leading run of the axis's mesh axes whose size divides the
    number of blocks, the positions within a block the rest, as sharding propagation does
    with a reshape; an axis that is padded first (`blocks * block_length != length`) or whose
    remaining mesh axes do not divide the block length is not sharded at all.
    """
    names = axis_names(entry)
    if blocks * block_length != length:
        return None, None
    leading, size = 0, 1
    while leading < len(names) and blocks % (size * axis_sizes[names[leading]]) == 0:
        size *= axis_sizes[names[leading]]
        leading += 1
    within = names[leading:]
    if block_length % shard_count(as_entry(within), axis_sizes):
        return as_entry(names[:leading]), None
    return as_entry(names[:leading]), as_entry(within)


def with_entries(sharding: Any, entries: tuple, what: str) -> Any:
    """`sharding` with its `PartitionSpec` replaced by `entries` (for a state leaf of another
    shape than its parameter: block scales, row or column statistics)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(
            sharding.mesh, PartitionSpec(*entries), memory_kind=sharding.memory_kind
        )
    if sharding.is_fully_replicated:
        return sharding
    raise TypeError(
        f"The {what} of a parameter sharded with {sharding!r} has another shape, so its "
        "sharding cannot be derived; use jax.sharding.NamedSharding for the parameters."
    )


def _explicit_context(x: Any) -> tuple[NamedSharding, list, Any, dict[str, int]] | None:
    sharding = explicit_sharding(x)
    if sharding is None:
        return None
    *leading, last = padded_spec(sharding.spec, x.ndim)
    return sharding, leading, last, dict(sharding.mesh.shape)


def first_along(x: jax.Array, axis: int) -> jax.Array:
    """`x`'s first entry along `axis` (removed): `x[..., 0]` for `axis=-1`.

    With explicit sharding, JAX slices only unsharded axes, so `axis` is gathered first.
    """
    sharding = explicit_sharding(x)
    if sharding is not None:
        entries = list(padded_spec(sharding.spec, x.ndim))
        if entries[axis] is not None:
            entries[axis] = None
            x = _jax_compat.reshard(x, _jax_compat.with_spec(sharding, PartitionSpec(*entries)))
    return jax.lax.index_in_dim(x, 0, axis % x.ndim, keepdims=False)


def split_last_axis(x: jax.Array, blocks: int, block_length: int) -> jax.Array:
    """(..., n) -> (..., blocks, block_length), zero-padding the end of the last axis.

    With explicit sharding, the result is sharded as :func:`split_entry` says, after
    gathering the mesh axes of the last axis that it leaves out.
    """
    padding = blocks * block_length - x.shape[-1]
    shape = (*x.shape[:-1], blocks, block_length)
    context = _explicit_context(x)
    if context is not None:
        sharding, leading, last, sizes = context
        outer, inner = split_entry(last, blocks, block_length, x.shape[-1], sizes)
        kept = as_entry(axis_names(outer) + axis_names(inner))
        if kept != last:
            x = _jax_compat.reshard(
                x, _jax_compat.with_spec(sharding, PartitionSpec(*leading, kept))
            )
    if padding:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padding)])
    if context is None:
        return x.reshape(shape)
    out_sharding = _jax_compat.with_spec(sharding, PartitionSpec(*leading, outer, inner))
    return _jax_compat.reshape(x, shape, out_sharding)


def merge_last_axes(x: jax.Array, like: jax.Array) -> jax.Array:
    """(..., blocks, block_length) -> the shape (and explicit sharding) of `like`.

    The inverse of :func:`split_last_axis` applied to `like`: padding is cut off.
    """
    length = like.shape[-1]
    shape = (*x.shape[:-2], x.shape[-2] * x.shape[-1])
    sharding = explicit_sharding(x)
    if sharding is None:
        merged = x.reshape(shape)
    else:
        *leading, outer, inner = padded_spec(sharding.spec, x.ndim)
        merged_entry = as_entry(axis_names(outer) + axis_names(inner))
        out_sharding = _jax_compat.with_spec(sharding, PartitionSpec(*leading, merged_entry))
        merged = _jax_compat.reshape(x, shape, out_sharding)
    if length != shape[-1]:
        merged = merged[..., :length]
        if is_auto_traced(like):
            # Propagation through the padding and the cut can lose the sharding.
            merged = plus_zero_from(like, merged)
    target = explicit_sharding(like)
    current = explicit_sharding(merged) if sharding is not None else None
    if current is not None and target is not None and target.spec != current.spec:
        merged = _jax_compat.reshard(merged, target)
    return merged
