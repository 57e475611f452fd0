"""Checkpoint conversion between `torch.optim.RMSprop` and `rmsprop_jax.compat.torch_rmsprop`.

PyTorch keeps, per parameter index, `step`, `square_avg` and, depending on the flags,
`momentum_buffer` and `grad_avg`; the preset keeps the same numbers as the `nu`, `trace` and
`mu` trees of its state (complex leaves as `view_as_real` pairs) and one shared step count.
Only a state marked by the preset's :class:`~rmsprop_jax.compat._torch.TorchLayoutState` is
converted: other RMSprop states (`rj.rmsprop(lr, momentum=...)` applies the rate before its
buffer) hold numbers that mean something else.

Parameters are matched by name when PyTorch recorded `param_names` (an optimizer built from
`model.named_parameters()`, PyTorch >= 2.6), by order otherwise; see
:mod:`rmsprop_jax.compat._torch_mapping`. A `torch_rmsprop_groups` state holds one preset
state per torch parameter group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _validation
from rmsprop_jax.compat import _torch_mapping, _torch_state_dict
from rmsprop_jax.compat._common import check_imported_statistic, view_as_real
from rmsprop_jax.compat._torch import TorchLayoutState
from rmsprop_jax.transform import ScaleByCenteredRmsState, ScaleByRmsState

_STATS = (ScaleByRmsState, ScaleByCenteredRmsState)


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


def chains_of(state: Any, what: str) -> list[tuple[Any, ...]]:
    """The `torch_rmsprop` chain states in `state`; `ValueError` when there is none."""
    chains = torch_chains(state)
    if not chains:
        raise _not_torch_error(what, state)
    return chains


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


def import_torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "`state_to_torch` builds torch tensors and needs PyTorch: "
            "pip install 'rmsprop-jax[conformance]'."
        ) from error
    return torch


def fill_chain(
    chain: tuple[Any, ...],
    per_param: Mapping[Any, Any],
    indices: Sequence[int],
    paths_and_params: Sequence[tuple[Any, Any]],
    count: jax.Array,
) -> tuple[Any, ...]:
    """`chain` (a preset's initial state) holding the torch state of `indices`.

    `paths_and_params` are the chain's leaves (path and parameter), in tree order, one per
    entry of `indices`.
    """

    def convert(key: str, like: Any) -> Any:
        converted = []
        for index, (path, param), reference in zip(
            indices, paths_and_params, jax.tree.leaves(like), strict=True
        ):
            value = _torch_state_dict.to_numpy(per_param[index][key])
            if np.iscomplexobj(value) != jnp.iscomplexobj(param) or value.shape != jnp.shape(param):
                raise ValueError(
                    f"Torch {key!r} of parameter {index} has shape {value.shape} and dtype "
                    f"{value.dtype}, but the parameter at {jax.tree_util.keystr(path)} has "
                    f"shape {jnp.shape(param)} and dtype {jnp.result_type(param)}."
                )
            value = view_as_real(value)
            check_imported_statistic(
                value,
                f"Torch {key!r} of parameter {index}",
                mean_square=key == "square_avg",
            )
            # A copy: jnp.asarray of a NumPy view of the tensor may share its memory, which
            # torch's next step() overwrites in place (also that of an optimizer given the
            # same dict by load_state_dict()).
            converted.append(jnp.array(value, reference.dtype, copy=True))
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


def check_shapes(stats: Any, params: Sequence[Any]) -> None:
    for param, value in zip(params, jax.tree.leaves(stats.nu), strict=True):
        expected = jnp.shape(view_as_real(param))
        if jnp.shape(value) != expected:
            raise ValueError(
                f"The optax state has a leaf of shape {jnp.shape(value)} where the parameter "
                f"of shape {jnp.shape(param)} needs {expected}; pass the parameters the state "
                "was initialized with."
            )


def chain_to_torch(
    chain: tuple[Any, ...], params: Sequence[Any], indices: Sequence[int]
) -> dict[int, dict[str, Any]]:
    """The torch per-parameter state of one preset chain (leaves `params`), by torch index."""
    torch = import_torch()
    stats, trace = chain_parts(chain)
    count = int(stats.count)
    if count == 0:
        return {}

    def tensors(tree: Any) -> list[Any]:
        out = []
        for param, value in zip(params, jax.tree.leaves(tree), strict=True):
            value = np.array(value)
            if jnp.iscomplexobj(param):
                value = (value[..., 0] + 1j * value[..., 1]).astype(jnp.result_type(param))
            out.append(torch.from_numpy(value))
        return out

    step = torch.tensor(float(count))
    if step.item() != count:
        # torch's default float32 holds counts up to 2**24 exactly: past that the count would
        # come back rounded (2**31 - 1 as 2**31, past int32). torch keeps a loaded step's dtype.
        step = torch.tensor(float(count), dtype=torch.float64)
    fields = {"square_avg": tensors(stats.nu)}
    if trace is not None:
        fields["momentum_buffer"] = tensors(trace.trace)
    if isinstance(stats, ScaleByCenteredRmsState):
        fields["grad_avg"] = tensors(stats.mu)
    return {
        index: {"step": step.clone()} | {key: values[position] for key, values in fields.items()}
        for position, index in enumerate(indices)
    }


def state_from_torch(
    state_dict: Mapping[str, Any],
    params: Any,
    optimizer: optax.GradientTransformation,
    *,
    match_by: _torch_mapping.MatchBy = "auto",
) -> optax.OptState:
    """The state of `optimizer` (a `torch_rmsprop`) equal to a torch RMSprop `state_dict()`.

    Args:
      state_dict: `torch.optim.RMSprop.state_dict()`: per-parameter `step`, `square_avg`
        and, with the matching flags, `momentum_buffer` and `grad_avg`.
      params: the parameters. When torch recorded `param_names` (an optimizer built from
        `model.named_parameters()`), each leaf is matched to the torch parameter whose name is
        its path with the keys joined by dots: `params["layer"]["weight"]` and
        `params["layer.weight"]` are both `"layer.weight"`, `params[0]["bias"]` is `"0.bias"`.
        Otherwise the leaves in `jax.tree.leaves` order are the torch parameters in its order
        (within each group, for `torch_rmsprop_groups`).
      optimizer: a :func:`rmsprop_jax.compat.torch_rmsprop` built with the same `centered`
        and (zero or non-zero) `momentum` as the torch optimizer, or a
        :func:`rmsprop_jax.compat.torch_rmsprop_groups` with one group per torch group (each
        group's leaves exactly the torch group's parameters). It may be wrapped (for example
        by `optax.inject_hyperparams`).
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
        parameters or groups, a name with no leaf, a group whose leaves are not one torch
        group's parameters, a shape or complex/real mismatch, a parameter without state,
        differing step counts within a group, a `step` that is not a whole number from 0 to
        2**31 - 1, differing `centered`/`momentum`, or a state
        that holds a NaN or a negative `square_avg` (it would make every update NaN; an
        infinite `square_avg`, from squares past float32's range, is kept as torch keeps it).
      TypeError: on an `optimizer` that is not a built transformation (`torch_rmsprop`
        itself, not called).

    Examples:
      >>> import torch
      >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
      >>> opt = torch.optim.RMSprop([w], lr=0.01, momentum=0.9)
      >>> w.grad = torch.tensor([0.5, -0.5]); opt.step()
      >>> tx = rj.compat.torch_rmsprop(lr=0.01, momentum=0.9)
      >>> state = rj.compat.state_from_torch(opt.state_dict(), jnp.array(w.detach()), tx)
      >>> state[2].count, state[2].nu
      (Array(1, dtype=int32), Array([0.0025, 0.0025], dtype=float32))
    """
    _validation.check_transformation("optimizer", optimizer, "rj.compat.torch_rmsprop(lr=0.01)")
    param_groups, per_param = _torch_state_dict.check_state_dict(state_dict)
    opt_state = optimizer.init(params)
    chains = chains_of(opt_state, "The state of `optimizer`")
    parts = [chain_parts(chain) for chain in chains]
    assignments = _torch_mapping.assign(
        param_groups, params, [stats for stats, _ in parts], match_by
    )
    for (stats, trace), share in zip(parts, assignments, strict=True):
        _torch_state_dict.check_flags(share.group, stats, trace)
    if not per_param:
        return opt_state
    filled = []
    for chain, share in zip(chains, assignments, strict=True):
        _torch_state_dict.check_entries(per_param, share.indices, share.group)
        count = _torch_state_dict.step_count(per_param, share.indices)
        filled.append(fill_chain(chain, per_param, share.indices, share.leaves, count))
    return replace_chains(opt_state, filled)


def state_to_torch(
    opt_state: optax.OptState,
    params: Any,
    param_groups: Sequence[Mapping[str, Any]],
    *,
    match_by: _torch_mapping.MatchBy = "auto",
) -> dict[str, Any]:
    """A `state_dict` for `torch.optim.RMSprop.load_state_dict` equal to a `torch_rmsprop` state.

    Args:
      opt_state: the state of a :func:`rmsprop_jax.compat.torch_rmsprop` or
        :func:`rmsprop_jax.compat.torch_rmsprop_groups`.
      params: the parameters, matched to torch's as in :func:`state_from_torch`.
      param_groups: `torch_optimizer.state_dict()["param_groups"]` of the optimizer that will
        load the result; its settings (learning rate, flags) are kept as they are.
      match_by: "auto" (names where torch recorded them, order otherwise) or "order".

    Returns:
      `{"state": {index: {"step", "square_avg", ...}}, "param_groups": [...]}` with torch
      tensors; an empty `state` when no update has been applied yet. `step` is a tensor of
      torch's default float dtype (float32, as torch keeps it), or float64 past 2**24, where
      float32 would round the count.

    Raises:
      ValueError: on groups that are not a torch RMSprop's (or `optimizer.param_groups`, whose
        `params` are tensors) or have different settings, a state that is not a
        `torch_rmsprop`'s, a different number of parameters or groups, a name with no leaf, a
        group whose leaves are not one torch group's parameters, or differing
        `centered`/`momentum`.

    Examples:
      >>> import torch
      >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
      >>> opt = torch.optim.RMSprop([w], lr=0.01)
      >>> tx = rj.compat.torch_rmsprop(lr=0.01)
      >>> params = jnp.array([1.0, -2.0])
      >>> _, state = tx.update(jnp.array([0.5, -0.5]), tx.init(params))
      >>> state_dict = rj.compat.state_to_torch(state, params, opt.state_dict()["param_groups"])
      >>> opt.load_state_dict(state_dict)
      >>> opt.state[w]["step"], opt.state[w]["square_avg"]
      (tensor(1.), tensor([0.0025, 0.0025]))
    """
    param_groups = _torch_state_dict.check_param_groups(param_groups)
    chains = chains_of(opt_state, "`opt_state`")
    parts = [chain_parts(chain) for chain in chains]
    assignments = _torch_mapping.assign(
        param_groups, params, [stats for stats, _ in parts], match_by
    )
    state: dict[int, dict[str, Any]] = {}
    for chain, (stats, trace), share in zip(chains, parts, assignments, strict=True):
        _torch_state_dict.check_flags(share.group, stats, trace)
        leaves = [param for _, param in share.leaves]
        check_shapes(stats, leaves)
        state |= chain_to_torch(chain, leaves, share.indices)
    return {"state": dict(sorted(state.items())), "param_groups": [dict(g) for g in param_groups]}
