"""Decoupled weight decay: the decay applied to the parameter, outside the preconditioner."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _placement, _precision, _validation


class DecoupledWeightDecayState(NamedTuple):
    """Step count, for evaluating a learning-rate schedule.

    Examples:
      >>> rj.add_decoupled_weight_decay(learning_rate=0.1, weight_decay=0.5).init({})
      DecoupledWeightDecayState(count=Array(0, dtype=int32))
    """

    count: chex.Array  # shape=(), dtype=int32.


def add_decoupled_weight_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: chex.Numeric,
) -> optax.GradientTransformationExtraArgs:
    r"""Adds -η·λ·p to the update: weight decay applied to the parameter p.

    .. math::

        u_t = u_t - \eta_t \lambda p_{t-1}

    Unlike L2 regularization (:func:`optax.add_decayed_weights` before the preconditioner), the
    decay is neither divided by the RMS nor fed through a momentum buffer.

    Args:
      learning_rate: η ≥ 0, a number or an optax schedule of the step count.
      weight_decay: λ ≥ 0.

    Returns:
      An optax transformation; it needs `params` in `update`.

    Examples:
      >>> params = {"w": jnp.array([1.0, -2.0, 3.0])}
      >>> tx = rj.add_decoupled_weight_decay(learning_rate=0.1, weight_decay=0.5)
      >>> updates, _ = tx.update({"w": jnp.zeros(3)}, tx.init(params), params)
      >>> updates["w"]
      Array([-0.05,  0.1 , -0.15], dtype=float32)

    References:
      Loshchilov and Hutter, Decoupled Weight Decay Regularization, 2019.
      https://arxiv.org/abs/1711.05101
    """
    _validation.check_in_range("learning_rate", learning_rate, low=0.0, schedule=True)
    _validation.check_in_range("weight_decay", weight_decay, low=0.0)
    learning_rate, weight_decay = map(_precision.as_hyperparameter, (learning_rate, weight_decay))

    def init_fn(params):
        del params
        return DecoupledWeightDecayState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        _validation.check_update_count(state.count)
        rate = learning_rate(state.count) if callable(learning_rate) else learning_rate
        rate = _precision.as_hyperparameter(rate)
        updates = jax.tree.map(
            lambda u, p: None if u is None else u - rate * weight_decay * p,
            updates,
            params,
            is_leaf=lambda x: x is None,
        )
        return updates, DecoupledWeightDecayState(count=optax.safe_increment(state.count))

    return _validation.scalar_hyperparameters(
        _placement.placed(
            _precision.with_compute_dtype(optax.GradientTransformation(init_fn, update_fn))
        ),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
    )
