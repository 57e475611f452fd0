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
any out-of-range value.

Hyperparameters stay float32 whatever the parameter dtype: :func:`grid` returns float32 arrays
and the optimizer computes in float32 for bfloat16 parameters. One exception comes from optax:
`optax.inject_hyperparams` stores its hyperparameters in the dtype of the parameters, so with
bfloat16 parameters a learning rate of 1e-3 is stored (and rounded) as 9.9945e-4. Pass
``optax.inject_hyperparams(rj.rmsprop, hyperparam_dtype=jnp.float32)`` to keep them exact.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

SWEEP_AXIS = "sweep"

InAxes = int | None | Sequence[int | None]


_INT32 = np.iinfo(np.int32)
_FLOAT32 = np.finfo(np.float32)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool | np.bool_) or getattr(value, "dtype", None) == np.bool_


def _as_values(name: str, values: Any) -> np.ndarray:
    """`values` as the int32 or float32 array a sweep passes on, or an error naming `name`.

    Every conversion NumPy would make silently is refused instead: integers outside int32
    (which `astype` wraps around), reals outside float32 (which become inf) or so small that
    they become 0, ragged lists, and booleans (a structural flag such as `centered` cannot be
    swept under `jax.vmap`, and True among numbers would silently count as 1).
    """
    wrap = (
        f"The values of `{name}` must be a non-empty 1-D sequence of numbers, got {values!r}. "
        f"Wrap a single value in a list: {name}=[...]."
    )
    if isinstance(values, str | bytes | Mapping):
        raise ValueError(wrap)
    try:
        array = np.asarray(values)
    except ValueError as error:  # a ragged list: NumPy cannot make one array of it
        raise ValueError(
            f"The values of `{name}` must be a flat list of numbers, got {values!r} ({error})."
        ) from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(wrap)
    # np.asarray([1, True]) is [1, 1]: look at the elements as given, not at the array.
    given = values if isinstance(values, list | tuple) else array
    if array.dtype == np.bool_ or any(map(_is_bool, given)):
        raise TypeError(
            f"The values of `{name}` must be real numbers, got {values!r}: booleans are refused, "
            "since a structural flag cannot vary inside one compiled sweep. Sweep it with one "
            "`rj.sweep.run` per setting."
        )
    # Python ints beyond int64 make an object array: check them as the Python ints they are.
    integers = np.issubdtype(array.dtype, np.integer) or (
        array.dtype == object and all(isinstance(v, int | np.integer) for v in array)
    )
    if integers:
        bad = [v for v in array.tolist() if not _INT32.min <= v <= _INT32.max]
        if bad:
            raise ValueError(
                f"The values of `{name}` are integers, which a sweep stores as int32, but "
                f"{bad[0]!r} lies outside [{_INT32.min}, {_INT32.max}]: got {values!r}. "
                "Pass them as floats if they are not meant as integers."
            )
        return array.astype(np.int32)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"The values of `{name}` must be real numbers, got {values!r}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"The values of `{name}` must be finite, got {values!r}.")
    with np.errstate(over="ignore"):  # overflow is reported below, naming the value
        as_float32 = array.astype(np.float32)
    overflow = array[~np.isfinite(as_float32)]
    if overflow.size:
        raise ValueError(
            f"The values of `{name}` must fit in float32 (magnitude at most {_FLOAT32.max:.4g}), "
            f"but {overflow[0].item()!r} does not: got {values!r}."
        )
    underflow = array[(as_float32 == 0) & (array != 0)]
    if underflow.size:
        raise ValueError(
            f"The values of `{name}` must be representable in float32, but "
            f"{underflow[0].item()!r} rounds to 0 (the smallest positive float32 is about "
            f"{_FLOAT32.smallest_subnormal:.4g}): got {values!r}."
        )
    return as_float32


def grid(*, product: bool = True, **values: Any) -> dict[str, jax.Array]:
    """Builds the configurations of a sweep from named lists of values.

    Args:
      product: take every combination of the values (the cartesian product, the first name
        varying slowest, so a result reshapes to `(len(values_1), len(values_2), ...)`), or,
        when False, pair the i-th values of each name (all lists must then have one length).
      **values: for each hyperparameter, a 1-D sequence of its values. Real values become
        float32; integer values (a random seed, for example) become int32. Booleans are
        refused: a structural flag (`centered`, `nesterov`) changes the program, so sweep it
        with one :func:`run` per setting.

    Returns:
      A dict from name to a 1-D array, all of one length: the number of configurations.

    Raises:
      ValueError: no values were given, a list is empty, nested, ragged or not finite, an
        integer lies outside int32, a real value overflows float32 or rounds to 0 in it, or
        (with `product=False`) the lists differ in length. The message names the argument.
      TypeError: a value is not a real number, or is a boolean.

    Example:
      >>> g = grid(learning_rate=[0.5, 1.0, 2.0], decay=[0.9, 0.99])
      >>> g["learning_rate"].tolist(), g["decay"].dtype
      ([0.5, 0.5, 1.0, 1.0, 2.0, 2.0], dtype('float32'))
      >>> grid(product=False, learning_rate=[0.5, 1.0], decay=[0.9, 0.99])["learning_rate"].tolist()
      [0.5, 1.0]
    """
    if not isinstance(product, bool):  # grid(product="no") would take the product
        raise TypeError(f"`product` must be True or False, got {product!r}.")
    if not values:
        raise ValueError("`grid` needs at least one named list of values, e.g. grid(decay=[0.9]).")
    arrays = {name: _as_values(name, value) for name, value in values.items()}
    if product:
        indices = np.array(list(itertools.product(*(range(a.size) for a in arrays.values()))))
        return {name: jnp.asarray(a[indices[:, i]]) for i, (name, a) in enumerate(arrays.items())}
    lengths = {name: a.size for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"`grid(product=False)` pairs values by position, so every list needs the same "
            f"length; got lengths {lengths}."
        )
    return {name: jnp.asarray(a) for name, a in arrays.items()}


