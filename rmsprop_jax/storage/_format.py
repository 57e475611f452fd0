"""The interface of a storage format, and the one tree-level implementation built on it.

A format stores a moving average leaf by leaf. A leaf it compresses is a tuple of arrays
(its *parts*: int8 `codes` and `scales`, factored `row` and `col`, or one bfloat16 array); a
leaf it does not compress (too small, not a matrix, complex) is kept *dense*, in the compute
dtype. A format implements five operations on one compressed leaf (`create`, `decode`,
`encode` or `update`, `logical_shape`) and two on where its parts live (`part_shardings`
ahead of time, `tie` under `jax.jit`); everything about trees is done here, once.

The state holds, per format:

- one part (`"float32"`, `"bfloat16"`): a tree shaped like the parameters, one array per leaf;
- several parts (`"int8"`, `"factored"`): a NamedTuple (the format's `container`) with one such
  tree per part plus a `dense` tree. Each tree has a leaf for every parameter: the leaves a
  format does not compress hold their average in `dense` and a one-element placeholder in
  every part; compressed leaves hold a one-element placeholder in `dense`. Every state leaf is
  thus an array under the parameter's path, which is what Flax NNX, orbax and `jax.vmap` need
  (orbax cannot save empty arrays, hence one element rather than none).

Non-finite values never leave their element: `encode` keeps NaN and infinities per element,
and statistics shared by several elements (block scales, row and column means) skip them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax._sharded_ops import plus_zero_from
from rmsprop_jax.storage import _rounding

Parts = tuple[Any, ...]


def placeholder() -> jax.Array:
    """The one-element array standing in for a part (or `dense`) a leaf does not use."""
    return jnp.zeros((1,), jnp.uint8)


@jax.custom_jvp
def tie(part: chex.Array, never: chex.Array) -> chex.Array:
    """`part` unchanged, as a bitwise OR with `never` (False, of a shape that broadcasts).

    `never` must be computed so that no compiler folds it to a constant (as
    `(x != x) & (x == x)` is not folded, see `_sharded_ops.plus_zero_from`): `part` then
    depends on whatever `never` was computed from. Differentiated, it is the identity on
    `part` (the bit operations alone would give a derivative of 0).

    Examples:
      >>> def tied(x):
      ...     return tie(x, never_from(x))
      >>> x = jnp.arange(3.0)
      >>> tied(x).tolist(), jax.grad(lambda x: tied(x).sum())(x).tolist()
      ([0.0, 1.0, 2.0], [1.0, 1.0, 1.0])
    """
    if jnp.dtype(part.dtype).itemsize > 4:
        return part
    unsigned = jnp.dtype(f"uint{8 * jnp.dtype(part.dtype).itemsize}")
    bits = jax.lax.bitcast_convert_type(part, unsigned) | never.astype(unsigned)
    return jax.lax.bitcast_convert_type(bits, part.dtype)


@tie.defjvp
def _tie_jvp(primals: tuple[Any, Any], tangents: tuple[Any, Any]) -> tuple[Any, Any]:
    part, never = primals
    return tie(part, never), tangents[0]


def never_from(x: chex.Array) -> chex.Array:
    """False, elementwise, computed from `x` in a way no compiler folds."""
    x = jnp.real(x).astype(jnp.float32)
    return (x != x) & (x == x)


def after(parts: Any, *earlier: Any) -> Any:
    """`parts` (unchanged), read only once the arrays `earlier` are written.

    An update that then overwrites `parts` in place runs after whatever computed `earlier`
    from the old `parts`, so XLA need not copy the old `parts` first. Each part is tied
    (:func:`tie`) to an `earlier` array read behind an optimization barrier (so that it is the
    written buffer, not a recomputation). The tie is taken from an array of the part's shape,
    or of its shape without the last axis, so that it is placed like the part and a sharded
    leaf needs no communication. Within a row chunk (:mod:`rmsprop_jax.storage._rows`), which
    orders its writes itself, `parts` are returned as they are.
    """
    written = [x for x in jax.tree.leaves(earlier) if np.size(x) > 1]
    if not written or _rounding.in_chunk():
        return parts
    written = jax.lax.optimization_barrier(written)

    def tied(part):
        if np.size(part) <= 1:
            return part
        shape = np.shape(part)
        anchor = next((x for x in written if np.shape(x) == shape), None)
        if anchor is None:
            anchor = next((x[..., None] for x in written if np.shape(x) == shape[:-1]), None)
        if anchor is None:
            anchor = written[0].reshape(-1)[:1]
        return tie(part, never_from(anchor))

    return jax.tree.map(tied, parts)


def moving_average(stored: chex.Array, x: chex.Array, decay: Any) -> chex.Array:
    """`decay * stored + (1 - decay) * x`, in the operation order of optax's moments."""
    return (1 - decay) * x + decay * stored


