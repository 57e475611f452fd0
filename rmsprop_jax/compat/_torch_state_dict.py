"""Checks that a `torch.optim.RMSprop` state_dict is one, and reading its per-parameter state.

A torch RMSprop `state_dict()` is `{"state": {index: {"step", "square_avg", ...}},
"param_groups": [{"params": [index, ...], "lr", "alpha", "eps", "weight_decay", "momentum",
"centered", ...}]}`; groups built from `model.named_parameters()` also list `param_names`.
Anything else (a model's `state_dict()`, Adam's, SGD's) is refused naming what is missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax.compat._common import imported_step_count
from rmsprop_jax.transform import ScaleByCenteredRmsState

# Keys every `torch.optim.RMSprop` group has; Adam's and SGD's groups lack `alpha`.
_GROUP_KEYS = ("params", "lr", "alpha", "eps", "weight_decay", "momentum", "centered")
# Group entries that describe the parameters, not how they are optimized.
_NOT_SETTINGS = ("params", "param_names")


def check_state_dict(state_dict: Any) -> tuple[list[Mapping[str, Any]], Mapping[Any, Any]]:
    """`(param_groups, state)` of a torch RMSprop `state_dict()`, or `ValueError` naming the gap."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            "`state_dict` must be `torch.optim.RMSprop.state_dict()`, a dict with 'state' and "
            f"'param_groups', got a {type(state_dict).__name__}."
        )
    missing = [key for key in ("state", "param_groups") if key not in state_dict]
    if missing:
        keys = sorted(map(str, state_dict))
        shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
        raise ValueError(
            f"`state_dict` has no {' and no '.join(map(repr, missing))} (its keys: {shown}), so "
            "it is not an optimizer's state_dict(). A model's `state_dict()` holds parameters; "
            "pass `optimizer.state_dict()` of the `torch.optim.RMSprop`."
        )
    per_param = state_dict["state"]
    if not isinstance(per_param, Mapping):
        raise ValueError(
            f"`state_dict['state']` must map parameter indices to their state, got a "
            f"{type(per_param).__name__}."
        )
    return check_param_groups(state_dict["param_groups"]), per_param


def check_param_groups(param_groups: Any) -> list[Mapping[str, Any]]:
    """The groups as a list, each checked to be a torch RMSprop group."""
    if isinstance(param_groups, (str, bytes)) or not isinstance(param_groups, Sequence):
        raise ValueError(
            "`param_groups` must be the list `optimizer.state_dict()['param_groups']`, got a "
            f"{type(param_groups).__name__}."
        )
    if not param_groups:
        raise ValueError("`param_groups` is empty; pass the torch optimizer's param_groups.")
    for index, group in enumerate(param_groups):
        if not isinstance(group, Mapping):
            raise ValueError(f"param_groups[{index}] must be a dict, got {group!r}.")
        missing = [key for key in _GROUP_KEYS if key not in group]
        if missing:
            raise ValueError(
                f"param_groups[{index}] has no {', '.join(map(repr, missing))} (its keys: "
                f"{', '.join(sorted(map(str, group)))}), so it is not a torch.optim.RMSprop "
                "group; the state of another optimizer (Adam, SGD, ...) cannot be ported."
            )
        not_indices = [
            p for p in group["params"] if isinstance(p, bool) or not isinstance(p, int | np.integer)
        ]
        if not_indices:
            raise ValueError(
                f"param_groups[{index}]['params'] holds {type(not_indices[0]).__name__}s, "
                "not the parameter indices of a state_dict: pass "
                "`optimizer.state_dict()['param_groups']`, not `optimizer.param_groups`."
            )
        names = group.get("param_names")
        if names is not None and len(names) != len(group["params"]):
            raise ValueError(
                f"param_groups[{index}] has {len(group['params'])} params but "
                f"{len(names)} param_names."
            )
    return list(param_groups)


def settings(group: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer settings of a group: everything except the parameters and their names."""
    return {key: value for key, value in group.items() if key not in _NOT_SETTINGS}


def check_equal_settings(param_groups: Sequence[Mapping[str, Any]]) -> None:
    """`ValueError` unless every group has the settings of the first one."""
    first = settings(param_groups[0])
    for index, group in enumerate(param_groups[1:], start=1):
        if settings(group) != first:
            raise ValueError(
                f"Torch param_groups 0 and {index} have different settings ({first} vs "
                f"{settings(group)}); one `torch_rmsprop` reproduces one group. Build the "
                "optimizer with `rmsprop_jax.compat.torch_rmsprop_groups` for several."
            )


def check_flags(group: Mapping[str, Any], stats: Any, trace: Any | None) -> None:
    """`ValueError` unless the group's `centered` and momentum match the preset's state."""
    torch_centered = bool(group["centered"])
    torch_momentum = float(group["momentum"]) > 0
    ours_centered = isinstance(stats, ScaleByCenteredRmsState)
    if torch_centered != ours_centered:
        raise ValueError(
            f"The torch optimizer has centered={torch_centered} but the optax state has "
            f"centered={ours_centered}; build the preset with centered={torch_centered}."
        )
    if torch_momentum != (trace is not None):
        raise ValueError(
            f"The torch optimizer has momentum={group['momentum']} "
            f"({'a' if torch_momentum else 'no'} momentum buffer) but the optax state has "
            f"{'a' if trace is not None else 'no'} momentum buffer; build the preset with the "
            "same momentum."
        )


def required_keys(group: Mapping[str, Any]) -> tuple[str, ...]:
    """The per-parameter state keys torch keeps under the group's flags."""
    keys = ["step", "square_avg"]
    if float(group["momentum"]) > 0:
        keys.append("momentum_buffer")
    if bool(group["centered"]):
        keys.append("grad_avg")
    return tuple(keys)


def check_entries(
    per_param: Mapping[Any, Any], indices: Sequence[int], group: Mapping[str, Any]
) -> None:
    """`ValueError` naming the first parameter whose state lacks a key torch would keep."""
    missing = [i for i in indices if i not in per_param]
    if missing:
        raise ValueError(
            f"Torch parameters {missing} have no optimizer state (they never received a "
            "gradient), so there is no single step count to port."
        )
    for index in indices:
        entry = per_param[index]
        keys = sorted(map(str, entry)) if isinstance(entry, Mapping) else []
        absent = [key for key in required_keys(group) if key not in keys]
        if absent:
            raise ValueError(
                f"The torch state of parameter {index} has no {', '.join(map(repr, absent))} "
                f"(its keys: {', '.join(keys) or 'none'}); a torch.optim.RMSprop with "
                f"momentum={group['momentum']} and centered={group['centered']} keeps "
                f"{', '.join(map(repr, required_keys(group)))}."
            )


def to_numpy(tensor: Any) -> np.ndarray:
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu().resolve_conj()
    return np.asarray(tensor)


def step_count(per_param: Mapping[Any, Any], indices: Sequence[int]) -> jax.Array:
    """The step count shared by the parameters `indices`; `ValueError` when they differ or one
    is not a whole number from 0 to 2**31 - 1."""
    steps = {
        int(
            imported_step_count(
                to_numpy(per_param[i]["step"]), f"The torch `step` of parameter {i}"
            )
        )
        for i in indices
    }
    if len(steps) != 1:
        raise ValueError(f"Torch parameters have different step counts {sorted(steps)}.")
    return jnp.asarray(steps.pop(), jnp.int32)