class Best(NamedTuple):
    """The best configuration of a sweep under one metric."""

    index: int
    hyperparameters: dict[str, float]
    value: float
    results: Any


class SweepResult(NamedTuple):
    """The configurations of a sweep and what `train` returned for each, along axis 0."""

    hyperparameters: dict[str, jax.Array]
    results: Any

    @property
    def size(self) -> int:
        """The number of configurations."""
        return int(next(iter(self.hyperparameters.values())).shape[0])

    def config(self, index: int) -> dict[str, float]:
        """The hyperparameters of configuration `index`, as Python numbers.

        Raises:
          IndexError: `index` lies outside [-size, size) (JAX indexing would clamp it and
            silently return the last or first configuration).
          TypeError: `index` is not an integer.
        """
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"`index` must be an integer, got {index!r}.")
        if not -self.size <= index < self.size:
            raise IndexError(
                f"`index` {index} is out of range for a sweep of {self.size} configurations."
            )
        return {name: values[index].item() for name, values in self.hyperparameters.items()}

    def metric(self, key: str | Callable[[Any], Any]) -> np.ndarray:
        """One number per configuration: `results[key]` (or attribute `key`), or `key(results)`."""
        if callable(key):
            values = key(self.results)
        elif isinstance(self.results, Mapping) and key in self.results:
            values = self.results[key]
        elif not isinstance(self.results, Mapping) and hasattr(self.results, key):
            values = getattr(self.results, key)
        else:
            raise KeyError(f"The results have no entry {key!r}; pass a name or a function.")
        values = np.asarray(values)
        if values.shape != (self.size,):
            raise ValueError(
                f"Metric {key!r} has shape {values.shape}, but needs one number per "
                f"configuration, shape ({self.size},). Reduce it first, e.g. "
                "`best(lambda r: r['loss'][:, -1])`."
            )
        return values

    def best(self, key: str | Callable[[Any], Any], mode: str = "min") -> Best:
        """The configuration with the lowest (`mode="min"`) or highest (`"max"`) metric.

        A configuration whose metric is NaN, or infinite in the direction being optimized
        (+inf for `"min"`, -inf for `"max"`), diverged: it is never the best one, even when
        every other configuration is worse. Ties go to the first configuration.

        Raises:
          ValueError: `mode` is neither "min" nor "max", the metric is not one real number per
            configuration, or no configuration is eligible (all NaN or diverged to inf).
          KeyError: the results have no entry `key`.

        Example:
          >>> r = SweepResult({"lr": jnp.array([0.5, 0.25])}, {"loss": jnp.array([3.0, 1.0])})
          >>> r.best("loss").hyperparameters, r.best("loss", mode="max").value
          ({'lr': 0.25}, 3.0)
        """
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}.")
        values = self.metric(key)
        if values.dtype == object or np.iscomplexobj(values):
            raise ValueError(f"Metric {key!r} must be real numbers, got dtype {values.dtype}.")
        ranked = values.astype(np.float64)
        diverged = np.inf if mode == "min" else -np.inf
        eligible = ~np.isnan(ranked) & (ranked != diverged)
        if not np.any(eligible):
            raise ValueError(
                f"No configuration is eligible as the best under {key!r} (mode={mode!r}): every "
                f"value is NaN or {diverged}, the mark of a diverged run. Got {values.tolist()}."
            )
        # Ineligible values rank last; argmin/argmax then return the first of the best.
        if mode == "min":
            index = int(np.argmin(np.where(eligible, ranked, np.inf)))
        else:
            index = int(np.argmax(np.where(eligible, ranked, -np.inf)))
        return Best(
            index=index,
            hyperparameters=self.config(index),
            value=values[index].item(),
            results=jax.tree.map(lambda x: x[index], self.results),
        )


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
    sizes = {shape[0] if len(shape) == 1 else None for shape in shapes.values()}
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


def _build(train_ref: Callable[[], Callable], axes: tuple, mesh: Mesh | None) -> Callable:
    def sweep(hyperparameters, args):
        def one(hp, one_args):
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
        :func:`grid` does.
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

    Example:
      >>> def train(scale, x):
      ...     return {"y": scale * x}
      >>> result = run(lambda x, scale: train(scale, x), grid(scale=[1.0, 2.0]), jnp.ones(3))
      >>> result.results["y"].shape
      (2, 3)
    """
    # Lists and NumPy arrays get the checks of `grid`: jnp.asarray would wrap int64 values
    # into int32 and turn reals beyond float32 into inf without a word.
    hyperparameters = {
        name: values if isinstance(values, jax.Array) else jnp.asarray(_as_values(name, values))
        for name, values in hyperparameters.items()
    }
    axes = _normalized_in_axes(in_axes, len(args))
    size = _check_sizes(hyperparameters, args, axes)
    if not isinstance(shard, bool):  # shard="False" would shard
        raise TypeError(f"`shard` must be True or False, got {shard!r}.")
    mesh = _mesh(devices, size) if shard else None
    results = _compiled_sweep(train, axes, mesh)(hyperparameters, args)
    return SweepResult(hyperparameters=hyperparameters, results=results)
