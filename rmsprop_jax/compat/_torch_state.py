"""Checkpoint conversion between `torch.optim.RMSprop` and `rmsprop_jax.compat.torch_rmsprop`.

PyTorch keeps, per parameter index, `step`, `square_avg` and, depending on the flags,
`momentum_buffer` and `grad_avg`; the preset keeps the same numbers as the `nu`, `trace` and
`mu` trees of its state (complex leaves as `view_as_real` pairs) and one shared step count.
Only a state marked by the preset's :class:`~rmsprop_jax.compat._torch.TorchLayoutState` is
converted: other RMSprop states (`rj.rmsprop(lr, momentum=...)` applies the rate before its
buffer) hold numbers that mean something else.

Parameters are matched by name when PyTorch recorded `param_names` (an optimizer built from
`model.named_parameters()`, PyTorch >= 2.6), by order otherwise; see :func:`torch_name`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax.compat import _torch_names
from rmsprop_jax.compat._common import view_as_real
from rmsprop_jax.compat._torch import TorchLayoutState
from rmsprop_jax.transform import ScaleByCenteredRmsState, ScaleByRmsState

_STATS = (ScaleByRmsState, ScaleByCenteredRmsState)
# Keys every `torch.optim.RMSprop` group has; Adam's and SGD's groups lack `alpha`.
_GROUP_KEYS = ("params", "lr", "alpha", "eps", "weight_decay", "momentum", "centered")
# Group entries that describe the parameters, not how they are optimized.
_NOT_SETTINGS = ("params", "param_names")
MatchBy = Literal["auto", "order"]


def torch_chains(state: Any) -> list[tuple[Any, ...]]:
    """The chain states of the `torch_rmsprop` presets inside `state`, in tree order."""

    def is_chain(node: Any) -> bool:
        return type(node) is tuple and any(isinstance(e, TorchLayoutState) for e in node)

    return [node for node in jax.tree.leaves(state, is_leaf=is_chain) if is_chain(node)]


def _not_torch_error(what: str, state: Any) -> ValueError:
    has_stats = any(
        isinstance(node, _STATS)
        for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _STATS))
    )
    if not has_stats:
        return ValueError(
            f"{what} has no RMS statistics; pass a `rmsprop_jax.compat.torch_rmsprop` preset."
        )
    return ValueError(
        f"{what} is an RMSprop state but not one of `rmsprop_jax.compat.torch_rmsprop`. Only "
        "that preset keeps torch's numbers: `rj.rmsprop(lr, momentum=...)` applies the rate "
        "before its momentum buffer, so a torch `momentum_buffer` copied into it would make the "
        "next step wrong by a factor of about 1/lr. Build the optimizer with "
        "`rmsprop_jax.compat.torch_rmsprop`."
    )


def single_chain(state: Any, what: str) -> tuple[Any, ...]:
    """The one `torch_rmsprop` chain state in `state`; `ValueError` for none or several."""
    chains = torch_chains(state)
    if not chains:
        raise _not_torch_error(what, state)
    if len(chains) > 1:
        raise ValueError(
            f"{what} holds {len(chains)} `torch_rmsprop` states; this conversion takes one. "
            "Convert the state of a single `rmsprop_jax.compat.torch_rmsprop`."
        )
    return chains[0]


def chain_parts(chain: tuple[Any, ...]) -> tuple[Any, Any | None]:
    """The statistics and the momentum state (None without momentum) of one preset chain."""
    stats = [node for node in chain if isinstance(node, _STATS)]
    traces = [node for node in chain if isinstance(node, optax.TraceState)]
    if len(stats) != 1 or len(traces) > 1:
        raise ValueError(
            f"A `torch_rmsprop` state holds one RMS statistic and at most one momentum buffer; "
            f"this one holds {len(stats)} and {len(traces)}."
        )
    return stats[0], (traces[0] if traces else None)


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
                f"{settings(group)}); one `torch_rmsprop` reproduces one group. Convert "
                "each group into its own preset and combine them with `optax.partition`."
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


def leaf_indices(
    param_groups: Sequence[Mapping[str, Any]], params: Any, match_by: MatchBy = "auto"
) -> list[int]:
    """The torch parameter index of each leaf of `params`, in `jax.tree.leaves` order.

    By name (:func:`_torch_names.torch_name` of each leaf's path) when every group records
    `param_names` and `match_by` is "auto"; by position in the groups' `params` otherwise.
    """
    if match_by not in ("auto", "order"):
        raise ValueError(f"`match_by` must be 'auto' or 'order', got {match_by!r}.")
    indices = [int(i) for group in param_groups for i in group["params"]]
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if len(indices) != len(paths):
        raise ValueError(
            f"The torch optimizer has {len(indices)} parameters but `params` has {len(paths)} "
            "leaves; pass the parameters whose `jax.tree.leaves` order is the torch order."
        )
    if match_by == "order" or any("param_names" not in group for group in param_groups):
        return indices
    names = [str(name) for group in param_groups for name in group["param_names"]]
    return _torch_names.match(names, indices, paths)


def to_numpy(tensor: Any) -> np.ndarray:
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu().resolve_conj()
    return np.asarray(tensor)


def import_torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "`state_to_torch` builds torch tensors and needs PyTorch: "
            "pip install 'rmsprop-jax[conformance]'."
        ) from error
    return torch


def step_count(per_param: Mapping[Any, Any], indices: Sequence[int]) -> jax.Array:
    """The step count shared by the parameters `indices`; `ValueError` when they differ."""
    steps = {float(to_numpy(per_param[i]["step"])) for i in indices}
    if len(steps) != 1:
        raise ValueError(f"Torch parameters have different step counts {sorted(steps)}.")
    return jnp.asarray(int(steps.pop()), jnp.int32)


def fill_chain(
    chain: tuple[Any, ...],
    per_param: Mapping[Any, Any],
    indices: Sequence[int],
    params: Any,
    count: jax.Array,
) -> tuple[Any, ...]:
    """`chain` (a preset's initial state for `params`) holding the torch state of `indices`."""
    paths_and_params = jax.tree_util.tree_flatten_with_path(params)[0]

    def convert(key: str, like: Any) -> Any:
        converted = []
        for index, (path, param), reference in zip(
            indices, paths_and_params, jax.tree.leaves(like), strict=True
        ):
            value = to_numpy(per_param[index][key])
            if np.iscomplexobj(value) != jnp.iscomplexobj(param) or value.shape != jnp.shape(param):
                raise ValueError(
                    f"Torch {key!r} of parameter {index} has shape {value.shape} and dtype "
                    f"{value.dtype}, but the parameter at {jax.tree_util.keystr(path)} has "
                    f"shape {jnp.shape(param)} and dtype {jnp.result_type(param)}."
                )
            converted.append(jnp.asarray(view_as_real(value), reference.dtype))
        return jax.tree.unflatten(jax.tree.structure(like), converted)

    def fill(node: Any) -> Any:
        if isinstance(node, _STATS):
            fields = {"count": count, "nu": convert("square_avg", node.nu)}
            if isinstance(node, ScaleByCenteredRmsState):
                fields["mu"] = convert("grad_avg", node.mu)
            return node._replace(**fields)
        if isinstance(node, optax.TraceState):
            return node._replace(trace=convert("momentum_buffer", node.trace))
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=count)
        return node

    return tuple(fill(node) for node in chain)


def replace_chains(state: Any, new_chains: Sequence[tuple[Any, ...]]) -> Any:
    """`state` with its `torch_rmsprop` chain states replaced, in tree order, by `new_chains`."""
    chains = torch_chains(state)
    replacements = {id(old): new for old, new in zip(chains, new_chains, strict=True)}
    return jax.tree.map(
        lambda node: replacements.get(id(node), node),
        state,
        is_leaf=lambda node: id(node) in replacements,
    )


def check_shapes(stats: Any, params: Any) -> None:
    for param, value in zip(jax.tree.leaves(params), jax.tree.leaves(stats.nu), strict=True):
        expected = jnp.shape(view_as_real(param))
        if jnp.shape(value) != expected:
            raise ValueError(
                f"The optax state has a leaf of shape {jnp.shape(value)} where the parameter "
                f"of shape {jnp.shape(param)} needs {expected}; pass the parameters the state "
                "was initialized with."
            )


def chain_to_torch(
    chain: tuple[Any, ...], params: Any, indices: Sequence[int]
) -> dict[int, dict[str, Any]]:
    """The torch per-parameter state of one preset chain, keyed by torch index."""
    torch = import_torch()
    stats, trace = chain_parts(chain)
    count = int(stats.count)
    if count == 0:
        return {}

    def tensors(tree: Any) -> list[Any]:
        out = []
        for param, value in zip(jax.tree.leaves(params), jax.tree.leaves(tree), strict=True):
            value = np.array(value)
            if jnp.iscomplexobj(param):
                value = (value[..., 0] + 1j * value[..., 1]).astype(jnp.result_type(param))
            out.append(torch.from_numpy(value))
        return out

    fields = {"square_avg": tensors(stats.nu)}
    if trace is not None:
        fields["momentum_buffer"] = tensors(trace.trace)
    if isinstance(stats, ScaleByCenteredRmsState):
        fields["grad_avg"] = tensors(stats.mu)
    return {
        index: {"step": torch.tensor(float(count))}
        | {key: values[position] for key, values in fields.items()}
        for position, index in enumerate(indices)
    }


def state_from_torch(
    state_dict: Mapping[str, Any],
    params: Any,
    optimizer: optax.GradientTransformation,
    *,
    match_by: MatchBy = "auto",
) -> optax.OptState:
    """The state of `optimizer` (a `torch_rmsprop`) equal to a torch RMSprop `state_dict()`.

    Args:
      state_dict: `torch.optim.RMSprop.state_dict()`: per-parameter `step`, `square_avg`
        and, with the matching flags, `momentum_buffer` and `grad_avg`.
      params: the parameters. When torch recorded `param_names` (an optimizer built from
        `model.named_parameters()`), each leaf is matched to the torch parameter whose name is
        its path with the keys joined by dots: `params["layer"]["weight"]` and
        `params["layer.weight"]` are both `"layer.weight"`, `params[0]["bias"]` is `"0.bias"`.
        Otherwise the leaves in `jax.tree.leaves` order are the torch parameters in its order.
      optimizer: a :func:`rmsprop_jax.compat.torch_rmsprop` built with the same `centered`
        and (zero or non-zero) `momentum` as the torch optimizer; it may be wrapped (for
        example by `optax.inject_hyperparams`).
      match_by: "auto" (names where torch recorded them, order otherwise) or "order" (ignore
        the names).

    Returns:
      `optimizer.init(params)` with the statistics, momentum buffer and step count (also the
      learning-rate schedule's count) taken from `state_dict`. A torch optimizer that has not
      stepped yet gives the initial state.

    Raises:
      ValueError: on a `state_dict` that is not a torch RMSprop's (naming the missing key), an
        `optimizer` that is not a `torch_rmsprop` (such as `rj.rmsprop`, whose momentum buffer
        holds other numbers), groups with different settings, a different number of
        parameters, a name with no leaf, a shape or complex/real mismatch, a parameter without
        state, differing step counts, or differing `centered`/`momentum`.
    """
    param_groups, per_param = check_state_dict(state_dict)
    check_equal_settings(param_groups)
    indices = leaf_indices(param_groups, params, match_by)
    opt_state = optimizer.init(params)
    chain = single_chain(opt_state, "The state of `optimizer`")
    stats, trace = chain_parts(chain)
    check_flags(param_groups[0], stats, trace)
    if not per_param:
        return opt_state
    check_entries(per_param, indices, param_groups[0])
    count = step_count(per_param, indices)
    return replace_chains(opt_state, [fill_chain(chain, per_param, indices, params, count)])


def state_to_torch(
    opt_state: optax.OptState,
    params: Any,
    param_groups: Sequence[Mapping[str, Any]],
    *,
    match_by: MatchBy = "auto",
) -> dict[str, Any]:
    """A `state_dict` for `torch.optim.RMSprop.load_state_dict` equal to a `torch_rmsprop` state.

    Args:
      opt_state: the state of a :func:`rmsprop_jax.compat.torch_rmsprop`.
      params: the parameters, matched to torch's as in :func:`state_from_torch`.
      param_groups: `torch_optimizer.state_dict()["param_groups"]` of the optimizer that will
        load the result; its settings (learning rate, flags) are kept as they are.
      match_by: "auto" (names where torch recorded them, order otherwise) or "order".

    Returns:
      `{"state": {index: {"step", "square_avg", ...}}, "param_groups": [...]}` with torch
      tensors; an empty `state` when no update has been applied yet.

    Raises:
      ValueError: on groups that are not a torch RMSprop's or have different settings, a state
        that is not a `torch_rmsprop`'s, a different number of parameters, a name with no
        leaf, or differing `centered`/`momentum`.
    """
    param_groups = check_param_groups(param_groups)
    check_equal_settings(param_groups)
    indices = leaf_indices(param_groups, params, match_by)
    chain = single_chain(opt_state, "`opt_state`")
    stats, trace = chain_parts(chain)
    check_flags(param_groups[0], stats, trace)
    check_shapes(stats, params)
    state = chain_to_torch(chain, params, indices)
    return {"state": dict(sorted(state.items())), "param_groups": [dict(g) for g in param_groups]}
