"""The API reference in docs/api/ names every public name of the package."""

from __future__ import annotations

import inspect
import types
from pathlib import Path

import pytest

import rmsprop_jax as rj

API = Path(__file__).resolve().parents[1] / "docs" / "api"


def public_names(module: types.ModuleType) -> list[str]:
    """`__all__`, or else what the module itself defines without a leading underscore."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and name != "TYPE_CHECKING"
        and not inspect.ismodule(value)
        and (getattr(value, "__module__", module.__name__) == module.__name__)
        and (inspect.isclass(value) or inspect.isfunction(value) or name.isupper())
    ]


def test_every_top_level_name_has_an_entry():
    page = (API / "rmsprop_jax.md").read_text()
    names = [name for name in rj.__all__ if not inspect.ismodule(getattr(rj, name))]
    missing = [name for name in names if f"rmsprop_jax.{name}\n" not in page]
    assert not missing, f"add to docs/api/rmsprop_jax.md: {missing}"


@pytest.mark.parametrize("module", [rj.compat, rj.sweep, rj.sharding, rj.checkpoint])
def test_every_submodule_name_is_documented_by_its_page(module):
    short = module.__name__.rsplit(".", 1)[1]
    page = (API / f"{short}.md").read_text()
    assert f".. automodule:: {module.__name__}\n   :members:" in page
    # automodule documents what the module defines (or lists in __all__) and has a docstring;
    # a constant needs its own entry.
    for name in public_names(module):
        value = getattr(module, name)
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            assert f"{module.__name__}.{name}\n" in page, f"add {name} to docs/api/{short}.md"
        else:
            assert inspect.getdoc(value), f"{module.__name__}.{name} has no docstring"
