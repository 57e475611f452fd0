"""Matching PyTorch parameter names (`model.named_parameters()`) to pytree paths.

PyTorch names a parameter by its module path joined with dots (`"encoder.0.weight"`). A leaf
of a pytree is named the same way from its key path: each key as a string (a dict key, an
attribute name, or a sequence index) and the keys joined with dots. So
`{"encoder": [{"weight": w}]}`, `{"encoder": {"0": {"weight": w}}}` and the flat
`{"encoder.0.weight": w}` all name `w` `"encoder.0.weight"`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax

_SHOWN = 6


def torch_name(path: Sequence[Any]) -> str:
    """The PyTorch-style name of a pytree key path: its keys as strings, joined by dots."""
    return ".".join(key_parts(path))


def key_parts(path: Sequence[Any]) -> list[str]:
    """Each key of a pytree key path as a string: dict key, attribute name or index."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return parts


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def match(names: Sequence[str], indices: Sequence[int], paths: Sequence[Any]) -> list[int]:
    """The torch index of each path, found by name; `ValueError` unless it is a bijection.

    Args:
      names: the torch parameter names, one per entry of `indices`.
      indices: the torch parameter indices.
      paths: the key paths of the pytree leaves, as many as `names`.

    Returns:
      For each path, the index of the torch parameter with the same name.

    Raises:
      ValueError: when two torch parameters or two leaves share a name, or a leaf's name is
        not a torch parameter's (the message names the leaf and the torch names).
    """
    for what, counted in (
        ("torch parameters", Counter(names)),
        ("leaves of `params`", Counter(torch_name(p) for p in paths)),
    ):
        repeated = sorted(name for name, n in counted.items() if n > 1)
        if repeated:
            raise ValueError(
                f"Several {what} are named {_listing(repeated)}, so matching by name is "
                "ambiguous; give them distinct names or pass match_by='order'."
            )
    by_name = dict(zip(names, indices, strict=True))
    leaf_names = [torch_name(p) for p in paths]
    unknown = [
        (name, path) for name, path in zip(leaf_names, paths, strict=True) if name not in by_name
    ]
    if unknown:
        name, path = unknown[0]
        unmatched = [n for n in names if n not in set(leaf_names)]
        raise ValueError(
            f"The leaf at {jax.tree_util.keystr(path) or '<root>'} of `params` is named "
            f"{name!r} (its keys joined by dots), but torch has no parameter of that name; "
            f"torch's unmatched names are {_listing(unmatched)}. Give the leaves torch's names "
            "(`{'layer': {'weight': w}}` or `{'layer.weight': w}` is 'layer.weight'), or pass "
            "match_by='order' to pair leaves and torch parameters by position."
        )
    return [by_name[name] for name in leaf_names]
