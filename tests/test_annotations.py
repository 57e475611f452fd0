"""Every public function and method of the package is fully annotated (the wheel is typed)."""

from __future__ import annotations

import inspect

import pytest

import rmsprop_jax as rj

MODULES = [rj, rj.compat, rj.sweep, rj.sharding, rj.checkpoint]


def _public_functions():
    seen = set()
    for module in MODULES:
        names = getattr(module, "__all__", None) or [
            n for n in vars(module) if not n.startswith("_")
        ]
        for name in names:
            obj = getattr(module, name)
            public = inspect.isfunction(obj) and obj.__module__.startswith("rmsprop_jax")
            if public and obj not in seen:
                seen.add(obj)
                yield f"{obj.__module__}.{obj.__qualname__}", obj


PUBLIC = dict(_public_functions())


def test_the_public_api_is_found():
    assert "rmsprop_jax.alias.rmsprop" in PUBLIC
    assert "rmsprop_jax.compat._torch.torch_rmsprop" in PUBLIC
    assert len(PUBLIC) >= 15, sorted(PUBLIC)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_function_annotates_every_parameter_and_its_return(name):
    signature = inspect.signature(PUBLIC[name])
    missing = [
        p.name
        for p in signature.parameters.values()
        if p.annotation is inspect.Parameter.empty and p.name not in ("self", "cls")
    ]
    assert missing == [], f"{name}: parameters without a type: {missing}"
    assert signature.return_annotation is not inspect.Signature.empty, f"{name}: no return type"
