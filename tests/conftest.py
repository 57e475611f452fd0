"""Shared fixtures: jit/eager variants and the policy for tests that need PyTorch or Keras."""

from __future__ import annotations

import importlib
import os

import jax
import pytest

REQUIRE_CONFORMANCE = os.environ.get("RMSPROP_JAX_REQUIRE_CONFORMANCE") == "1"


def pytest_configure(config):
    """With RMSPROP_JAX_TEST_INSTALLED=1 (the minimum-versions run of .ci/run), refuses to test
    a source checkout: the package must come from the installed wheel."""
    if os.environ.get("RMSPROP_JAX_TEST_INSTALLED") == "1":
        import rmsprop_jax

        if "site-packages" not in rmsprop_jax.__file__:
            raise pytest.UsageError(
                f"RMSPROP_JAX_TEST_INSTALLED=1 but rmsprop_jax comes from {rmsprop_jax.__file__}"
            )


def import_reference_framework(name: str):
    """Imports `name` (e.g. "torch", "keras"), or skips the test when it is not installed.

    With RMSPROP_JAX_REQUIRE_CONFORMANCE=1 (set by CI) a missing framework fails the test
    instead, so the conformance suite can never pass by skipping.
    """
    if name == "keras":
        os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if REQUIRE_CONFORMANCE:
            pytest.fail(f"{name} is required (RMSPROP_JAX_REQUIRE_CONFORMANCE=1): {error}")
        pytest.skip(f"{name} is not installed")


@pytest.fixture(params=["jit", "eager"])
def maybe_jit(request):
    """Applies `jax.jit` in the "jit" variant and nothing in the "eager" one."""
    if request.param == "jit":
        return jax.jit
    return lambda fn, **kwargs: fn


@pytest.fixture(scope="module")
def torch():
    """PyTorch, or a skip (a failure under RMSPROP_JAX_REQUIRE_CONFORMANCE=1)."""
    return import_reference_framework("torch")
