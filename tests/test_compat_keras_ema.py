"""`keras_rmsprop(use_ema=True)` against Keras 3's `use_ema`: weights and their average."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import import_reference_framework
from helpers import conformance_problem, max_error_relative_to_leaf_scale

import rmsprop_jax as rj

STEPS = 60
SHAPES = [(3, 4), (5,), ()]
TOLERANCE = 1e-5
LR = 0.01


@pytest.fixture(scope="module")
def keras():
    return import_reference_framework("keras")


def keras_run(keras, params, grads, **kwargs):
    """Weights and EMA averages after each jitted `stateless_apply` of a Keras RMSprop."""
    optimizer = keras.optimizers.RMSprop(**kwargs)
    optimizer.build([keras.Variable(p) for p in params])
    averages = [i for i, v in enumerate(optimizer.variables) if v.path.endswith("_average")]
    apply = jax.jit(optimizer.stateless_apply)
    values, state = [jnp.asarray(p) for p in params], [v.value for v in optimizer.variables]
    weights, means = [], []
    for t in range(len(grads[0])):
        values, state = apply(state, [jnp.asarray(g[t]) for g in grads], values)
        weights.append([np.asarray(v) for v in values])
        means.append([np.asarray(state[i]) for i in averages])
    stack = lambda h: [np.stack([x[i] for x in h]) for i in range(len(params))]  # noqa: E731
    return stack(weights), stack(means)


def our_run(tx, params, grads):
    def step(carry, g):
        p, state = carry
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        return (p, state), (p, rj.compat.keras_ema_weights(state))

    params = [jnp.asarray(p) for p in params]
    run = jax.jit(lambda p, gs: jax.lax.scan(step, (p, tx.init(p)), gs))
    _, (weights, means) = run(params, [jnp.asarray(g) for g in grads])
    return [np.asarray(w) for w in weights], [np.asarray(m) for m in means]


CONFIGS = [
    dict(ema_momentum=0.9),
    dict(momentum=0.9, ema_momentum=0.8, ema_overwrite_frequency=7),
    dict(centered=True, weight_decay=0.01, ema_overwrite_frequency=1),
    dict(momentum=0.5, gradient_accumulation_steps=3, ema_overwrite_frequency=4),
]


@pytest.mark.conformance
@pytest.mark.parametrize("kwargs", CONFIGS, ids=["ema", "overwrite7", "overwrite1", "accum3"])
def test_weights_and_their_average_equal_keras_use_ema(keras, kwargs):
    params, grads = conformance_problem(7, SHAPES, STEPS)
    theirs, their_means = keras_run(keras, params, grads, learning_rate=LR, use_ema=True, **kwargs)
    tx = rj.compat.keras_rmsprop(LR, use_ema=True, **kwargs)
    ours, our_means = our_run(tx, params, grads)
    worst = max(
        max_error_relative_to_leaf_scale(ours, theirs),
        max_error_relative_to_leaf_scale(our_means, their_means),
    )
    print(f"keras_rmsprop use_ema {kwargs}: worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE
    # The average is not the weights (except when they are overwritten every step).
    if kwargs.get("ema_overwrite_frequency") != 1:
        assert not np.allclose(our_means[0], ours[0])


def test_ema_weights_need_an_ema_state_and_params():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="holds 0 Keras EMA states"):
        rj.compat.keras_ema_weights(rj.compat.keras_rmsprop().init(params))
    tx = rj.compat.keras_rmsprop(use_ema=True)
    with pytest.raises(ValueError, match="needs `params`"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="`ema_overwrite_frequency` must be a positive integer"):
        rj.compat.keras_rmsprop(use_ema=True, ema_overwrite_frequency=0)
    with pytest.raises(ValueError, match=r"`ema_momentum` must be a number in \[0, 1\]"):
        rj.compat.keras_rmsprop(use_ema=True, ema_momentum=1.5)
    # Without use_ema Keras ignores the EMA arguments, and so does the preset.
    rj.compat.keras_rmsprop(ema_momentum=1.5, ema_overwrite_frequency=0)
