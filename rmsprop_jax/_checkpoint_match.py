"""Comparing a checkpoint's stored tree with a restore target, leaf by leaf."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from rmsprop_jax import _validation, storage

_SHOWN_PER_KIND = 3
_CAUSES = {
    "params": "the model differs (other layers, layer sizes or names)",
    "opt_state": "the optimizer configuration differs (centered or not, with or without "
    "momentum, or another optimizer)",
}
_SECOND_MOMENTS = ("nu", "variance")
_MOMENTS = (*_SECOND_MOMENTS, "mu")
_LEAF_KINDS = {"opt_state": "optimizer state leaf", "params": "parameter"}


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the tree it is restored into (structure, shape or dtype).

    Raised by :func:`rmsprop_jax.checkpoint.restore` before anything is restored; a
    `ValueError`, and the message names the leaves that differ.

    Examples:
      >>> stored = {"params": {"w": jnp.ones(3)}}
      >>> try:
      ...     rj.checkpoint.check_matches(stored, {"params": {"w": jnp.ones(3), "b": jnp.ones(2)}})
      ... except rj.checkpoint.CheckpointMismatchError as error:
      ...     print(isinstance(error, ValueError), "'params.b'" in str(error))
      True True
    """


def _key_name(key: Any) -> str:
    for attribute in ("name", "key", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    """Leaves keyed by their path, with NamedTuple fields, dict keys and indices all as strings.

    Orbax's metadata stores a NamedTuple as a dict of its fields and a tuple as a list, so paths
    spelled this way are the same for a live state and for its stored metadata.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_key(path): leaf for path, leaf in leaves}


def _path_key(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(_key_name(key) for key in path)


def _dtype(leaf: Any) -> np.dtype:
    """A leaf's dtype; a Python number's is NumPy's for it (orbax stores it so)."""
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.result_type(leaf)


def _describe(path: tuple[str, ...]) -> str:
    kind = _LEAF_KINDS.get(path[0], "leaf") if path else "leaf"
    return f"{kind} '{'.'.join(path) or '<root>'}'"


def _params_first(path: tuple[str, ...]) -> tuple[bool, tuple[str, ...]]:
    return (path[:1] != ("params",), path)


def _listed(paths: list[tuple[str, ...]]) -> str:
    return _validation.listed([f"'{'.'.join(path)}'" for path in paths], _SHOWN_PER_KIND)


def _codes_of_mu(paths: list[tuple[str, ...]]) -> bool:
    """Whether `paths` include the 8-bit codes of a centered state's `mu`."""
    return any(path[i : i + 2] == ("mu", "codes") for path in paths for i in range(len(path)))


def _mu_layout_hint(only_stored: list[tuple[str, ...]], only_target: list[tuple[str, ...]]) -> str:
    """What to pass where the stored and the target `mu` differ only in being 8-bit codes."""
    if _codes_of_mu(only_stored) and not _codes_of_mu(only_target):
        return (
            " The checkpoint keeps the centered mean gradient `mu` as 8-bit codes (what "
            "moment_storage='int8' did in release 0.1.0): build the target's optimizer with "
            "first_moment_storage='int8'."
        )
    if _codes_of_mu(only_target) and not _codes_of_mu(only_stored):
        return (
            " The target keeps the centered mean gradient `mu` as 8-bit codes "
            "(first_moment_storage='int8') and the checkpoint does not: build the target's "
            "optimizer with the checkpoint's first_moment_storage (None by default)."
        )
    return ""


def _moment_field(path: tuple[str, ...]) -> int | None:
    """Where in `path` an optimizer state's moment field (`nu`, `variance`, `mu`) is: after the
    root key and the indices of chained states only (a momentum `trace` or a model's layer
    may be called "mu" or "nu")."""
    if path[:1] == ("params",):
        return None
    for i, name in enumerate(path[:-1]):
        if name in _MOMENTS:
            return i
        if i > 0 and not name.isdigit():
            return None
    return None


def _moment_storage(
    leaves: dict[tuple[str, ...], Any], fields: tuple[str, ...] = _SECOND_MOMENTS
) -> str | None:
    """The storage format that the moment among `leaves` shows, if one.

    The squared-gradient average is an `nu` (or, centered and compressed, a `variance`) field,
    the mean gradient a `mu` field; a format shows in its parts (int8 codes and scales,
    factored rows and columns) or else in the moment's dtype.
    """
    parts, dtypes = set(), set()
    for path, leaf in leaves.items():
        at = _moment_field(path)
        if at is not None and path[at] in fields:
            parts.add(path[at + 1])
            dtypes.add(str(_dtype(leaf)))
    if {"codes", "scales"} <= parts:
        return "int8"
    if {"row", "col"} <= parts:
        return "factored"
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= {"float32", "bfloat16"} else None


def _centered(leaves: dict[tuple[str, ...], Any]) -> bool:
    """Whether `leaves` hold a centered state's mean gradient `mu`."""
    return any(path[at] == "mu" for path in leaves if (at := _moment_field(path)) is not None)


def _storage_hint(stored: dict, target: dict, differing: list[tuple[str, ...]]) -> str:
    """What to pass where the checkpoint's squared-gradient average is stored in another format
    and the `differing` paths of the optimizer state are all the moments'."""
    if not all(_moment_field(path) is not None for path in differing if path[:1] != ("params",)):
        return ""  # Another optimizer, or another variant beside the storage.
    written, expected = _moment_storage(stored), _moment_storage(target)
    if written is None or expected is None or written == expected:
        return ""
    return (
        f" The checkpoint keeps the squared-gradient average as moment_storage='{written}', "
        f"the target as '{expected}': build the target's optimizer with "
        f"moment_storage='{written}'."
    )


def _first_moment_hint(stored: dict, target: dict) -> str:
    """What to pass where the centered mean gradient `mu` is stored in another float dtype (the
    8-bit codes of `mu` have :func:`_mu_layout_hint`)."""
    variance = _moment_storage(stored)
    if variance is None or variance != _moment_storage(target):
        return ""
    written, expected = _moment_storage(stored, ("mu",)), _moment_storage(target, ("mu",))
    if {written, expected} != {"float32", "bfloat16"}:
        return ""
    default = storage.first_moment_format(storage.get(variance)).name
    option = "None" if written == default else f"'{written}'"
    return (
        f" The checkpoint keeps the centered mean gradient `mu` in {written}, the target in "
        f"{expected}: build the target's optimizer with first_moment_storage={option}."
    )


def check_matches(stored: Any, target: Any, *, where: str = "checkpoint") -> None:
    """Raises unless `stored` has exactly the leaves of `target`, with equal shapes and dtypes.

    Args:
      stored: the checkpoint's tree metadata (`manager.item_metadata(step)`, or its `.tree`), or
        any tree whose leaves have `.shape` and `.dtype`.
      target: the tree to restore into: arrays, `jax.ShapeDtypeStruct` leaves or numbers.
      where: how the messages name the checkpoint, e.g. "checkpoint at step 100".

    Raises:
      CheckpointMismatchError: (a `ValueError`) naming every leaf that is missing on either side
        or differs in shape or dtype (the first few of each kind).

    Examples:
      >>> rj.checkpoint.check_matches({"w": jnp.ones((2, 3))}, {"w": jnp.zeros((2, 3))})
      >>> rj.checkpoint.check_matches({"w": jnp.ones((2, 3))}, {"w": jnp.ones((3, 2))})
      Traceback (most recent call last):
      ...
      rmsprop_jax._checkpoint_match.CheckpointMismatchError: checkpoint does not match the
      restore target: it has leaf 'w' with shape (2, 3), the target expects (3, 2). ...
    """
    stored_leaves = _flat(getattr(stored, "tree", stored))
    target_leaves = _flat(target)
    problems = []
    only_stored = sorted(set(stored_leaves) - set(target_leaves), key=_params_first)
    only_target = sorted(set(target_leaves) - set(stored_leaves), key=_params_first)
    if only_stored:
        problems.append(f"it has leaves the target lacks: {_listed(only_stored)}")
    if only_target:
        problems.append(f"it lacks leaves the target has: {_listed(only_target)}")
    differing: list[tuple[tuple[str, ...], str, Any, Any]] = []
    for path in sorted(set(stored_leaves) & set(target_leaves), key=_params_first):
        saved, expected = stored_leaves[path], target_leaves[path]
        saved_shape, expected_shape = tuple(np.shape(saved)), tuple(np.shape(expected))
        if saved_shape != expected_shape:
            differing.append((path, "shape", saved_shape, expected_shape))
        elif _dtype(saved) != _dtype(expected):
            differing.append((path, "dtype", _dtype(saved), _dtype(expected)))
    problems += [
        f"it has {_describe(path)} with {what} {saved}, the target expects {expected}"
        for path, what, saved, expected in differing[:_SHOWN_PER_KIND]
    ]
    if len(differing) > _SHOWN_PER_KIND:
        problems.append(f"and {len(differing) - _SHOWN_PER_KIND} more leaves differ")
    if not problems:
        return
    # A parameter of another shape also changes the optimizer state's shapes: blame the model.
    roots = {path[0] for path in only_stored + only_target if path}
    roots |= {path[0] for path, *_ in differing if path and path[0] == "params"}
    storage_hint = _storage_hint(
        stored_leaves, target_leaves, only_stored + only_target + [p for p, *_ in differing]
    )
    if storage_hint and _centered(stored_leaves) == _centered(target_leaves):
        roots.discard("opt_state")  # The storage sentence names what differs.
    hints = [_CAUSES[root] for root in sorted(roots, reverse=True) if root in _CAUSES]
    cause = f" Probably {' and '.join(hints)}." if hints else ""
    cause += storage_hint + _mu_layout_hint(only_stored, only_target)
    cause += _first_moment_hint(stored_leaves, target_leaves)
    raise CheckpointMismatchError(
        f"{where} does not match the restore target: {'; '.join(problems)}.{cause} Restore "
        "with the configuration that wrote the checkpoint, or use a new checkpoint directory."
    )
