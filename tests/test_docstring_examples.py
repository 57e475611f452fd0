"""The Examples sections of the library's docstrings run and print what they show (doctest).

Each public module's docstrings run with `rj`, `jax`, `jnp`, `np` and `optax` already
imported, as the examples assume.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import enable_x64

import rmsprop_jax as rj

# Private modules too: public names such as `rj.sweep.grid` are defined in them.
MODULES = sorted(
    {info.name for info in pkgutil.walk_packages(rj.__path__, prefix="rmsprop_jax.")}
    | {"rmsprop_jax"}
)
GLOBALS = {"rj": rj, "jax": jax, "jnp": jnp, "np": np, "optax": optax}
# Examples known to fail, with why. Strict: once fixed, the test fails until removed here.
KNOWN_FAILURES: dict[str, str] = {}


def test_modules_found():
    assert {"rmsprop_jax.alias", "rmsprop_jax.sweep", "rmsprop_jax.compat"} <= set(MODULES)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=True))
        if name in KNOWN_FAILURES
        else name
        for name in MODULES
    ],
)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    # The module's own names, as plain doctest gives them, plus the usual imports. JAX's
    # default dtypes (float32), as the examples print them, even in a run with x64 enabled.
    with enable_x64(False):
        for test in finder.find(module, name, globs={**vars(module), **GLOBALS}):
            if test.examples:
                runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} docstring example(s) of {name} failed (above)"
