"""`pack_small_leaves`: one buffer for the many small leaves of a tree, so one kernel serves them.

A compiled optimizer step runs a few kernels per parameter leaf. On a CPU each kernel costs
microseconds to launch whatever its size, so for trees with hundreds or thousands of small
leaves (biases, norm scales, per-channel gains) the launches, not the arithmetic, set the step
time. Packing the small leaves of each dtype into one vector before the inner transformation
sees them replaces their per-leaf state kernels with one kernel per dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _jax_compat

# Below this many elements a leaf's kernels cost more to launch than copying it into the
# packed buffer; measured by benchmarks/update_step.py (see benchmarks/README.md).
DEFAULT_MAX_SIZE = 2048


class PackedTree(NamedTuple):
    """The tree an inner transformation of :func:`pack_small_leaves` sees.

    Attributes:
      leaves: the original tree with every packed leaf replaced by None.
      packed: for each dtype with packed leaves (keyed by its name, e.g. "float32"), the
        concatenation of those leaves, flattened, in tree order.
    """

    leaves: Any
    packed: dict[str, jax.Array]


def _is_partitioned(leaf: Any) -> bool:
    """Whether the leaf's type says it is split over devices (explicit sharding).

    Answers alike for concrete and traced leaves (`_sharded_ops.explicit_sharding` only
    looks at traced ones), so an eager `init` packs what a jitted `update` packs.
    """
    spec = getattr(getattr(_jax_compat.typeof(leaf), "sharding", None), "spec", None)
    return spec is not None and any(axis is not None for axis in spec)


def _packed_dtypes(leaves: list[Any], max_size: int | None) -> list[str | None]:
    """For each leaf, the name of the buffer it is packed into, or None to leave it alone.

    Depends only on shapes, dtypes and explicit sharding, which `init` and `update` see alike
    whether or not they are traced.
    """
    return [
        str(jnp.result_type(leaf))
        if np.size(leaf) > 0
        and (max_size is None or np.size(leaf) <= max_size)
        and not _is_partitioned(leaf)
        else None
        for leaf in leaves
    ]


def pack(tree: Any, max_size: int | None) -> PackedTree:
    """`tree` as a :class:`PackedTree`: its small leaves in one vector per dtype."""
    leaves, treedef = jax.tree.flatten(tree)
    buffers = _packed_dtypes(leaves, max_size)
    packed = {
        name: jnp.concatenate(
            [jnp.ravel(leaf) for leaf, into in zip(leaves, buffers, strict=True) if into == name]
        )
        for name in sorted({into for into in buffers if into is not None})
    }
    kept = [None if into is not None else leaf for leaf, into in zip(leaves, buffers, strict=True)]
    return PackedTree(leaves=jax.tree.unflatten(treedef, kept), packed=packed)


def unpack(packed_tree: PackedTree, like: Any, max_size: int | None) -> Any:
    """The tree of `like`'s structure whose leaves are read back from `packed_tree`."""
    leaves, treedef = jax.tree.flatten(like)
    buffers = _packed_dtypes(leaves, max_size)
    kept = treedef.flatten_up_to(packed_tree.leaves)
    offsets = dict.fromkeys(packed_tree.packed, 0)
    out = []
    for leaf, into, own in zip(leaves, buffers, kept, strict=True):
        if into is None:
            out.append(own)
            continue
        start, size = offsets[into], int(np.size(leaf))
        offsets[into] = start + size
        out.append(packed_tree.packed[into][start : start + size].reshape(np.shape(leaf)))
    return jax.tree.unflatten(treedef, out)


def pack_small_leaves(
    inner: optax.GradientTransformation,
    max_size: int | None = DEFAULT_MAX_SIZE,
) -> optax.GradientTransformationExtraArgs:
    r"""Runs `inner` with the leaves of at most `max_size` elements packed, one vector per dtype.

    .. math::

        \text{update}(g, s, p) = \text{unpack}(\text{inner.update}(\text{pack}(g), s,
        \text{pack}(p)))

    where `pack` concatenates the flattened small leaves of each dtype (in tree order) and
    leaves the others alone, and `unpack` slices them back out. Elementwise transformations
    such as :func:`rmsprop_jax.rmsprop` give exactly the updates they give unpacked; the state
    of each packed leaf is a slice of one vector, so the compiled step updates the state of
    all small leaves of a dtype in one kernel instead of one (or more) per leaf. The
    gradients are copied into that vector on every step, which is why only small leaves are
    packed: up to a few thousand elements, launching a leaf's kernels costs more than the copy
    (benchmarks/update_step.py, `packed` rows).

    The packing is decided from shapes and dtypes alone, so `init` and `update` agree under
    `jax.jit` and eagerly. Leaves split over devices (explicit sharding) are never packed;
    packed state is placed as the compiler chooses (small, so replicated in practice).

    Args:
      inner: any gradient transformation. It sees a :class:`PackedTree`: a transformation
        that treats leaves differently by their shape or path (a weight-decay mask, a
        factored `nu_storage`) sees the packed vector as one 1-D leaf, so give such masks a
        function of the packed tree or keep those transformations outside this wrapper.
      max_size: leaves with at most this many elements are packed; None packs every leaf
        (every step then copies all gradients, as `optax.flatten` does).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is `inner`'s state on the
      packed tree.

    References:
      optax.flatten, which packs every leaf (and the updates too):
      https://optax.readthedocs.io/en/latest/api/combining_optimizers.html#optax.flatten
    """
    if max_size is not None and (
        isinstance(max_size, bool) or not isinstance(max_size, int | np.integer) or max_size < 1
    ):
        raise ValueError(f"`max_size` must be a positive integer or None, got {max_size!r}.")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> optax.OptState:
        return inner.init(pack(params, max_size))

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        packed_params = None if params is None else pack(params, max_size)
        packed_updates, state = inner.update(
            pack(updates, max_size), state, packed_params, **extra_args
        )
        return unpack(packed_updates, updates, max_size), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
