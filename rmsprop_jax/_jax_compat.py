"""The JAX APIs whose place or presence depends on the installed JAX version, in one module.

rmsprop-jax supports JAX 0.5.3 and newer. The core (every variant, storage format and preset)
uses only APIs that are present across that range. Explicit sharding (`AxisType.Explicit`,
where a traced value's sharding is part of its type) grew through those releases: its pieces
moved (`reshard` left `jax.experimental.shard` for `jax.sharding`) or were renamed
(`jax.sharding.use_mesh` became `jax.set_mesh`). The library reaches them only through this
module, which takes the newer spelling when it is there and the older equivalent otherwise,
and raises a :class:`FeatureUnavailableError` naming the feature and the JAX release it needs
when neither exists, rather than letting an `AttributeError` escape from inside JAX.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax import lax

# The oldest JAX release the package is tested with (pyproject.toml's floor).
MINIMUM_JAX = (0, 5, 3)


def _parse(version: str) -> tuple[int, ...]:
    """`"0.5.3"` -> (0, 5, 3); pre-release and local suffixes ("0.6.0rc1", "0.7.0.dev2") drop."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


JAX_VERSION: tuple[int, ...] = _parse(jax.__version__)


class FeatureUnavailableError(RuntimeError):
    """A feature that the installed JAX does not provide; the message names the release."""


def unavailable(feature: str, needs: str) -> FeatureUnavailableError:
    """The error for `feature`, which needs JAX `needs` (e.g. "0.6.0") or newer."""
    return FeatureUnavailableError(
        f"{feature} needs JAX {needs} or newer; this is JAX {jax.__version__}. "
        f"Upgrade with `pip install -U 'jax>={needs}'`."
    )


def typeof(x: Any) -> Any:
    """The abstract value (shape, dtype and, with explicit sharding, sharding) of `x`.

    `jax.typeof` (present from JAX 0.5.3 on), in one place with the other version-dependent
    calls so that a rename reaches one line.
    """
    return jax.typeof(x)


# `jax.sharding.AxisType` (present from JAX 0.5.3 on); None where the installed JAX has no
# axis types, in which case every mesh shards automatically and nothing is explicit.
AxisType: Any = getattr(jax.sharding, "AxisType", None)


def is_axis_type(value: Any, name: str) -> bool:
    """Whether `value` is the axis type `name` ("Auto", "Explicit" or "Manual")."""
    return AxisType is not None and value == getattr(AxisType, name, object())


def _find_reshard() -> Callable[..., Any] | None:
    if hasattr(jax.sharding, "reshard"):
        return jax.sharding.reshard  # its place in newer releases
    try:  # its place in JAX 0.5.3 (imported by name: newer JAX removed the module)
        return importlib.import_module("jax.experimental.shard").reshard
    except (ImportError, AttributeError):
        return None


_reshard = _find_reshard()


def reshard(x: Any, sharding: Any) -> Any:
    """`jax.sharding.reshard`: moves `x` to `sharding`, changing its type's sharding.

    Raises:
      FeatureUnavailableError: the installed JAX has no `reshard` (JAX 0.5.3 has it).
    """
    if _reshard is None:
        raise unavailable("Resharding an explicitly sharded value (jax.sharding.reshard)", "0.5.3")
    return _reshard(x, sharding)


def with_spec(sharding: Any, spec: Any) -> Any:
    """`sharding` (a `NamedSharding`) with its `PartitionSpec` replaced by `spec`.

    `NamedSharding.update(spec=...)` where it exists; on JAX 0.5.3 a new `NamedSharding` on
    the same mesh and memory kind, which is what `update` builds.
    """
    if hasattr(sharding, "update"):
        return sharding.update(spec=spec)
    return jax.sharding.NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)


def broadcasted_iota(dtype: Any, shape: tuple[int, ...], axis: int, sharding: Any) -> Any:
    """`lax.broadcasted_iota`, sharded as `sharding` when that is not None (explicit sharding).

    The `out_sharding` argument is passed only when there is one, so the automatic-sharding
    path is the plain call on every JAX release.
    """
    if sharding is None:
        return lax.broadcasted_iota(dtype, shape, axis)
    return lax.broadcasted_iota(dtype, shape, axis, out_sharding=sharding)


def reshape(x: Any, shape: tuple[int, ...], sharding: Any) -> Any:
    """`lax.reshape` to `shape`, sharded as `sharding` when that is not None."""
    if sharding is None:
        return lax.reshape(x, shape)
    return lax.reshape(x, shape, out_sharding=sharding)


@contextlib.contextmanager
def set_mesh(mesh: Any) -> Iterator[None]:
    """`with jax.set_mesh(mesh)`, or `jax.sharding.use_mesh` on releases without it (0.5.3).

    The context in which explicitly sharded arrays are created and jitted functions traced.

    Raises:
      FeatureUnavailableError: the installed JAX has neither (explicit sharding needs 0.5.3).
    """
    if hasattr(jax, "set_mesh"):
        manager = jax.set_mesh(mesh)
    elif hasattr(jax.sharding, "use_mesh"):
        manager = jax.sharding.use_mesh(mesh)
    else:
        raise unavailable("Explicit sharding (jax.set_mesh)", "0.5.3")
    with manager:
        yield
