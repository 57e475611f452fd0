"""Shardings of the optimizer state, derived from the shardings of the parameters.

Every state leaf of :func:`rmsprop_jax.rmsprop` and :func:`rmsprop_jax.scale_by_rms` lives
where its parameter lives. `init` and `update` keep it there by themselves, under `jax.jit`
as well as eagerly; these helpers give the same layout *before* anything is allocated, for
`jax.jit(..., out_shardings=...)` and as the target of a checkpoint restore.

A state leaf takes its parameter's sharding on the parameter axes it keeps:

- `nu`, `mu`, the momentum `trace` and int8 `codes` (the parameter's shape): the
  parameter's sharding.
- int8 `scales`, shape `(..., blocks)`: the leading axes as the parameter; the block axis
  takes the leading mesh axes of the parameter's last axis whose size divides the number of
  blocks (all of them when every shard holds whole blocks).
- factored `row`, shape `(..., rows)`: the parameter's sharding without its last axis;
  `col`, shape `(..., cols)`: without its second-to-last axis.
- step counts and any leaf that matches no parameter: replicated on the parameters' mesh.

So a statistic averaged over a sharded axis (the column statistics of a matrix split by
rows) is replicated along it: it holds one number per column, and every device needs all.

Example, FSDP over 8 devices, before any parameter exists::

    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    abstract = {"w": jax.ShapeDtypeStruct((4096, 1024), jnp.float32,
                                          sharding=NamedSharding(mesh, P("fsdp", None)))}
    tx = rj.rmsprop(1e-3, moment_storage="int8")
    shardings = rj.sharding.state_shardings(tx, abstract)
    shardings[2].nu.scales["w"].spec      # PartitionSpec('fsdp', None): (4096, 4) scales
    params = jax.jit(init_params, out_shardings={"w": abstract["w"].sharding})(key)
    state = jax.jit(tx.init, out_shardings=shardings)(params)

References:
  Rajbhandari et al., `ZeRO: Memory Optimizations Toward Training Trillion Parameter Models
  <https://arxiv.org/abs/1910.02054>`_, 2020.
  Shoeybi et al., `Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
  Parallelism <https://arxiv.org/abs/1909.08053>`_, 2019.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import Sharding

from rmsprop_jax import _placement, _validation


def _check_sharding_fits(where: str, shape: tuple, sharding: Sharding) -> None:
    """Refuse a sharding that names more axes than `shape` has, or splits an axis unevenly."""
    try:
        if hasattr(sharding, "check_compatible_aval"):
            sharding.check_compatible_aval(shape)  # the rank, with JAX's own words
        sharding.shard_shape(shape)  # each split axis divisible by its number of shards
    except (ValueError, IndexError) as error:
        raise ValueError(
            f"{where} (shape {shape}) cannot take the sharding given for it: {error}"
        ) from None


def _abstract_params(params: Any, shardings: Any) -> Any:
    """`params` as ShapeDtypeStructs that carry a sharding, checking that each has one."""
    if shardings is None:
        shardings = jax.tree.map(lambda leaf: getattr(leaf, "sharding", None), params)
    elif isinstance(shardings, Sharding):  # one sharding for every parameter, as jax.jit takes
        shardings = jax.tree.map(lambda _: shardings, params)
    elif jax.tree.structure(shardings) != jax.tree.structure(params):
        raise ValueError(
            "`shardings` must have the tree structure of `params`; got "
            f"{jax.tree.structure(shardings)} for params {jax.tree.structure(params)}."
        )

    def abstract(path: Any, leaf: Any, sharding: Any) -> jax.ShapeDtypeStruct:
        where = f"params{jax.tree_util.keystr(path)}"
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(
                f"{where} is a {type(leaf).__name__}, not an array or a jax.ShapeDtypeStruct."
            )
        if not isinstance(sharding, Sharding):
            raise ValueError(
                f"{where} has no sharding (got {sharding!r}). Pass arrays placed with "
                "jax.device_put, jax.ShapeDtypeStructs with sharding=..., or `shardings`."
            )
        _check_sharding_fits(where, tuple(leaf.shape), sharding)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(abstract, params, shardings)


def _replicated(params: Any) -> Sharding:
    """The sharding of a scalar: replicated on the mesh of the first sharded parameter."""
    shardings = [leaf.sharding for leaf in jax.tree.leaves(params)]
    if not shardings:
        raise ValueError("`params` has no leaves, so there is no device to place the state on.")
    replicated = _placement.replicated_sharding(params)
    if replicated is not None:
        return replicated
    if shardings[0].is_fully_replicated:
        return shardings[0]
    raise TypeError(
        f"Cannot place scalars next to parameters sharded with {shardings[0]!r}: use "
        "jax.sharding.NamedSharding."
    )


def _shapes_of_init(tx: Any, params: Any, shardings: Any) -> tuple[Any, Any]:
    """The parameters as placed `jax.ShapeDtypeStruct`s, and `tx.init`'s state as unplaced ones."""
    _validation.check_transformation("tx", tx, "rj.rmsprop(1e-3)")
    abstract_params = _abstract_params(params, shardings)
    unplaced = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), abstract_params)
    return abstract_params, jax.eval_shape(tx.init, unplaced)


