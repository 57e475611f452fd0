"""`pack_small_leaves`: one buffer for the many small leaves of a tree, so one kernel serves them.

A compiled optimizer step runs a few kernels per parameter leaf. On a CPU each kernel costs
microseconds to launch whatever its size, so for trees with hundreds or thousands of small
leaves (biases, norm scales, per-channel gains) the launches, not the arithmetic, set the step
time. Packing the small leaves of each dtype into one vector before the inner transformation
sees them replaces their per-leaf state kernels with one kernel per dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _jax_compat, _unpacking, _validation

# Below this many elements a leaf's kernels cost more to launch than copying it into the
# packed buffer; measured by benchmarks/update_step.py (see benchmarks/README.md).
DEFAULT_MAX_SIZE = 2048


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LeafSlot:
    """Where one leaf of the original tree went: its shape, dtype and buffer (None if kept).

    A static pytree node: it holds no array, so it costs nothing in a compiled step or a
    checkpoint, while its fields travel in the tree structure through `jax.jit`,
    `jax.tree.map`, `jax.vmap` and Flax NNX's state conversions.
    """

    shape: tuple[int, ...]
    dtype: str
    buffer: str | None


def _is_slot(x: Any) -> bool:
    return isinstance(x, LeafSlot)


class PackedTree(NamedTuple):
    """The tree an inner transformation of :func:`pack_small_leaves` sees.

    Attributes:
      leaves: the original tree with every packed leaf replaced by None.
      packed: for each dtype with packed leaves (keyed by its name, e.g. "float32"), the
        concatenation of those leaves, flattened, in tree order.
      layout: the original tree with each leaf replaced by a :class:`LeafSlot` (its shape,
        dtype and buffer); it holds no arrays. Every `PackedTree` in the state carries the
        layout of the parameters `init` saw, so `update` packs gradients the same way and
        checks them leaf by leaf against it.

    Examples:
      >>> tx = rj.pack_small_leaves(rj.scale_by_rms(), max_size=16)
      >>> nu = tx.init({"bias": jnp.zeros(3), "w": jnp.ones((64, 64))}).nu
      >>> type(nu).__name__, nu.leaves["bias"], nu.packed["float32"].shape
      ('PackedTree', None, (3,))
    """

    leaves: Any
    packed: dict[str, jax.Array]
    layout: Any = None


def _is_partitioned(leaf: Any) -> bool:
    """Whether the leaf's type says it is split over devices (explicit sharding).

    Answers alike for concrete and traced leaves (`_sharded_ops.explicit_sharding` only
    looks at traced ones), so an eager `init` packs what a jitted `update` packs.
    """
    spec = getattr(getattr(_jax_compat.typeof(leaf), "sharding", None), "spec", None)
    return spec is not None and any(axis is not None for axis in spec)


def _buffer(leaf: Any, max_size: int | None) -> str | None:
    """The name of the buffer `leaf` is packed into, or None to leave it alone.

    Depends only on shape, dtype and explicit sharding, which `init` and `update` see alike
    whether or not they are traced.
    """
    size = np.size(leaf)
    if size == 0 or (max_size is not None and size > max_size) or _is_partitioned(leaf):
        return None
    return str(jnp.result_type(leaf))


def layout(tree: Any, max_size: int | None) -> Any:
    """`tree` with each leaf replaced by its :class:`LeafSlot` (None leaves stay None)."""
    return jax.tree.map(
        lambda leaf: LeafSlot(
            tuple(np.shape(leaf)), str(jnp.result_type(leaf)), _buffer(leaf, max_size)
        ),
        tree,
    )


def _slots(tree_layout: Any) -> list[LeafSlot]:
    return jax.tree.leaves(tree_layout, is_leaf=_is_slot)


def pack_like(tree: Any, tree_layout: Any) -> PackedTree:
    """`tree` packed as `tree_layout` says: each leaf into its slot's buffer, or kept.

    `tree` must have the layout's structure and shapes (see :func:`check_like`); its dtypes
    may differ (float16 gradients of float32 parameters): a buffer has the promoted dtype of
    the leaves packed into it.
    """
    leaves, treedef = jax.tree.flatten(tree)
    slots = _slots(tree_layout)
    parts: dict[str, list[Any]] = {}
    kept = []
    for leaf, slot in zip(leaves, slots, strict=True):
        if slot.buffer is None:
            kept.append(leaf)
        else:
            parts.setdefault(slot.buffer, []).append(jnp.ravel(leaf))
            kept.append(None)
    packed = {name: jnp.concatenate(parts[name]) for name in sorted(parts)}
    return PackedTree(jax.tree.unflatten(treedef, kept), packed, tree_layout)


def pack(tree: Any, max_size: int | None) -> PackedTree:
    """`tree` as a :class:`PackedTree`: its small leaves in one vector per dtype."""
    return pack_like(tree, layout(tree, max_size))


def unpack(packed_tree: PackedTree, like: Any) -> Any:
    """The tree of `like`'s structure whose leaves are read back from `packed_tree`.

    Each leaf read from a buffer gets the shape of its slot and the dtype of `like`'s leaf
    (a buffer holding float16 and float32 gradients gives float16 updates for the former).
    Leaves are sliced at offsets XLA cannot fold into their kernels (`_unpacking.unpack`).
    """
    leaves, treedef = jax.tree.flatten(like)
    kept = treedef.flatten_up_to(packed_tree.leaves)
    slots = _slots(packed_tree.layout)
    return jax.tree.unflatten(treedef, _unpacking.unpack(packed_tree.packed, slots, kept, leaves))


def _stand_in(slot: LeafSlot) -> np.ndarray:
    # A zero-stride view: the slot's shape without allocating its elements.
    return np.broadcast_to(np.zeros((), jnp.dtype(slot.dtype)), slot.shape)


def check_like(tree: Any, tree_layout: Any, *, what: str = "Gradient") -> None:
    """Raises unless `tree` fits `tree_layout` leaf by leaf, naming the first leaf that doesn't.

    Structure and shapes as :func:`rmsprop_jax._validation.check_same_tree` checks them
    (`ValueError`); a leaf bound for a buffer must also be a real or complex float of the kind
    of its parameter (`TypeError`): concatenated with the others, an integer or a complex
    leaf would be silently converted and escape the wrapped transformation's own checks.
    """
    expected = jax.tree.map(_stand_in, tree_layout, is_leaf=_is_slot)
    _validation.check_same_tree(tree, expected, what=what)
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, leaf), slot in zip(paths_and_leaves, _slots(tree_layout), strict=True):
        dtype = jnp.result_type(leaf)
        complex_ = jnp.issubdtype(dtype, jnp.complexfloating)
        if slot.buffer is not None and (
            not jnp.issubdtype(dtype, jnp.inexact)
            or complex_ != jnp.issubdtype(jnp.dtype(slot.dtype), jnp.complexfloating)
        ):
            raise TypeError(
                f"{what} at {jax.tree_util.keystr(path) or '<root>'} has dtype {dtype}, but the "
                f"parameter it belongs to is {slot.dtype}: a packed leaf needs a floating "
                f"{what.lower()} of the parameter's kind (real or complex)."
            )


def _state_layout(state: Any) -> Any:
    """The layout carried by the first :class:`PackedTree` in `state`; None if it has none."""
    for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, PackedTree)):
        if isinstance(node, PackedTree) and node.layout is not None:
            return node.layout
    return None


def _refuse_packed(tree: Any) -> None:
    """Raises `ValueError` where `tree` is already packed: a `pack_small_leaves` inside another
    (which would find the outer one's vectors and layout instead of leaves)."""
    if any(
        isinstance(node, PackedTree)
        for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, PackedTree))
    ):
        raise ValueError(
            "pack_small_leaves was given a tree that is already packed (a PackedTree): it is "
            "nested inside another pack_small_leaves. Wrap the optimizer once."
        )


