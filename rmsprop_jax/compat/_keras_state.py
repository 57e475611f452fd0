"""Optimizer-state conversion between Keras 3's `keras.optimizers.RMSprop` and `keras_rmsprop`.

Keras names the variables of an RMSprop `{optimizer}/{ref}_{slot}`, where `{ref}` is the
model variable's path with `/` replaced by `_` (`dense/kernel` gives `dense_kernel`) and the
slot is `velocity` (mean square, `nu` here), `momentum` (the buffer; optax's `trace` holds
its negative), `average_gradient` (centered mean gradient, `mu`) or `average` (the `use_ema`
weights); plus `iteration`, the number of `apply` calls, which is every step count of the
optax state.

A leaf of `params` is named like a Keras path: its keys (dict keys, attribute names, indices)
joined by `_`, after replacing any `/` in a key by `_` (`{"dense": {"kernel": w}}` and
`{"dense/kernel": w}` are both `dense_kernel`). Leaves are paired with Keras variables by that
name when every leaf has a match, by position (Keras's variable order is the model's
`trainable_variables` order) when none has, and refused otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax.compat._keras_ema import KerasEmaState
from rmsprop_jax.compat._torch_names import key_parts
from rmsprop_jax.transform import ScaleByCenteredRmsState, ScaleByRmsState

_STATS = (ScaleByRmsState, ScaleByCenteredRmsState)
_SLOTS = ("velocity", "momentum", "average_gradient", "average")
MatchBy = Literal["auto", "names", "order"]
# Keras subtracts its `momentum` slot from the weights; the optax buffer follows the rate,
# which optax applies as a factor of -lr, so it holds the update that is added: its negative.
_SIGN = {"velocity": 1.0, "momentum": -1.0, "average_gradient": 1.0, "average": 1.0}


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


def _variables(keras_state: Any) -> dict[str, np.ndarray]:
    """`{name without the optimizer's scope: value}` from an optimizer, variables or a dict."""
    keras_state = _optimizer_variables(keras_state)
    if isinstance(keras_state, Mapping):
        items = list(keras_state.items())
    else:
        items = [(getattr(v, "path", None) or getattr(v, "name", None), v) for v in keras_state]
    out = {}
    for key, value in items:
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


def _find(state: Any, kinds: tuple[type, ...]) -> list[Any]:
    return [
        node
        for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds))
        if isinstance(node, kinds)
    ]


def _parts(opt_state: Any, what: str) -> tuple[Any, Any | None, Any | None]:
    stats = _find(opt_state, _STATS)
    traces = _find(opt_state, (optax.TraceState,))
    emas = _find(opt_state, (KerasEmaState,))
    if len(stats) != 1 or len(traces) > 1 or len(emas) > 1:
        raise ValueError(
            f"{what} holds {len(stats)} RMS statistics, {len(traces)} momentum buffers and "
            f"{len(emas)} EMA states; pass the state of one "
            "`rmsprop_jax.compat.keras_rmsprop`."
        )
    if _find(opt_state, (optax.MultiStepsState,)):
        raise ValueError(
            f"{what} accumulates gradients (gradient_accumulation_steps); converting it is not "
            "supported."
        )
    return stats[0], (traces[0] if traces else None), (emas[0] if emas else None)


def _check_flags(slots: dict[str, list[str]], stats: Any, trace: Any, ema: Any) -> None:
    for slot, ours, what in (
        ("average_gradient", isinstance(stats, ScaleByCenteredRmsState), "centered"),
        ("momentum", trace is not None, "a momentum buffer (momentum > 0)"),
        ("average", ema is not None, "use_ema"),
    ):
        theirs = bool(slots[slot])
        if theirs != ours:
            raise ValueError(
                f"The Keras optimizer {'has' if theirs else 'has no'} {what} but the optax "
                f"state {'has' if ours else 'has not'}; build `keras_rmsprop` with the same "
                "centered, momentum (zero or not) and use_ema."
            )


def _with_counts(state: Any, count: jax.Array) -> Any:
    """Every step count in `state` (statistics, schedules, weight decay, EMA) set to `count`."""

    def is_counted(node):
        return isinstance(node, tuple) and hasattr(node, "_fields") and "count" in node._fields

    def replace(node):
        if not is_counted(node):
            return node
        # A counted node may wrap others (the EMA state wraps the whole preset's state).
        inner = {
            field: _with_counts(getattr(node, field), count)
            for field in node._fields
            if field != "count"
        }
        return node._replace(count=jnp.asarray(count, node.count.dtype), **inner)

    return jax.tree.map(replace, state, is_leaf=is_counted)


def state_from_keras(
    keras_state: Any,
    params: Any,
    optimizer: optax.GradientTransformation,
    *,
    match_by: MatchBy = "auto",
) -> optax.OptState:
    """The state of `optimizer` (a `keras_rmsprop`) equal to a Keras 3 RMSprop's variables.

    Args:
      keras_state: a built `keras.optimizers.RMSprop`, its `variables`, or a dict from
        variable path (or name) to value. Pass the optimizer where possible: from variable
        names alone, Adam's state (`momentum`, `velocity`) looks like an RMSprop's with
        momentum.
      params: the parameters, paired with Keras's variables by name or order (see the
        module docstring).
      optimizer: a :func:`rmsprop_jax.compat.keras_rmsprop` with the same `centered`,
        momentum (zero or not) and `use_ema` as the Keras optimizer.
      match_by: "auto", "names" (refuse unless every leaf has a Keras name) or "order".

    Returns:
      `optimizer.init(params)` with the mean squares, momentum buffers, mean gradients, EMA
      weights and every step count (the Keras `iteration`) taken from Keras.

    Raises:
      ValueError: on a state that is not a Keras RMSprop's (naming what is missing), a
        different number of variables, unmatched names, a shape mismatch, differing
        `centered`/momentum/`use_ema`, or gradient accumulation.

    Examples:
      >>> import keras
      >>> v = keras.Variable(np.array([1.0, -2.0], np.float32))
      >>> keras_optimizer = keras.optimizers.RMSprop(learning_rate=0.01)
      >>> keras_optimizer.apply([np.array([0.5, -0.5], np.float32)], [v])
      >>> tx = rj.compat.keras_rmsprop(learning_rate=0.01)
      >>> state = rj.compat.state_from_keras(keras_optimizer, jnp.asarray(v.value), tx)
      >>> state[1][2].count, state[1][2].nu
      (Array(1, dtype=int32), Array([0.025, 0.025], dtype=float32))
    """
    values = _variables(keras_state)
    refs, slots = _keras_names(values)
    pairing = _pairing(refs, params, match_by)
    opt_state = optimizer.init(params)
    stats, trace, ema = _parts(opt_state, "The state of `optimizer`")
    _check_flags(slots, stats, trace, ema)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]

    def convert(slot: str, like: Any) -> Any:
        out = []
        for (path, param), ref, reference in zip(
            leaves, pairing, jax.tree.leaves(like), strict=True
        ):
            value = values[f"{ref}_{slot}"]
            if value.shape != jnp.shape(param):
                raise ValueError(
                    f"Keras variable {ref}_{slot} has shape {value.shape}, but the parameter at "
                    f"{jax.tree_util.keystr(path)} has shape {jnp.shape(param)}."
                )
            out.append(jnp.asarray(_SIGN[slot] * value, reference.dtype))
        return jax.tree.unflatten(jax.tree.structure(like), out)

    def fill(node: Any) -> Any:
        if node is stats:
            fields = {"nu": convert("velocity", node.nu)}
            if isinstance(node, ScaleByCenteredRmsState):
                fields["mu"] = convert("average_gradient", node.mu)
            return node._replace(**fields)
        if node is trace:
            return node._replace(trace=convert("momentum", node.trace))
        return node

    kinds = (*_STATS, optax.TraceState)
    opt_state = jax.tree.map(fill, opt_state, is_leaf=lambda x: isinstance(x, kinds))
    if ema is not None:
        average = convert("average", ema.average)
        opt_state = jax.tree.map(
            lambda n: n._replace(average=average) if isinstance(n, KerasEmaState) else n,
            opt_state,
            is_leaf=lambda x: isinstance(x, KerasEmaState),
        )
    return _with_counts(opt_state, int(values["iteration"]))


def state_to_keras(
    opt_state: optax.OptState,
    params: Any,
    keras_state: Any,
    *,
    match_by: MatchBy = "auto",
) -> dict[str, np.ndarray]:
    """The values of a Keras 3 RMSprop's variables equal to a `keras_rmsprop` state.

    Args:
      opt_state: the state of a :func:`rmsprop_jax.compat.keras_rmsprop`.
      params: the parameters, paired with Keras's variables as in :func:`state_from_keras`.
      keras_state: the built `keras.optimizers.RMSprop` that will take the state (or its
        variables, or a dict of them), for its variable names and flags.
      match_by: "auto", "names" or "order".

    Returns:
      `{variable path: value}` for `iteration` and every slot variable, with the paths of
      `keras_state`; load it with `for v in optimizer.variables: v.assign(values.get(v.path,
      v))`. The learning rate is left as Keras has it.

    Raises:
      ValueError: as :func:`state_from_keras`.

    Examples:
      >>> import keras
      >>> v = keras.Variable(np.array([1.0, -2.0], np.float32))
      >>> keras_optimizer = keras.optimizers.RMSprop(learning_rate=0.01)
      >>> keras_optimizer.build([v])
      >>> tx = rj.compat.keras_rmsprop(learning_rate=0.01)
      >>> _, state = tx.update(jnp.array([0.5, -0.5]), tx.init(jnp.asarray(v.value)))
      >>> values = rj.compat.state_to_keras(state, jnp.asarray(v.value), keras_optimizer)
      >>> for variable in keras_optimizer.variables:
      ...     _ = variable.assign(values.get(variable.path, variable))
      >>> int(keras_optimizer.iterations), keras_optimizer.variables[-1].numpy()
      (1, array([0.025, 0.025], dtype=float32))
    """
    keras_state = _optimizer_variables(keras_state)
    full_names = (
        list(keras_state)
        if isinstance(keras_state, Mapping)
        else [getattr(v, "path", None) or v.name for v in keras_state]
    )
    path_of = {name.rsplit("/", 1)[-1]: name for name in full_names}
    refs, slots = _keras_names(_variables(keras_state))
    pairing = _pairing(refs, params, match_by)
    stats, trace, ema = _parts(opt_state, "`opt_state`")
    _check_flags(slots, stats, trace, ema)
    trees = {"velocity": stats.nu}
    if trace is not None:
        trees["momentum"] = trace.trace
    if isinstance(stats, ScaleByCenteredRmsState):
        trees["average_gradient"] = stats.mu
    if ema is not None:
        trees["average"] = ema.average
    out = {path_of["iteration"]: np.asarray(int(stats.count))}
    for slot, tree in trees.items():
        for ref, param, value in zip(
            pairing, jax.tree.leaves(params), jax.tree.leaves(tree), strict=True
        ):
            if jnp.shape(value) != jnp.shape(param):
                raise ValueError(
                    f"The optax state has a leaf of shape {jnp.shape(value)} for Keras variable "
                    f"{ref}_{slot} of shape {jnp.shape(param)}."
                )
            out[path_of[f"{ref}_{slot}"]] = np.asarray(_SIGN[slot] * np.asarray(value))
    return out
