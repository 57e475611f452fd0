"""Keras variable names and their pairing with the leaves of a parameter tree."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax
import numpy as np

from rmsprop_jax._validation import shown
from rmsprop_jax.compat._torch_names import key_parts

MatchBy = Literal["auto", "names", "order"]
_SLOTS = ("velocity", "momentum", "average_gradient", "average")


def _optimizer_variables(keras_state: Any) -> Any:
    """The variables of a Keras optimizer (refusing other optimizers), or `keras_state`."""
    if not hasattr(keras_state, "variables") or isinstance(keras_state, Mapping):
        return keras_state
    # Adam's slots are also named `velocity` and `momentum`; only the class tells them apart.
    if not any(cls.__name__ == "RMSprop" for cls in type(keras_state).__mro__):
        raise ValueError(
            f"`keras_state` is a {type(keras_state).__name__}, not a keras.optimizers.RMSprop; "
            "its state cannot be ported into an RMSprop."
        )
    return keras_state.variables


_KERAS_STATE = (
    "a built keras.optimizers.RMSprop, its `variables`, or a dict from variable path to value"
)


def _variables(keras_state: Any) -> dict[str, np.ndarray]:
    """`{name without the optimizer's scope: value}` from an optimizer, variables or a dict."""
    keras_state = _optimizer_variables(keras_state)
    if isinstance(keras_state, Mapping):
        items = list(keras_state.items())
    elif isinstance(keras_state, str | bytes) or not hasattr(keras_state, "__iter__"):
        raise TypeError(f"`keras_state` must be {_KERAS_STATE}, got {shown(keras_state)}.")
    else:
        items = [(getattr(v, "path", None) or getattr(v, "name", None), v) for v in keras_state]
    out = {}
    for key, value in items:
        if key is None:  # an element of a sequence that is not a Keras variable
            raise TypeError(
                f"`keras_state` holds {shown(value)}, which is not a Keras variable (it has no "
                f"`path` or `name`); pass {_KERAS_STATE}."
            )
        if not isinstance(key, str):
            raise ValueError(f"Keras variable names must be strings, got {key!r}.")
        value = value.value if hasattr(value, "value") and hasattr(value, "assign") else value
        out[key.rsplit("/", 1)[-1]] = np.asarray(value)
    return out


def _keras_names(values: dict[str, np.ndarray]) -> tuple[list[str], dict[str, list[str]]]:
    """The model variables' names (`{ref}`) in order, and which slots each has."""
    if "iteration" not in values:
        raise ValueError(
            "The Keras state has no 'iteration' variable (its variables: "
            f"{list(values)[:8]}); pass a built `keras.optimizers.RMSprop` or its variables."
        )
    accumulators = [k for k in values if k.endswith("_gradient_accumulator")]
    if accumulators:
        raise ValueError(
            "The Keras optimizer uses gradient_accumulation_steps; converting its "
            "accumulators is not supported. Convert the state right after an update step from "
            "an optimizer without accumulation."
        )
    refs = [k[: -len("_velocity")] for k in values if k.endswith("_velocity")]
    if not refs:
        raise ValueError(
            f"The Keras state has no '*_velocity' variables (its variables: {list(values)[:8]}), "
            "so it is not an RMSprop's state (Adam, SGD, ... cannot be converted)."
        )
    slots = {slot: [r for r in refs if f"{r}_{slot}" in values] for slot in _SLOTS}
    return refs, slots


def _leaf_name(path: Any) -> str:
    """A leaf's Keras-style name: its keys joined by '_', any '/' in them made '_'."""
    return "_".join(key_parts(path)).replace("/", "_")


def _pairing(refs: list[str], params: Any, match_by: MatchBy) -> list[str]:
    """The Keras name paired with each leaf of `params`, in `jax.tree.leaves` order."""
    if match_by not in ("auto", "names", "order"):
        raise ValueError(f"`match_by` must be 'auto', 'names' or 'order', got {match_by!r}.")
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if len(paths) != len(refs):
        raise ValueError(
            f"The Keras optimizer has {len(refs)} variables but `params` has {len(paths)} "
            "leaves; pass the parameters the optimizer was built on."
        )
    names = [_leaf_name(p) for p in paths]
    known = set(refs)
    found = [n in known for n in names]
    if match_by == "order" or (match_by == "auto" and not any(found)):
        return refs
    if not all(found) or len(set(names)) != len(names):
        missing = [
            (jax.tree_util.keystr(p), n)
            for p, n, f in zip(paths, names, found, strict=True)
            if not f
        ]
        path, name = missing[0] if missing else (jax.tree_util.keystr(paths[0]), names[0])
        raise ValueError(
            f"The leaf at {path} of `params` is named {name!r} (its keys joined by '_'), but "
            f"the Keras variables are named {refs[:6]}; give the leaves Keras's paths "
            "(`{'dense': {'kernel': w}}` is 'dense_kernel'), or pass match_by='order'."
        )
    return names