def pack_small_leaves(
    inner: optax.GradientTransformation,
    max_size: int | None = DEFAULT_MAX_SIZE,
) -> optax.GradientTransformationExtraArgs:
    """Runs `inner` with the leaves of at most `max_size` elements packed, one vector per dtype.

    For gradients g, state s and parameters p::

        update(g, s, p) = unpack(inner.update(pack(g), s, pack(p)))

    where `pack` concatenates the flattened small leaves of each dtype (in tree order) and
    leaves the others alone, and `unpack` slices them back out. Elementwise transformations
    such as :func:`rmsprop_jax.rmsprop` give exactly the updates they give unpacked; the state
    of each packed leaf is a slice of one vector, so the compiled step updates the state of
    all small leaves of a dtype in one kernel instead of one (or more) per leaf. The
    gradients are copied into that vector on every step, which is why only small leaves are
    packed: up to a few thousand elements, launching a leaf's kernels costs more than the copy
    (benchmarks/update_step.py, `packed` rows).

    `unpack` reads each leaf with `jax.lax.dynamic_slice` at its offset in the vector. On CPU
    the offsets reach the compiled step as run-time values (the results of a `jax.lax.cond`
    on the first packed gradient element whose branches both return them), so the kernels
    that slice leaves of one shape are one piece of code and XLA compiles it once, as it
    does for the unpacked step's leaves; constant offsets would give every leaf a kernel of
    its own to compile (4x the unpacked step's compile time at 2048 leaves). Other platforms
    keep constant offsets (a GPU would wait for the condition on every step), and so do JAX
    releases before 0.7.2, whose XLA compiles identical kernels one by one.

    The packing is decided by `init` from the parameters' shapes and dtypes alone, so it is
    the same under `jax.jit` and eagerly, and recorded in the state (each :class:`PackedTree`
    carries a `layout` of :class:`LeafSlot` records, which hold no arrays). `update` packs
    the gradients (and parameters) by that record, not by their own dtypes: float16 or
    bfloat16 gradients of float32 parameters go into the float32 vector and their updates
    come back in the gradient's dtype, as :func:`rmsprop_jax.rmsprop` gives them unpacked.
    Before packing, `update` checks the gradients against the record leaf by leaf, with the
    messages the unpacked transformation gives (a gradient of another shape, even of the
    same size, is refused naming its leaf); these checks read static shapes while tracing
    and cost nothing in the compiled step. Leaves split over devices (explicit sharding) are
    never packed; packed state is placed as the compiler chooses (small, so replicated in
    practice).

    Args:
      inner: any gradient transformation. It sees a :class:`PackedTree`: a transformation
        that treats leaves differently by their shape or path (a weight-decay mask, a
        factored `moment_storage`) sees the packed vector as one 1-D leaf, so give such masks a
        function of the packed tree or keep those transformations outside this wrapper.
      max_size: leaves with at most this many elements are packed; None packs every leaf
        (every step then copies all gradients, as `optax.flatten` does).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is `inner`'s state on the
      packed tree.

    Raises:
      ValueError: from `update`, when the gradients (or parameters) differ from the tree
        `init` saw in structure or in the shape of a leaf; the message names the leaf.
      TypeError: from `update`, when a packed leaf's gradient is not a float of its
        parameter's kind (an integer, boolean, or complex gradient of a real parameter),
        which concatenation would otherwise convert silently.

    Examples:
      >>> params = {"bias": jnp.zeros(3), "scale": jnp.ones(2), "w": jnp.ones((64, 64))}
      >>> tx = rj.pack_small_leaves(rj.rmsprop(0.1), max_size=16)
      >>> state = tx.init(params)
      >>> state[2].nu.packed["float32"].shape, state[2].nu.leaves["w"].shape
      ((5,), (64, 64))
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
      >>> updates["bias"]
      Array([-0.31622776, -0.31622776, -0.31622776], dtype=float32)

    References:
      optax.flatten, which packs every leaf (and the updates too):
      https://optax.readthedocs.io/en/latest/api/combining_optimizers.html#optax.flatten
    """
    if max_size is not None and (
        isinstance(max_size, bool) or not isinstance(max_size, int | np.integer) or max_size < 1
    ):
        raise ValueError(f"`max_size` must be a positive integer or None, got {max_size!r}.")
    _validation.check_transformation("inner", inner, "rj.pack_small_leaves(rj.rmsprop(1e-3))")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> optax.OptState:
        _refuse_packed(params)
        return inner.init(pack(params, max_size))

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        # Pack as `init` did: by the parameters' layout, stored in the state, not by the
        # gradients' own dtypes; a stateless `inner` leaves nothing to check against.
        _refuse_packed(updates)
        tree_layout = _state_layout(state)
        if tree_layout is None:
            tree_layout = layout(updates, max_size)
        else:
            check_like(updates, tree_layout)
        packed_params = None
        if params is not None:
            check_like(params, tree_layout, what="Parameter")
            packed_params = pack_like(params, tree_layout)
        packed_updates, state = inner.update(
            pack_like(updates, tree_layout), state, packed_params, **extra_args
        )
        return unpack(packed_updates._replace(layout=tree_layout), updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
