"""`grid`: the configurations of a sweep, checked so that no value changes on the way in."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_INT32 = np.iinfo(np.int32)
_FLOAT32 = np.finfo(np.float32)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool | np.bool_) or getattr(value, "dtype", None) == np.bool_


def require_finite(name: str, array: np.ndarray, given: Any) -> None:
    """`ValueError` naming `name` and the values as `given` unless every entry is finite."""
    if not np.all(np.isfinite(array)):
        raise ValueError(f"The values of `{name}` must be finite, got {given!r}.")


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
    require_finite(name, array, values)
    with np.errstate(over="ignore"):  # overflow is reported below, naming the value
        as_float32 = array.astype(np.float32)
    overflow = array[~np.isfinite(as_float32)]
    if overflow.size:
        raise ValueError(
            f"The values of `{name}` must fit in float32 (magnitude at most {_FLOAT32.max:.4g}), "
            f"but {overflow[0].item()!r} does not: got {values!r}."
        )
    # Below float32's smallest normal number a value is subnormal or 0 there, and XLA:CPU (as
    # GPUs commonly do) flushes subnormal operands to 0.
    underflow = array[(np.abs(as_float32) < _FLOAT32.smallest_normal) & (array != 0)]
    if underflow.size:
        raise ValueError(
            f"The values of `{name}` must be representable in float32, but "
            f"{underflow[0].item()!r} rounds to 0 there (XLA:CPU flushes magnitudes below "
            f"float32's smallest normal number, about {_FLOAT32.smallest_normal:.4g}, to 0): "
            f"got {values!r}."
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
        integer lies outside int32, a real value overflows float32 or rounds to 0 in it (or
        below its smallest normal number, which XLA:CPU flushes to 0), or
        (with `product=False`) the lists differ in length. The message names the argument.
      TypeError: a value is not a real number, or is a boolean.

    Examples:
      >>> g = rj.sweep.grid(learning_rate=[0.5, 1.0, 2.0], decay=[0.9, 0.99])
      >>> g["learning_rate"].tolist(), g["decay"].dtype
      ([0.5, 0.5, 1.0, 1.0, 2.0, 2.0], dtype('float32'))
      >>> g = rj.sweep.grid(product=False, learning_rate=[0.5, 1.0], decay=[0.9, 0.99])
      >>> g["learning_rate"].tolist()
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
