"""Shared fixtures: jit/eager variants and the policy for tests that need PyTorch or Keras.

Every test process sees 8 simulated CPU devices, so sharded layouts are tested in process, as
optax's own tests do: XLA reads the device count once, when JAX starts its CPU backend, so it
is set here, before anything imports JAX. Only the multi-process tests start processes.

Keras runs on JAX in every test process, whichever test imports it first (a docstring example
or a conformance test): `KERAS_BACKEND` defaults to "jax" here, so that a `~/.keras/keras.json`
naming another backend (Keras writes "tensorflow" there the first time it runs without the
variable) does not apply.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

SIMULATED_DEVICES = 8
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    + [f"{_DEVICE_FLAG}={SIMULATED_DEVICES}"]
)
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import pytest  # noqa: E402

# The examples import their shared helpers (`cli_help`, `digits_common`) as a script does, from
# their own folder; tests that load an example as a module need that folder on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

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


def import_reference_framework(name: str) -> ModuleType:
    """Imports `name` (e.g. "torch", "keras"), or skips the test when it is not installed.

    With RMSPROP_JAX_REQUIRE_CONFORMANCE=1 (set by CI) a missing framework fails the test
    instead, so the conformance suite can never pass by skipping.
    """
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


needs_simulated_devices = pytest.mark.skipif(
    jax.device_count() < SIMULATED_DEVICES,
    reason=f"needs {SIMULATED_DEVICES} devices (simulated CPU devices; this backend has fewer)",
)
