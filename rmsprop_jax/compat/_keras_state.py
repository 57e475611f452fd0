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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _validation
from rmsprop_jax.compat._common import check_imported_statistic, imported_step_count
from rmsprop_jax.compat._keras_ema import KerasEmaState
from rmsprop_jax.compat._keras_names import (
    MatchBy,
    _keras_names,
    _optimizer_variables,
    _pairing,
    _variables,
)
from rmsprop_jax.transform import ScaleByCenteredRmsState, ScaleByRmsState

_STATS = (ScaleByRmsState, ScaleByCenteredRmsState)
_SLOTS = ("velocity", "momentum", "average_gradient", "average")
# Keras subtracts its `momentum` slot from the weights; the optax buffer follows the rate,
# which optax applies as a factor of -lr, so it holds the update that is added: its negative.
_SIGN = {"velocity": 1.0, "momentum": -1.0, "average_gradient": 1.0, "average": 1.0}


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
        `centered`/momentum/`use_ema`, gradient accumulation, an `iteration` that is not a
        whole number from 0 to 2**31 - 1, or statistics that hold a NaN or a negative
        `velocity` (an infinite `velocity` is kept, as Keras keeps it).
      TypeError: on an `optimizer` that is not a built transformation, or a `keras_state`
        that is none of the three things above (a string, a number, a list of arrays).

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
    _validation.check_transformation("optimizer", optimizer, "rj.compat.keras_rmsprop(0.001)")
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
            if slot != "average":  # the `use_ema` weights are weights, not statistics
                check_imported_statistic(
                    value, f"Keras variable {ref}_{slot}", mean_square=slot == "velocity"
                )
            out.append(jnp.asarray(_SIGN[slot] * value, reference.dtype))
        return jax.tree.unflatten(jax.tree.structure(like), out)

    def fill(node: Any) -> Any:
        if node is stats:
            fields = {"nu": convert("velocity", node.nu)}
            if isinstance(node, ScaleByCenteredRmsState):
                fields["mu"] = convert("average_gradient", node.mu)
            return node._replace(**fields)
        if trace is not None and node is trace:
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
    return _with_counts(
        opt_state, imported_step_count(values["iteration"], "The Keras `iteration`")
    )


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
      ValueError, TypeError: as :func:`state_from_keras`.

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
      >>> int(keras_optimizer.iterations), np.asarray(keras_optimizer.variables[-1].value)
      (1, array([0.025, 0.025], dtype=float32))
    """
    keras_state = _optimizer_variables(keras_state)
    refs, slots = _keras_names(_variables(keras_state))  # checks what `keras_state` holds
    full_names = (
        list(keras_state)
        if isinstance(keras_state, Mapping)
        else [getattr(v, "path", None) or v.name for v in keras_state]
    )
    path_of = {name.rsplit("/", 1)[-1]: name for name in full_names}
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
