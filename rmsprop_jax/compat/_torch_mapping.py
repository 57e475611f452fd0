"""Which torch parameter each leaf of a `torch_rmsprop` state stands for.

One preset state (one `torch_rmsprop`) takes every parameter, and then the torch groups must
share their settings. Several preset states (`torch_rmsprop_groups`) take one torch group
each. Leaves and torch parameters are paired by name where torch recorded `param_names` (see
:mod:`rmsprop_jax.compat._torch_names`), by position otherwise: over all parameters for one
preset state, within each group (the preset states in tree order being the torch groups in
order) for several.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax

from rmsprop_jax.compat import _torch_names, _torch_state_dict

MatchBy = Literal["auto", "order"]


class Assignment(NamedTuple):
    """One preset state's share: its leaves' paths and parameters, torch indices and group."""

    leaves: list[tuple[Any, Any]]
    indices: list[int]
    group: Mapping[str, Any]


def _use_names(param_groups: Sequence[Mapping[str, Any]], match_by: MatchBy) -> bool:
    if match_by not in ("auto", "order"):
        raise ValueError(f"`match_by` must be 'auto' or 'order', got {match_by!r}.")
    return match_by == "auto" and all("param_names" in group for group in param_groups)


def _by_name(param_groups: Sequence[Mapping[str, Any]], paths: Sequence[Any]) -> list[int]:
    names = [str(name) for group in param_groups for name in group["param_names"]]
    indices = [int(i) for group in param_groups for i in group["params"]]
    return _torch_names.match(names, indices, paths)


def _check_count(n_torch: int, n_leaves: int) -> None:
    if n_torch != n_leaves:
        raise ValueError(
            f"The torch optimizer has {n_torch} parameters but `params` has {n_leaves} "
            "leaves; pass the parameters whose `jax.tree.leaves` order is the torch order."
        )


def _chain_paths(stats: Any) -> list[str]:
    """The paths of the leaves a preset state holds (a partition masks out the others)."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(stats.nu)[0]]


def assign(
    param_groups: Sequence[Mapping[str, Any]],
    params: Any,
    stats_per_chain: Sequence[Any],
    match_by: MatchBy = "auto",
) -> list[Assignment]:
    """Pairs each preset state (given by its statistics) with torch parameters and a group.

    Raises:
      ValueError: on a different number of parameters or of groups, groups with different
        settings under one preset state, a leaf name torch does not have, or a preset state
        whose leaves are not exactly one torch group's parameters.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [path for path, _ in flat]
    n_torch = sum(len(group["params"]) for group in param_groups)
    _check_count(n_torch, len(flat))
    use_names = _use_names(param_groups, match_by)
    if len(stats_per_chain) == 1:
        _torch_state_dict.check_equal_settings(param_groups)
        indices = (
            _by_name(param_groups, paths)
            if use_names
            else [int(i) for group in param_groups for i in group["params"]]
        )
        return [Assignment(list(flat), indices, param_groups[0])]
    if len(stats_per_chain) != len(param_groups):
        raise ValueError(
            f"The optax state holds {len(stats_per_chain)} `torch_rmsprop` groups but the torch "
            f"optimizer has {len(param_groups)} param_groups; build it with "
            "`rmsprop_jax.compat.torch_rmsprop_groups` from the same groups."
        )
    leaf_at = {jax.tree_util.keystr(path): (path, leaf) for path, leaf in flat}
    owners: dict[str, int] = {}
    for k, stats in enumerate(stats_per_chain):
        for key in _chain_paths(stats):
            if key not in leaf_at:
                raise ValueError(
                    f"The optax state's group {k} has a leaf at {key}, which `params` lacks; "
                    "pass the parameters the state was initialized with."
                )
            owners[key] = k
    unowned = [key for key in leaf_at if key not in owners]
    if unowned:
        raise ValueError(
            f"The parameters at {unowned[:6]} belong to no `torch_rmsprop` group of the optax "
            "state, so they have no torch state to take."
        )
    if use_names:
        index_of = dict(zip(leaf_at, _by_name(param_groups, paths), strict=True))
        name_of = {
            int(i): str(name)
            for group in param_groups
            for i, name in zip(group["params"], group["param_names"], strict=True)
        }
    group_of = {int(i): g for g, group in enumerate(param_groups) for i in group["params"]}
    assignments = []
    for k, stats in enumerate(stats_per_chain):
        keys = _chain_paths(stats)
        if use_names:
            indices = [index_of[key] for key in keys]
            groups = sorted({group_of[i] for i in indices})
            members = sorted(int(i) for i in param_groups[groups[0]]["params"])
            if len(groups) != 1 or sorted(indices) != members:
                wanted = [name_of[i] for i in indices]
                raise ValueError(
                    f"The optax state's group {k} holds the parameters {wanted}, which are not "
                    f"exactly one torch group's (they are in torch param_groups {groups}); label "
                    "the leaves as torch groups them."
                )
            group = param_groups[groups[0]]
        else:
            group = param_groups[k]
            indices = [int(i) for i in group["params"]]
            if len(indices) != len(keys):
                raise ValueError(
                    f"Torch param_groups[{k}] has {len(indices)} parameters but the optax "
                    f"state's group {k} has {len(keys)} leaves ({keys[:6]}); without "
                    "param_names the groups are paired in order, so label the leaves as torch "
                    "groups them."
                )
        assignments.append(Assignment([leaf_at[key] for key in keys], indices, group))
    return assignments
