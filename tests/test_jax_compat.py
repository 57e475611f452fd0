"""The version-dependent JAX calls: both spellings agree, and a missing one names its release."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import rmsprop_jax as rj
from rmsprop_jax import _jax_compat


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("0.5.3", (0, 5, 3)),
        ("0.10.2", (0, 10, 2)),
        ("0.6.0rc1", (0, 6, 0)),
        ("0.7.1.dev20250601+cuda12", (0, 7, 1)),
    ],
)
def test_version_parsing_keeps_major_minor_patch(text, parsed):
    assert _jax_compat._parse(text) == parsed


def test_installed_jax_is_at_least_the_supported_floor():
    assert _jax_compat.JAX_VERSION >= _jax_compat.MINIMUM_JAX, jax.__version__


def test_missing_reshard_raises_an_error_naming_the_feature_and_release(monkeypatch):
    monkeypatch.setattr(_jax_compat, "_reshard", None)
    with pytest.raises(_jax_compat.FeatureUnavailableError, match=r"reshard.*JAX 0\.5\.3"):
        _jax_compat.reshard(jnp.ones(2), None)


def test_missing_set_mesh_raises_an_error_naming_the_feature_and_release(monkeypatch):
    monkeypatch.delattr(jax, "set_mesh", raising=False)
    monkeypatch.delattr(jax.sharding, "use_mesh", raising=False)
    mesh = jax.make_mesh((1,), ("x",))
    with (
        pytest.raises(_jax_compat.FeatureUnavailableError, match=r"set_mesh.*JAX 0\.5\.3"),
        _jax_compat.set_mesh(mesh),
    ):
        pass


def test_set_mesh_makes_the_mesh_current():
    mesh = jax.make_mesh((1,), ("x",), axis_types=(_jax_compat.AxisType.Explicit,))
    with _jax_compat.set_mesh(mesh):
        current = jax.sharding.get_abstract_mesh()
        assert current.axis_names == ("x",)


def test_with_spec_builds_the_sharding_update_builds():
    mesh = jax.make_mesh((1,), ("x",))
    sharding = NamedSharding(mesh, PartitionSpec())
    new = _jax_compat.with_spec(sharding, PartitionSpec("x"))
    assert new == NamedSharding(mesh, PartitionSpec("x"))

    class WithoutUpdate:  # what a NamedSharding offers on JAX 0.5.3
        def __init__(self, inner):
            self.mesh, self.memory_kind = inner.mesh, inner.memory_kind

    fallback = _jax_compat.with_spec(WithoutUpdate(sharding), PartitionSpec("x"))
    assert fallback == new


def test_without_a_sharding_iota_and_reshape_are_the_plain_operations():
    iota = _jax_compat.broadcasted_iota(jnp.uint32, (3, 4), 1, None)
    np.testing.assert_array_equal(iota, np.broadcast_to(np.arange(4, dtype=np.uint32), (3, 4)))
    x = jnp.arange(12.0)
    np.testing.assert_array_equal(
        _jax_compat.reshape(x, (3, 4), None), np.arange(12.0).reshape(3, 4)
    )


def test_axis_type_names_are_recognised():
    assert _jax_compat.is_axis_type(_jax_compat.AxisType.Explicit, "Explicit")
    assert not _jax_compat.is_axis_type(_jax_compat.AxisType.Auto, "Explicit")
    assert not _jax_compat.is_axis_type("Explicit", "Explicit")


@pytest.mark.parametrize("moment_storage", ["float32", "bfloat16", "int8", "factored"])
def test_a_step_of_every_format_warns_nothing_from_the_library(moment_storage):
    """No deprecated JAX call on any supported release: on JAX 0.5.3, `jnp.shape` of the
    abstract shapes the gradient check compares warned in every update of a compressed
    format."""
    tx = rj.rmsprop(1e-3, moment_storage=moment_storage, centered=True, momentum=0.9)
    params = {"w": jnp.ones((256, 256)), "b": jnp.ones(3)}
    state = tx.init(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        updates, state = tx.update(params, state, params)
        jax.block_until_ready(jax.jit(tx.update)(params, state, params))
        optax.apply_updates(params, updates)
    ours = [w for w in caught if "rmsprop_jax" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
