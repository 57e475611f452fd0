"""Checkpoint conversion between `torch.optim.RMSprop` and `rmsprop_jax.compat.torch_rmsprop`.

PyTorch keeps, per parameter index, `step`, `square_avg` and, depending on the flags,
`momentum_buffer` and `grad_avg`; the preset keeps the same numbers as the `nu`, `trace` and
`mu` trees of its state (complex leaves as `view_as_real` pairs) and one shared step count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax.compat._common import view_as_real
from rmsprop_jax.transform import ScaleByCenteredRmsState, ScaleByRmsState

_STATS = (ScaleByRmsState, ScaleByCenteredRmsState)


def _find(state: Any, kinds: tuple[type, ...], what: str) -> list[Any]:
    nodes = [
        node
        for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds))
        if isinstance(node, kinds)
    ]
    if len(nodes) > 1:
        raise ValueError(
            f"The optimizer state holds {len(nodes)} {what}s; a `torch_rmsprop` state holds "
            "at most one. Convert the state of a single `rmsprop_jax.compat.torch_rmsprop`."
        )
    return nodes


def _replace(state: Any, kinds: tuple[type, ...], make: Any) -> Any:
    return jax.tree.map(
        lambda node: make(node) if isinstance(node, kinds) else node,
        state,
        is_leaf=lambda x: isinstance(x, kinds),
    )


def _torch_order(param_groups: Sequence[Mapping[str, Any]], params: Any) -> list[int]:
    """The torch parameter indices in group order, checked against the leaves of `params`."""
    if not param_groups:
        raise ValueError("`param_groups` is empty; pass the torch optimizer's param_groups.")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in param_groups]
    for index, group in enumerate(settings[1:], start=1):
        if group != settings[0]:
            raise ValueError(
                f"Torch param_groups 0 and {index} have different settings ({settings[0]} vs "
                f"{group}); one `torch_rmsprop` reproduces one group. Convert each group "
                "separately and combine them with `optax.partition`."
            )
    order = [int(i) for g in param_groups for i in g["params"]]
    n_leaves = len(jax.tree.leaves(params))
    if len(order) != n_leaves:
        raise ValueError(
            f"The torch optimizer has {len(order)} parameters but `params` has {n_leaves} "
            "leaves; pass the parameters whose `jax.tree.leaves` order is the torch order."
        )
    return order


def _check_flags(param_groups: Sequence[Mapping[str, Any]], stats: Any, trace: list[Any]) -> None:
    group = param_groups[0]
    torch_centered = bool(group.get("centered", False))
    torch_momentum = float(group.get("momentum", 0)) > 0
    ours_centered = isinstance(stats, ScaleByCenteredRmsState)
    if torch_centered != ours_centered:
        raise ValueError(
            f"The torch optimizer has centered={torch_centered} but the optax state has "
            f"centered={ours_centered}; build the preset with centered={torch_centered}."
        )
    if torch_momentum != bool(trace):
        raise ValueError(
            f"The torch optimizer has momentum={group.get('momentum', 0)} "
            f"({'a' if torch_momentum else 'no'} momentum buffer) but the optax state has "
            f"{'a' if trace else 'no'} momentum buffer; build the preset with the same momentum."
        )


def _to_numpy(tensor: Any) -> np.ndarray:
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu().resolve_conj()
    return np.asarray(tensor)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "`state_to_torch` builds torch tensors and needs PyTorch: "
            "pip install 'rmsprop-jax[conformance]'."
        ) from error
    return torch


def state_from_torch(
    state_dict: Mapping[str, Any], params: Any, optimizer: optax.GradientTransformation
) -> optax.OptState:
    """The state of `optimizer` (a `torch_rmsprop`) equal to a torch RMSprop `state_dict()`.

    Args:
      state_dict: `torch.optim.RMSprop.state_dict()`: per-parameter `step`, `square_avg`
        and, with the matching flags, `momentum_buffer` and `grad_avg`.
      params: the parameters, a pytree whose leaves in `jax.tree.leaves` order are the torch
        optimizer's parameters in its order.
      optimizer: a :func:`rmsprop_jax.compat.torch_rmsprop` built with the same `centered`
        and (zero or non-zero) `momentum` as the torch optimizer.

    Returns:
      `optimizer.init(params)` with the statistics, momentum buffer and step count (also the
      learning-rate schedule's count) taken from `state_dict`. A torch optimizer that has not
      stepped yet gives the initial state.

    Raises:
      ValueError: on a different number of parameters, a shape or complex/real mismatch, a
        parameter without state, differing step counts, or differing `centered`/`momentum`.
    """
    param_groups, per_param = state_dict["param_groups"], state_dict["state"]
    order = _torch_order(param_groups, params)
    opt_state = optimizer.init(params)
    stats = _find(opt_state, _STATS, "RMS statistic")
    if not stats:
        raise ValueError("`optimizer` has no RMS statistics; pass a `torch_rmsprop` preset.")
    trace = _find(opt_state, (optax.TraceState,), "momentum buffer")
    _check_flags(param_groups, stats[0], trace)
    if not per_param:
        return opt_state
    missing = [i for i in order if i not in per_param]
    if missing:
        raise ValueError(
            f"Torch parameters {missing} have no optimizer state (they never received a "
            "gradient), so there is no single step count to port."
        )
    steps = {float(_to_numpy(per_param[i]["step"])) for i in order}
    if len(steps) != 1:
        raise ValueError(f"Torch parameters have different step counts {sorted(steps)}.")
    count = jnp.asarray(int(steps.pop()), jnp.int32)

    paths_and_params = jax.tree_util.tree_flatten_with_path(params)[0]

    def convert(key: str, like: Any) -> Any:
        converted = []
        for index, (path, param), reference in zip(
            order, paths_and_params, jax.tree.leaves(like), strict=True
        ):
            value = _to_numpy(per_param[index][key])
            if np.iscomplexobj(value) != jnp.iscomplexobj(param) or value.shape != jnp.shape(param):
                raise ValueError(
                    f"Torch {key!r} of parameter {index} has shape {value.shape} and dtype "
                    f"{value.dtype}, but the parameter at {jax.tree_util.keystr(path)} has "
                    f"shape {jnp.shape(param)} and dtype {jnp.result_type(param)}."
                )
            converted.append(jnp.asarray(view_as_real(value), reference.dtype))
        return jax.tree.unflatten(jax.tree.structure(like), converted)

    def new_stats(node: Any) -> Any:
        fields = {"count": count, "nu": convert("square_avg", node.nu)}
        if isinstance(node, ScaleByCenteredRmsState):
            fields["mu"] = convert("grad_avg", node.mu)
        return node._replace(**fields)

    opt_state = _replace(opt_state, _STATS, new_stats)
    opt_state = _replace(
        opt_state,
        (optax.TraceState,),
        lambda node: node._replace(trace=convert("momentum_buffer", node.trace)),
    )
    return _replace(
        opt_state, (optax.ScaleByScheduleState,), lambda node: node._replace(count=count)
    )


def state_to_torch(
    opt_state: optax.OptState, params: Any, param_groups: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """A `state_dict` for `torch.optim.RMSprop.load_state_dict` equal to a `torch_rmsprop` state.

    Args:
      opt_state: the state of a :func:`rmsprop_jax.compat.torch_rmsprop`.
      params: the parameters, leaves in `jax.tree.leaves` order matching the torch order.
      param_groups: `torch_optimizer.state_dict()["param_groups"]` of the optimizer that will
        load the result; its settings (learning rate, flags) are kept as they are.

    Returns:
      `{"state": {index: {"step", "square_avg", ...}}, "param_groups": [...]}` with torch
      tensors; an empty `state` when no update has been applied yet.

    Raises:
      ValueError: on a different number of parameters or differing `centered`/`momentum`.
    """
    torch = _import_torch()
    order = _torch_order(param_groups, params)
    stats = _find(opt_state, _STATS, "RMS statistic")
    if not stats:
        raise ValueError("`opt_state` has no RMS statistics; pass a `torch_rmsprop` state.")
    stats = stats[0]
    trace = _find(opt_state, (optax.TraceState,), "momentum buffer")
    _check_flags(param_groups, stats, trace)
    for param, value in zip(jax.tree.leaves(params), jax.tree.leaves(stats.nu), strict=True):
        expected = jnp.shape(view_as_real(param))
        if jnp.shape(value) != expected:
            raise ValueError(
                f"The optax state has a leaf of shape {jnp.shape(value)} where the parameter "
                f"of shape {jnp.shape(param)} needs {expected}; pass the parameters the state "
                "was initialized with."
            )
    groups = [dict(g) for g in param_groups]
    count = int(stats.count)
    if count == 0:
        return {"state": {}, "param_groups": groups}

    def tensors(tree: Any) -> list[Any]:
        out = []
        for param, value in zip(jax.tree.leaves(params), jax.tree.leaves(tree), strict=True):
            value = np.array(value)
            if jnp.iscomplexobj(param):
                value = (value[..., 0] + 1j * value[..., 1]).astype(jnp.result_type(param))
            out.append(torch.from_numpy(value))
        return out

    fields = {"square_avg": tensors(stats.nu)}
    if trace:
        fields["momentum_buffer"] = tensors(trace[0].trace)
    if isinstance(stats, ScaleByCenteredRmsState):
        fields["grad_avg"] = tensors(stats.mu)
    state = {
        index: {"step": torch.tensor(float(count))}
        | {key: values[position] for key, values in fields.items()}
        for position, index in enumerate(order)
    }
    return {"state": state, "param_groups": groups}