def abs_sq(x: chex.Array) -> chex.Array:
    """`|x|**2`, real for complex `x`."""
    return jnp.real(x * jnp.conj(x)) if jnp.iscomplexobj(x) else x * x


class StorageFormat:
    """How a format stores one leaf; subclasses override the per-leaf operations.

    Attributes:
      name: the name users pass as `moment_storage`.
      container: for formats with several parts, the NamedTuple whose fields are the part
        names followed by `dense`; None for formats that store one array per leaf.
      stores_centered_variance: whether a centered state keeps the variance
        ν - |μ|² (updated without cancellation) instead of ν.
      first_moment_name: the format of μ (centered), by name, where the user picks none
        (None: this format).
      first_moment_names: the formats μ may be kept in instead (`first_moment_storage`).
      rounds: whether :meth:`encode` and :meth:`update` use their `seed` (for stochastic
        rounding); formats that do not may be given None.
      stores_non_finite: whether a non-finite value averaged in is stored for its element
        (every format but `"factored"`, whose statistics leave it out).
      updates_in_row_chunks: whether large leaves are updated a chunk of rows at a time
        (:mod:`rmsprop_jax.storage._rows`), for formats whose `update` reduces over the new
        average or over `x`.
      updates_from_sums: whether a compressed leaf's new parts depend on `x` only through its
        means along the last axis and the one before (:meth:`update_from_means`), which come
        from :func:`rmsprop_jax.storage.fused_sums` (or, where `x` is not finite,
        :func:`rmsprop_jax.storage.counted_means`) rather than from row chunks, with JAX
        releases whose XLA:CPU fuses them (:func:`rmsprop_jax.storage.updates_from_sums`).
    """

    name: ClassVar[str]
    container: ClassVar[type | None] = None
    stores_centered_variance: ClassVar[bool] = True
    first_moment_name: ClassVar[str | None] = None
    first_moment_names: ClassVar[tuple[str, ...]] = ("float32", "bfloat16", "int8")
    rounds: ClassVar[bool] = True
    stores_non_finite: ClassVar[bool] = True
    updates_in_row_chunks: ClassVar[bool] = False
    updates_from_sums: ClassVar[bool] = False

    # -- one compressed leaf -------------------------------------------------------------
    def _undefined(self, operation: str) -> TypeError:
        return TypeError(
            f"Storage format {self.name!r} was asked to {operation} a compressed leaf but "
            "defines no such operation: a format whose `compresses` can return True defines "
            "`create`, `decode` and `encode` (or `update`)."
        )

    def compresses(self, shape: tuple[int, ...], dtype: Any, *, signed: bool) -> bool:
        """Whether a leaf of this shape and (compute) dtype is compressed."""
        del shape, dtype, signed
        return False

    def create(self, like: Any, value: Any, *, signed: bool) -> Parts:
        """The parts of a leaf shaped like `like` whose every element is `value`.

        Built from `jnp.full_like(like, ...)` so that a sharded `like` gives sharded parts.
        """
        raise self._undefined("create")

    def decode(self, parts: Parts, dtype: Any) -> chex.Array:
        """The average a compressed leaf stands for, in `dtype`."""
        raise self._undefined("decode")

    def encode(self, x: chex.Array, seed: chex.Array, *, signed: bool) -> Parts:
        """The parts storing `x`, with rounding bits selected by `seed` (a uint32)."""
        raise self._undefined("encode")

    def update(
        self, parts: Parts, x: chex.Array, decay: Any, seed: chex.Array, *, signed: bool
    ) -> tuple[Parts, chex.Array]:
        """Folds `x` into the average; returns the new parts and the average they stand for.

        The step is computed from the stored (rounded) average rather than the exact one: the
        new parts then depend on the old ones only, and the step on the new ones only, so XLA
        writes the donated parts in place without first copying the old ones (which the step
        would otherwise still read after they are overwritten).
        """
        average = moving_average(self.decode(parts, x.dtype), x, decay)
        # The barrier keeps XLA from recomputing the new parts (from the old ones) inside the
        # step: the step reads the buffers just written.
        parts = jax.lax.optimization_barrier(self.encode(average, seed, signed=signed))
        return parts, self.decode(parts, x.dtype)

    def update_from_means(
        self, parts: Parts, row_means: chex.Array, col_means: chex.Array, decay: Any
    ) -> Parts:
        """:meth:`update` given only the means of `x` (its non-finite entries counted as 0)
        along the last axis (`row_means`) and along the one before (`col_means`), for formats
        that `updates_from_sums`."""
        raise self._undefined("update from means")

    def summed_over_rows(self, shape: tuple[int, ...]) -> tuple[bool, ...]:
        """Per part of a compressed leaf of `shape` updated in row chunks: whether it is a
        statistic over the leaf's first axis, folded chunk by chunk by `update` rather than
        written a chunk of rows at a time (see :func:`rmsprop_jax.storage._rows.update_by_rows`).
        """
        return (False,) * max(len(self.fields) - 1, 1)

    def average_after_rows(self, parts: Parts, dtype: Any, folded: Any) -> chex.Array:
        """The average a compressed leaf stands for once all its row chunks are updated.

        `update` returns it in one pass; in row chunks it is known only after the last one.
        For a format that does not store non-finite values (`stores_non_finite` False),
        `folded` has the non-finite entries of what was averaged in (any finite value
        elsewhere); others get None.
        """
        del folded
        return self.decode(parts, dtype)

    def logical_shape(self, parts: Parts) -> tuple[int, ...]:
        """The shape of the parameter a compressed leaf belongs to."""
        return tuple(np.shape(parts[0]))

    def part_shardings(self, sharding: Any, shape: tuple[int, ...]) -> Parts:
        """The sharding of each part of a compressed leaf whose parameter has `sharding`."""
        del shape
        return (sharding,)

    def tie(self, parts: Parts, param: chex.Array) -> Parts:
        """`parts` placed like `param` under `jax.jit` with automatic sharding."""
        return tuple(plus_zero_from(param, part) for part in parts)

    # -- trees ---------------------------------------------------------------------------
    @property
    def fields(self) -> tuple[str, ...]:
        return () if self.container is None else self.container._fields  # type: ignore[attr-defined]

    @property
    def width(self) -> int:
        """How many arrays (trees) a stored leaf (the state) has: its fields, or one."""
        return max(len(self.fields), 1)

    def is_stored(self, node: Any) -> bool:
        """Whether `node` is one of this format's containers."""
        return self.container is not None and isinstance(node, self.container)

    def init(self, params: Any, value: Any, *, signed: bool, dtype_of: Any) -> Any:
        """The stored average of `value` for every leaf of `params`.

        `dtype_of(param)` gives the compute dtype the leaf would be kept in densely.
        """

        def leaf(param: Any) -> Parts:
            dtype = dtype_of(param)
            if self.compresses(tuple(np.shape(param)), dtype, signed=signed):
                return self._with_dense(self.create(param, value, signed=signed), None)
            dense = jnp.full_like(param, value, dtype=dtype)
            return self._with_dense(None, dense)

        return self._gather(jax.tree.map(leaf, params), params)

    def _with_dense(self, parts: Parts | None, dense: Any) -> Parts:
        if self.container is None:
            return (dense,) if parts is None else parts
        if parts is None:
            return (*(placeholder() for _ in self.fields[:-1]), dense)
        return (*parts, placeholder())

    def _gather(self, per_leaf: Any, like: Any) -> Any:
        """A tree of per-leaf tuples -> the stored form (one tree, or a container of trees)."""
        treedef = jax.tree.structure(like)
        return self.join(treedef.flatten_up_to(per_leaf), treedef)

    def leaf_paths(self, stored: Any) -> tuple[Any, list[Any]]:
        """The tree structure shared by a stored average's trees, and each leaf's key path."""
        tree = stored if self.container is None else stored[-1]
        paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
        return jax.tree.structure(tree), paths

    def split(self, stored: Any, treedef: Any) -> list[Any]:
        """The stored form -> one tuple per leaf of `treedef` (None where the gradient is)."""
        trees = (stored,) if self.container is None else tuple(stored)
        columns = [treedef.flatten_up_to(tree) for tree in trees]
        return [None if row[0] is None else tuple(row) for row in zip(*columns, strict=True)]

    def join(self, per_leaf: Sequence[Any], treedef: Any) -> Any:
        """The inverse of :meth:`split`."""
        columns = [
            treedef.unflatten([None if row is None else row[i] for row in per_leaf])
            for i in range(self.width)
        ]
        return columns[0] if self.container is None else self.container(*columns)

    def is_compressed(self, stored_leaf: Parts) -> bool:
        """Whether a stored leaf holds compressed parts (not the dense average); a format
        with no container stores every leaf densely."""
        return self.container is not None and self._dense_is_placeholder(stored_leaf)

    def _dense_is_placeholder(self, stored_leaf: Parts) -> bool:
        # A compressed leaf's parts have the parameter's rank and more than one element; a
        # dense leaf's parts are all one-element placeholders.
        return any(np.shape(part) != (1,) for part in stored_leaf[:-1])

    def leaf_update(
        self,
        stored_leaf: Parts,
        x: chex.Array,
        decay: Any,
        seed: chex.Array,
        *,
        signed: bool,
        block_maxima: Any = None,
    ) -> tuple[Parts, chex.Array]:
        """:meth:`update` for a stored leaf, compressed or dense (decided by `x`, or by the
        leaf's parts for a container: `x` may be a chunk of the leaf's rows). `block_maxima`,
        where not None, are passed on to the format's `update` (see
        :func:`rmsprop_jax.storage.shared_block_maxima`)."""
        compressed = (
            self.is_compressed(stored_leaf)
            if self.container is not None
            else self.compresses(x.shape, x.dtype, signed=signed)
        )
        if not compressed:
            average = moving_average(stored_leaf[-1], x, decay)
            return (*stored_leaf[:-1], average), average
        parts = stored_leaf if self.container is None else stored_leaf[:-1]
        given = {} if block_maxima is None else {"block_maxima": block_maxima}
        parts, average = self.update(parts, x, decay, seed, signed=signed, **given)
        return (parts if self.container is None else (*parts, stored_leaf[-1])), average

    def leaf_update_from_means(
        self, stored_leaf: Parts, row_means: chex.Array, col_means: chex.Array, decay: Any
    ) -> Parts:
        """:meth:`update_from_means` for a compressed stored leaf."""
        parts = self.update_from_means(stored_leaf[:-1], row_means, col_means, decay)
        return (*parts, stored_leaf[-1])

    def leaf_summed_over_rows(self, stored_leaf: Parts, shape: tuple[int, ...]) -> list[bool]:
        """:meth:`summed_over_rows` for each array of a stored leaf (False for placeholders)."""
        if not self.is_compressed(stored_leaf):
            return [False] * len(stored_leaf)
        return [*self.summed_over_rows(shape), False]

    def leaf_average_after_rows(
        self, stored_leaf: Parts, like: chex.Array, folded: Any
    ) -> chex.Array:
        """:meth:`average_after_rows` for a stored leaf of the second moment, in the dtype of
        `like` (shaped as it)."""
        if not self.compresses(like.shape, like.dtype, signed=False):
            return stored_leaf[-1].astype(like.dtype)
        parts = stored_leaf if self.container is None else stored_leaf[:-1]
        return self.average_after_rows(parts, like.dtype, folded)

    def leaf_decode(self, stored_leaf: Parts, like: chex.Array, *, signed: bool) -> chex.Array:
        """The average a stored leaf stands for, in the dtype of `like` (shaped as it)."""
        if not self.compresses(like.shape, like.dtype, signed=signed):
            return stored_leaf[-1].astype(like.dtype)
        parts = stored_leaf if self.container is None else stored_leaf[:-1]
        return self.decode(parts, like.dtype)

    def leaf_tie(self, stored_leaf: Parts, param: chex.Array) -> Parts:
        """A stored leaf tied to `param` (see :meth:`tie`); placeholders stay as they are."""
        if self.container is None:
            return self.tie(stored_leaf, param)
        if self._dense_is_placeholder(stored_leaf):
            return (*self.tie(stored_leaf[:-1], param), stored_leaf[-1])
        return (*stored_leaf[:-1], *StorageFormat.tie(self, stored_leaf[-1:], param))

    def leaf_shardings(
        self, stored_leaf: Parts, sharding: Any, shape: tuple, replicated: Any
    ) -> Parts:
        """The sharding of each array of a stored leaf whose parameter has `sharding`."""
        if self.container is None:
            return self.part_shardings(sharding, shape)
        if self._dense_is_placeholder(stored_leaf):
            return (*self.part_shardings(sharding, shape), replicated)
        return (*(replicated for _ in stored_leaf[:-1]), sharding)

    def leaf_logical_shape(self, stored_leaf: Parts) -> tuple[int, ...]:
        """The shape of the parameter a stored leaf belongs to."""
        if not self.is_compressed(stored_leaf):
            return tuple(np.shape(stored_leaf[-1]))
        return self.logical_shape(stored_leaf[:-1])
