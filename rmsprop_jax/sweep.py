"""Hyperparameter sweeps: one training function over a grid, in one compiled program.

Every numeric hyperparameter of :func:`rmsprop_jax.rmsprop` and :func:`rmsprop_jax.scale_by_rms`
accepts a traced value, so a whole grid of configurations trains at once under `jax.vmap`:
the optimizer is built *inside* the training function from the hyperparameters it receives.

    >>> import jax, jax.numpy as jnp, optax
    >>> import rmsprop_jax as rj
    >>> def train(learning_rate, decay):
    ...     opt = rj.rmsprop(learning_rate, decay)
    ...     loss = lambda w: jnp.sum((w - 3.0) ** 2)
    ...     def step(carry, _):
    ...         w, state = carry
    ...         updates, state = opt.update(jax.grad(loss)(w), state)
    ...         return (optax.apply_updates(w, updates), state), None
    ...     w = jnp.zeros(2)
    ...     (w, _), _ = jax.lax.scan(step, (w, opt.init(w)), length=100)
    ...     return {"loss": loss(w)}
    >>> hyperparameters = rj.sweep.grid(learning_rate=[0.01, 0.1], decay=[0.9, 0.99])
    >>> result = rj.sweep.run(train, hyperparameters)
    >>> result.size, result.results["loss"].shape
    (4, (4,))
    >>> best = result.best("loss")
    >>> round(best.hyperparameters["learning_rate"], 6), round(best.hyperparameters["decay"], 6)
    (0.1, 0.9)

Inside `train` the hyperparameters are tracers, so the range checks that :func:`rmsprop_jax.rmsprop`
makes on concrete values cannot run there. Check a grid once, before the sweep, by building the
optimizer with the whole arrays: ``rj.rmsprop(**hyperparameters)`` raises a `ValueError` naming
any out-of-range value. An optimizer built with arrays refuses to run (its `init` and `update`
raise a `ValueError` naming the array): run, an array would be broadcast against every parameter.

Hyperparameters stay float32 whatever the parameter dtype: :func:`grid` returns float32 arrays
and the optimizer computes in float32 for bfloat16 parameters. One exception comes from optax:
`optax.inject_hyperparams` stores its hyperparameters in the dtype of the parameters, so with
bfloat16 parameters a learning rate of 1e-3 is stored (and rounded) as 9.9945e-4. Pass
``optax.inject_hyperparams(rj.rmsprop, hyperparam_dtype=jnp.float32)`` to keep them exact.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rmsprop_jax._sweep_grid import _as_values, grid, require_finite
from rmsprop_jax._sweep_result import Best, SweepResult

SWEEP_AXIS = "sweep"

InAxes = int | None | Sequence[int | None]


def _normalized_in_axes(in_axes: InAxes, num_args: int) -> tuple[int | None, ...]:
    axes = (in_axes,) * num_args if in_axes is None or isinstance(in_axes, int) else in_axes
    axes = tuple(axes)
    # False == 0, so a bool would silently map the argument: refuse it.
    if len(axes) != num_args or any(
        isinstance(axis, bool) or axis not in (0, None) for axis in axes
    ):
        raise ValueError(
            f"`in_axes` must be 0, None, or one of them per extra argument ({num_args} given), "
            f"got {in_axes!r}."
        )
    return axes


def _check_sizes(hyperparameters: Mapping[str, Any], args: tuple, axes: tuple) -> int:
    if not hyperparameters:
        raise ValueError("`hyperparameters` is empty; build it with `rj.sweep.grid(...)`.")
    shapes = {name: np.shape(values) for name, values in hyperparameters.items()}
    sizes: set[Any] = {shape[0] if len(shape) == 1 else None for shape in shapes.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"Hyperparameters must be 1-D arrays of one length, got shapes {shapes}.")
    size = sizes.pop()
    for position, (arg, axis) in enumerate(zip(args, axes, strict=True)):
        for leaf in jax.tree.leaves(arg) if axis == 0 else ():
            if np.ndim(leaf) == 0 or np.shape(leaf)[0] != size:
                raise ValueError(
                    f"Argument {position} is mapped over the sweep (in_axes=0), so each of its "
                    f"arrays needs leading size {size}, got shape {np.shape(leaf)}."
                )
    return size


def _checked_array(name: str, values: jax.Array) -> jax.Array:
    """`values`, given as a JAX array, which skips the conversion of :func:`grid` but not its
    finiteness rule: a NaN learning rate would give NaN results without a word. Checked where
    this process holds every value (not for traced values or arrays spread over processes)."""
    readable = not isinstance(values, jax.core.Tracer) and values.is_fully_addressable
    if readable and jnp.issubdtype(values.dtype, jnp.inexact):
        require_finite(name, np.asarray(values), values)
    return values


def _mesh(devices: Sequence[jax.Device] | None, size: int) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("`devices` is empty: pass at least one device, or None for all.")
    if size % len(devices):
        raise ValueError(
            f"Cannot shard a sweep of {size} configurations over {len(devices)} devices: {size} "
            f"is not a multiple of {len(devices)}. Use a grid whose size is a multiple of the "
            "device count, pass `devices=` a subset whose count divides it, or `shard=False`."
        )
    return Mesh(np.asarray(devices), (SWEEP_AXIS,))


def _build(train_ref: Callable[[], Any], axes: tuple, mesh: Mesh | None) -> Callable:
    def sweep(hyperparameters: dict[str, Any], args: tuple) -> Any:
        def one(hp: dict[str, Any], one_args: tuple) -> Any:
            return train_ref()(*one_args, **hp)

        return jax.vmap(one, in_axes=(0, axes))(hyperparameters, args)

    if mesh is None:
        return jax.jit(sweep)
    batched = NamedSharding(mesh, PartitionSpec(SWEEP_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    arg_shardings = tuple(batched if axis == 0 else replicated for axis in axes)
    return jax.jit(sweep, in_shardings=(batched, arg_shardings), out_shardings=batched)


# Compiled sweeps, per training function: a fresh `jax.vmap` wrapper would defeat jit's cache.
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_sweep(train: Callable, axes: tuple, mesh: Mesh | None) -> Callable:
    key = (axes, None if mesh is None else tuple(mesh.devices.flat))
    try:
        cache = _compiled.setdefault(train, {})
    except TypeError:  # not weakly referenceable: compile without caching
        return _build(lambda: train, axes, mesh)
    if key not in cache:
        cache[key] = _build(weakref.ref(train), axes, mesh)
    return cache[key]


def run(
    train: Callable[..., Any],
    hyperparameters: Mapping[str, Any],
    *args: Any,
    in_axes: InAxes = None,
    shard: bool = False,
    devices: Sequence[jax.Device] | None = None,
) -> SweepResult:
    """Runs `train(*args, **config)` for every configuration, vmapped in one `jax.jit`.

    The compiled program is cached per `train` object (pass the same function, not a fresh
    lambda, to reuse it): a second call with a grid of the same size and arguments of the same
    shapes runs without tracing or compiling again, so a long training can be cut into chunks,
    each one call, with the training state passed back in (`in_axes=(0, ...)`).

    Args:
      train: a function of the positional `args` and one keyword argument per hyperparameter
        (each a scalar tracer), returning a pytree of arrays. Build the optimizer inside it.
      hyperparameters: name -> 1-D array of values, one entry per configuration (see :func:`grid`).
        Values that are not JAX arrays (lists, NumPy arrays) are checked and converted as
        :func:`grid` does; JAX arrays are taken as they are, but must be finite too.
      *args: extra arguments to `train`: data (shared by all configurations) or a state carried
        between calls (one slice per configuration).
      in_axes: for each of `args`, 0 if its arrays have a leading axis with one entry per
        configuration, None if every configuration gets the whole argument; a single 0 or None
        applies to all. As in `jax.vmap`.
      shard: split the configurations across `devices` along a 1-D mesh axis named "sweep" with
        `jax.sharding.NamedSharding`; shared arguments are replicated. The number of
        configurations must be a multiple of the number of devices, else a `ValueError` says so
        (no silent padding or fallback).
      devices: the devices to shard over; default all of `jax.devices()`.

    Returns:
      A :class:`SweepResult` of the hyperparameters and the results of `train`, each leaf with
      a leading axis of one entry per configuration (sharded along it when `shard`).

    Examples:
      >>> def train(x, scale):
      ...     return {"y": scale * x}
      >>> result = rj.sweep.run(train, rj.sweep.grid(scale=[1.0, 2.0]), jnp.ones(3))
      >>> result.results["y"]
      Array([[1., 1., 1.],
             [2., 2., 2.]], dtype=float32)
    """
    if not isinstance(hyperparameters, Mapping):
        raise TypeError(
            "`hyperparameters` must be a mapping of name -> 1-D values, as "
            f"rj.sweep.grid(learning_rate=[...]) returns; got {hyperparameters!r}."
        )
    if not callable(train):
        raise TypeError(
            f"`train` must be a function of the extra arguments and the hyperparameters, got "
            f"{train!r}."
        )
    # Lists and NumPy arrays get the checks of `grid`: jnp.asarray would wrap int64 values
    # into int32 and turn reals beyond float32 into inf without a word.
    hyperparameters = {
        name: _checked_array(name, values)
        if isinstance(values, jax.Array)
        else jnp.asarray(_as_values(name, values))
        for name, values in hyperparameters.items()
    }
    axes = _normalized_in_axes(in_axes, len(args))
    size = _check_sizes(hyperparameters, args, axes)
    if not isinstance(shard, bool):  # shard="False" would shard
        raise TypeError(f"`shard` must be True or False, got {shard!r}.")
    mesh = _mesh(devices, size) if shard else None
    results = _compiled_sweep(train, axes, mesh)(hyperparameters, args)
    return SweepResult(hyperparameters=hyperparameters, results=results)


__all__ = ["SWEEP_AXIS", "Best", "SweepResult", "grid", "run"]
