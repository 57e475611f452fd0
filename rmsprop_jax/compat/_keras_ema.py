r"""Keras's `use_ema`: a moving average of the weights kept in the optimizer state.

After each `apply` (the k-th, counted from 0; with gradient accumulation k is the number
of updates, `optimizer.iterations`), Keras 3 sets

.. math::

    a_k = m_k a_{k-1} + (1 - m_k) p_k

where pₖ are the weights after the update and mₖ is `ema_momentum`, except m₀ = 0 (so
a₀ = p₀); when `ema_overwrite_frequency` f is set it replaces the weights by the average
whenever (k + 1) mod f = 0. At the end of `fit` it swaps the average into the model
(`finalize_variable_values`); :func:`keras_ema_weights` gives that average here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _validation


class KerasEmaState(NamedTuple):
    """The number of `apply` calls, the weights' moving average, and the wrapped state.

    Examples:
      >>> state = rj.compat.keras_rmsprop(use_ema=True).init({"w": jnp.ones(3)})
      >>> state.count, state.average["w"], type(state).__name__
      (Array(0, dtype=int32), Array([0., 0., 0.], dtype=float32), 'KerasEmaState')
    """

    count: chex.Array
    average: optax.Params
    inner_state: optax.OptState


def with_keras_ema(
    inner: optax.GradientTransformation,
    ema_momentum: float,
    ema_overwrite_frequency: int | None,
    gradient_accumulation_steps: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Adds Keras's weight average to `inner`; `update` then needs `params`.

    On an overwrite step the update is `average - params`, so `optax.apply_updates` gives the
    average up to one rounding of `params + (average - params)`.
    """
    if isinstance(ema_momentum, bool) or not isinstance(ema_momentum, (int, float)):
        raise ValueError(f"`ema_momentum` must be a number in [0, 1], got {ema_momentum!r}.")
    if not 0 <= ema_momentum <= 1:
        raise ValueError(f"`ema_momentum` must be a number in [0, 1], got {ema_momentum!r}.")
    frequency = ema_overwrite_frequency
    if frequency is not None:
        frequency = _validation.check_count(
            "ema_overwrite_frequency", frequency, low=1, or_none=True
        )
    per_update = gradient_accumulation_steps or 1
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return KerasEmaState(
            count=jnp.zeros([], jnp.int32),
            average=jax.tree.map(jnp.zeros_like, params),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("`use_ema=True` needs `params` in `update`: it averages the weights.")
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        new_params = optax.apply_updates(params, inner_updates)
        iterations = state.count // per_update
        momentum = jnp.where(iterations == 0, 0.0, ema_momentum)

        def average(a, p):
            m = momentum.astype(p.dtype)
            return (m * a + (1 - m) * p).astype(a.dtype)

        new_average = jax.tree.map(average, state.average, new_params)
        if frequency is not None:
            overwrite = (iterations + 1) % frequency == 0
            inner_updates = jax.tree.map(
                lambda u, a, p: jnp.where(overwrite, (a - p).astype(u.dtype), u),
                inner_updates,
                new_average,
                params,
            )
        return inner_updates, KerasEmaState(state.count + 1, new_average, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def keras_ema_weights(opt_state: optax.OptState) -> optax.Params:
    """The moving average of the weights in a `keras_rmsprop(use_ema=True)` state.

    This is what Keras swaps into the model at the end of `fit`; evaluate with it, or use it
    as the final parameters.

    Raises:
      ValueError: when `opt_state` holds no Keras EMA state (or more than one).

    Examples:
      >>> tx = rj.compat.keras_rmsprop(0.1, use_ema=True, ema_momentum=0.5)
      >>> params = jnp.array([1.0, -2.0]); state = tx.init(params)
      >>> for _ in range(2):
      ...     updates, state = tx.update(jnp.array([0.5, -0.5]), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params, rj.compat.keras_ema_weights(state)
      (Array([ 0.45435733, -1.4543573 ], dtype=float32),
       Array([ 0.5690651, -1.5690651], dtype=float32))
    """
    found = find_ema(opt_state)
    if len(found) != 1:
        raise ValueError(
            f"`opt_state` holds {len(found)} Keras EMA states; pass the state of one "
            "`rmsprop_jax.compat.keras_rmsprop(..., use_ema=True)`."
        )
    return found[0].average


def find_ema(opt_state: Any) -> list[KerasEmaState]:
    """The Keras EMA states inside `opt_state`, in tree order."""
    return [
        node
        for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, KerasEmaState))
        if isinstance(node, KerasEmaState)
    ]
