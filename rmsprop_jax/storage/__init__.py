"""Storage formats of the moving averages: one module per format, one registry of names.

Each format implements :class:`rmsprop_jax.storage._format.StorageFormat`. A new format is
one new module defining a `FORMAT` plus one entry in :data:`FORMATS`.

| name         | second moment `nu`                      | first moment `mu` (centered)  |
|--------------|-----------------------------------------|-------------------------------|
| `"float32"`  | the compute dtype (4 bytes)             | the same                      |
| `"bfloat16"` | bfloat16, stochastic rounding           | the same                      |
| `"int8"`     | :class:`QuantizedMoment`, 8 levels/octave | the same, signed            |
| `"factored"` | :class:`FactoredMoment` (row, column)   | bfloat16, stochastic rounding |

Every format's update step divides by the average as stored (rounded), and writes the donated
state in place; large factored leaves (and int8 ones with JAX before 0.7.2) are updated in
row chunks (`_rows`) or, with JAX 0.10.2 and newer, the factored ones from whole-leaf sums
(`_sums`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rmsprop_jax import _validation
from rmsprop_jax.storage import _rows, _sums, bfloat16, factored, float32, int8
from rmsprop_jax.storage._format import StorageFormat, after
from rmsprop_jax.storage._rows import flags_like, pack_flags, unpack_flags, update_by_rows
from rmsprop_jax.storage._sums import counted_means, fused_sums, unless
from rmsprop_jax.storage.factored import FactoredMoment
from rmsprop_jax.storage.int8 import QuantizedMoment

FORMATS: dict[str, StorageFormat] = {
    f.name: f for f in (float32.FORMAT, bfloat16.FORMAT, int8.FORMAT, factored.FORMAT)
}


def get(name: Any) -> StorageFormat:
    """The format called `name`; `ValueError` naming the choices for any other value."""
    if not isinstance(name, str) or name not in FORMATS:
        raise ValueError(f"`moment_storage` must be one of {tuple(FORMATS)}, got {name!r}.")
    return FORMATS[name]


def first_moment_format(fmt: StorageFormat, name: Any = None) -> StorageFormat:
    """The format in which a state of `fmt` keeps the first moment `mu` of centered RMSprop:
    the one called `name` (`first_moment_storage`, one of `fmt.first_moment_names`), or where
    `name` is None, `fmt`'s own choice. `ValueError` naming the choices for any other value."""
    if name is None:
        return FORMATS[fmt.first_moment_name or fmt.name]
    if not isinstance(name, str) or name not in fmt.first_moment_names:
        raise ValueError(
            f"`first_moment_storage` must be None or one of {fmt.first_moment_names} with "
            f"moment_storage={fmt.name!r}, got {name!r}."
        )
    return FORMATS[name]


def updates_by_rows(fmt: StorageFormat, g: Any) -> bool:
    """Whether the averages of a leaf shaped like `g` are updated in row chunks (see
    :mod:`rmsprop_jax.storage._rows`): every average then comes from :func:`update_by_rows`."""
    return _rows.applies(fmt, g, signed=False)


def updates_from_sums(fmt: StorageFormat) -> bool:
    """Whether `fmt` updates a large leaf from the means of `x`: :func:`fused_sums` where
    `x` is finite, else :func:`counted_means` (no chunk loop)."""
    return fmt.updates_from_sums and _sums.sums_fuse()


def shared_block_maxima(*averages: tuple[StorageFormat, Any, Any, bool]) -> list[Any]:
    """For averages of one leaf that a step updates together, each given as (format, stored
    leaf, x, signed): what each one's `leaf_update` takes as `block_maxima`.

    Where all of them are compressed int8 leaves, one reduction gives every average its
    block maxima (:func:`rmsprop_jax.storage.int8.finite_maxima`), reading the inputs they
    share once (the centered variance and `mu` both read the gradient and the old `mu`);
    otherwise None for each, and each update reduces for itself.
    """
    shared = len(averages) > 1 and all(
        fmt is int8.FORMAT and fmt.is_compressed(stored) for fmt, stored, _, _ in averages
    )
    if not shared:
        return [None] * len(averages)
    return int8.finite_maxima([(x, stored[0], signed) for _, stored, x, signed in averages])


def format_of(node: Any) -> StorageFormat | None:
    """The format whose container `node` is, or None (a plain array or anything else)."""
    for fmt in FORMATS.values():
        if fmt.is_stored(node):
            return fmt
    return None


def is_container(node: Any) -> bool:
    """Whether `node` is a multi-part stored average (int8, factored)."""
    return format_of(node) is not None


def check_stored(
    fmt: StorageFormat, stored: Any, *, name: str, option: str = "moment_storage"
) -> None:
    """Raises `ValueError` where `stored` (the state's `name`) is not stored as `fmt` keeps
    averages: a state made by an optimizer of another `option` (`moment_storage`, or
    `first_moment_storage` for `mu`)."""
    found = format_of(stored)
    if found is (fmt if fmt.container is not None else None):
        return
    found_as = f"as {found.name!r}" if found is not None else "as a plain tree of arrays"
    raise ValueError(
        f"The optimizer state's `{name}` is stored {found_as}, but this optimizer keeps it with "
        f"{option}={fmt.name!r}: the state was made by another optimizer's init. Start "
        "from this optimizer's init(params), or restore a checkpoint into a target built by it "
        "(rmsprop_jax.checkpoint.restore names what differs)."
    )


def check_precision(fmt: StorageFormat, stored: Any, *, name: str) -> None:
    """Raises `ValueError` naming the first floating leaf of `stored` (the state's `name`, kept
    as `fmt`) narrower than float32, which `init` never gives outside the bfloat16 format: a
    state cast to bfloat16 or float16 would go on in that dtype, rounding each update of the
    average to nearest (small ones are lost; bfloat16 storage rounds stochastically)."""
    if fmt.name == "bfloat16":
        return
    for index, leaf in enumerate(jax.tree.leaves(stored, is_leaf=lambda x: x is None)):
        dtype = getattr(leaf, "dtype", None)
        # Cheap tests first (uint8 codes): this runs on every eager update, leaf by leaf.
        if dtype is None or dtype.itemsize >= 4 or dtype.kind in "uib":
            continue
        if jnp.issubdtype(dtype, jnp.floating):
            where = _validation.leaf_path(stored, index)
            raise ValueError(
                f"The optimizer state's `{name}` at {where} has dtype {dtype}, but "
                f"moment_storage={fmt.name!r} keeps it in at least float32: the state was cast "
                "(by a tree map over the whole state, say). Cast only the parameters, or keep "
                "the average in bfloat16 with moment_storage='bfloat16', which rounds it "
                "stochastically."
            )


def logical_shapes(fmt: StorageFormat, stored: Any) -> Any:
    """`stored` as a tree of the parameter shapes it stands for (to check gradients against)."""
    if fmt.container is None:
        return stored
    treedef = jax.tree.structure(stored.dense, is_leaf=lambda x: x is None)
    return treedef.unflatten(
        [
            None if leaf is None else jax.ShapeDtypeStruct(fmt.leaf_logical_shape(leaf), "float32")
            for leaf in fmt.split(stored, treedef)
        ]
    )


__all__ = [
    "FORMATS",
    "FactoredMoment",
    "QuantizedMoment",
    "StorageFormat",
    "after",
    "check_precision",
    "check_stored",
    "counted_means",
    "flags_like",
    "fused_sums",
    "get",
    "pack_flags",
    "shared_block_maxima",
    "unless",
    "unpack_flags",
    "update_by_rows",
    "updates_by_rows",
    "updates_from_sums",
]