def state_shardings(tx: optax.GradientTransformation, params: Any, shardings: Any = None) -> Any:
    """The sharding of every leaf of `tx.init(params)`, computed without allocating anything.

    State leaves are matched to parameters by path (the state's `nu["layer"]["w"]` to
    `params["layer"]["w"]`) and shape, and take the shardings tabulated in
    :mod:`rmsprop_jax.sharding`. Works for any optax transformation whose state mirrors the
    parameters (`optax.chain`s with :func:`rmsprop_jax.rmsprop`, `optax.trace`, ...); leaves
    that match no parameter are replicated.

    Args:
      tx: the optimizer, e.g. `rj.rmsprop(1e-3, moment_storage="int8")`.
      params: the parameters: `jax.Array`s (placed with `jax.device_put`), or
        `jax.ShapeDtypeStruct` leaves with a `sharding`, or anything with `shape` and `dtype` when
        `shardings` is given.
      shardings: optional tree of `jax.sharding.Sharding` with the structure of `params`,
        or one `Sharding` for every parameter, used instead of the parameters' own
        shardings. Each must split its parameter evenly.

    Returns:
      A tree of `jax.sharding.Sharding` with the structure of `tx.init(params)`, usable as
      `out_shardings` of `jax.jit(tx.init)` and of a jitted training step.

    Examples:
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1, jax.device_count()), ("data", "model"))
      >>> w = jax.ShapeDtypeStruct((512, 1024), jnp.float32,
      ...                          sharding=NamedSharding(mesh, P("data", "model")))
      >>> tx = rj.rmsprop(1e-3, moment_storage="factored")
      >>> tuple(rj.sharding.state_shardings(tx, {"w": w})[2].nu.col["w"].spec)
      ('model',)
    """
    abstract_params, state = _shapes_of_init(tx, params, shardings)
    replicated = _replicated(abstract_params)

    def place(stored_leaf: tuple, fmt: Any, param: Any) -> tuple:
        if param is None:
            return tuple(replicated for _ in stored_leaf)
        if fmt is None:
            return (param.sharding,)
        return fmt.leaf_shardings(stored_leaf, param.sharding, param.shape, replicated)

    return _placement.map_stored(state, abstract_params, place)


def abstract_state(tx: optax.GradientTransformation, params: Any, shardings: Any = None) -> Any:
    """`tx.init(params)` as `jax.ShapeDtypeStruct` leaves carrying the shardings of the state.

    The target for restoring a checkpoint straight onto the devices, each process reading
    only its shards, e.g. with orbax:
    `manager.restore(step, args=ocp.args.StandardRestore(abstract_state(tx, params)))`.

    Args:
      tx: the optimizer.
      params: as for :func:`state_shardings`.
      shardings: as for :func:`state_shardings`.

    Returns:
      A tree of `jax.ShapeDtypeStruct` with the structure of `tx.init(params)`.

    Examples:
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> w = jax.ShapeDtypeStruct((1024, 16), jnp.float32,
      ...                          sharding=NamedSharding(mesh, P("data")))
      >>> nu = rj.sharding.abstract_state(rj.rmsprop(1e-3), {"w": w})[2].nu["w"]
      >>> nu.shape, nu.dtype, tuple(nu.sharding.spec)
      ((1024, 16), dtype('float32'), ('data',))
    """
    abstract_params, state = _shapes_of_init(tx, params, shardings)
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        state,
        state_shardings(tx, abstract_params),
    )
