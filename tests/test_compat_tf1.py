"""`rj.compat.tf1_rmsprop` follows TF1's ApplyRMSProp / ApplyCenteredRMSProp kernels.

TensorFlow is not a dependency: the reference is the kernels' update equations written out
in float64 NumPy.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import conformance_problem, max_error_relative_to_leaf_scale, preset_trajectory

import rmsprop_jax as rj

STEPS = 100
SHAPES = [(), (5,), (3, 4), (2, 3, 4)]
TOLERANCE = 1e-5
LR = 0.01
DECAY_STEPS, DECAY_RATE = 10, 0.8


def make_problem(seed, shapes=SHAPES, dtype=np.float32):
    return conformance_problem(seed, shapes, STEPS, dtype)


def tf1_reference(params, grads, rate, decay=0.9, momentum=0.0, epsilon=1e-10, centered=False):
    """Float64 trajectory of TF1's kernels; `rate(t)` is the learning rate of update t.

    ApplyRMSProp:         ms += (g^2 - ms)(1 - rho); mom = mom*momentum + lr*g/sqrt(ms + eps)
    ApplyCenteredRMSProp: also mg += (g - mg)(1 - rho), denominator sqrt(ms - mg^2 + eps)
    then var -= mom. RMSPropOptimizer creates `ms` with ones, `mg` and `mom` with zeros.
    """
    trajectory = []
    for p, g in zip(params, grads, strict=True):
        var, g = p.astype(np.float64), g.astype(np.float64)
        ms, mg, mom = np.ones_like(var), np.zeros_like(var), np.zeros_like(var)
        history = []
        for t in range(len(g)):
            ms += (g[t] ** 2 - ms) * (1 - decay)
            if centered:
                mg += (g[t] - mg) * (1 - decay)
                denominator = ms - mg**2 + epsilon
            else:
                denominator = ms + epsilon
            mom = mom * momentum + g[t] * rate(t) / np.sqrt(denominator)
            var = var - mom
            history.append(var)
        trajectory.append(np.stack(history))
    return trajectory


def rates(scheduled):
    """`tf.compat.v1.train.exponential_decay` as a function of the step, and its optax twin."""
    if not scheduled:
        return (lambda t: LR), LR
    return (
        lambda t: LR * DECAY_RATE ** (t / DECAY_STEPS),
        optax.exponential_decay(LR, DECAY_STEPS, DECAY_RATE),
    )


CONFIGS = list(itertools.product([0.0, 0.9], [False, True], [False, True]))


@pytest.mark.parametrize(
    ("momentum", "centered", "scheduled"),
    CONFIGS,
    ids=[f"m{m}-c{int(c)}-sched{int(s)}" for m, c, s in CONFIGS],
)
def test_jitted_preset_matches_tf1_kernels_for_100_steps(momentum, centered, scheduled):
    params, grads = make_problem(seed=0)
    theirs, ours = rates(scheduled)
    reference = tf1_reference(params, grads, theirs, momentum=momentum, centered=centered)
    tx = rj.compat.tf1_rmsprop(ours, momentum=momentum, centered=centered)
    worst = max_error_relative_to_leaf_scale(preset_trajectory(tx, params, grads), reference)
    print(f"tf1_rmsprop vs TF1 kernel equations, worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE


def test_eager_preset_matches_tf1_kernels_with_every_option_on():
    params, grads = make_problem(seed=1)
    kwargs: dict[str, Any] = dict(decay=0.8, momentum=0.5, epsilon=1e-4, centered=True)
    theirs, ours = rates(scheduled=True)
    reference = tf1_reference(params, grads, theirs, **kwargs)
    tx = rj.compat.tf1_rmsprop(ours, **kwargs)
    worst = max_error_relative_to_leaf_scale(
        preset_trajectory(tx, params, grads, jit=False), reference
    )
    print(f"eager tf1_rmsprop vs TF1 kernel equations, worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE


def test_mean_square_starts_at_one_so_the_first_step_is_not_a_sign_step():
    g = np.array([0.01, 1.0, 100.0], np.float32)
    tx = rj.compat.tf1_rmsprop(1.0)
    updates, _ = tx.update(jnp.asarray(g), tx.init(jnp.zeros(3)), jnp.zeros(3))
    np.testing.assert_allclose(updates, -g / np.sqrt(0.9 + 0.1 * g**2), rtol=1e-6)


def test_learning_rate_enters_the_buffer_so_a_schedule_acts_on_new_increments_only():
    """With a rate that drops to 0, TF1 keeps coasting on the buffer (PyTorch would stop)."""
    schedule = optax.piecewise_constant_schedule(0.1, {1: 0.0})
    tx = rj.compat.tf1_rmsprop(schedule, momentum=0.9)
    p = jnp.zeros(1)
    state = tx.init(p)
    first, state = tx.update(jnp.ones(1), state, p)
    second, _ = tx.update(jnp.ones(1), state, p)
    np.testing.assert_allclose(second, 0.9 * first, rtol=1e-6)


def test_signature_matches_tf1_rmspropoptimizer():
    documented = [
        ("learning_rate", inspect.Parameter.empty),
        ("decay", 0.9),
        ("momentum", 0.0),
        ("epsilon", 1e-10),
        ("use_locking", False),
        ("centered", False),
        ("name", "RMSProp"),
    ]
    ours = inspect.signature(rj.compat.tf1_rmsprop).parameters
    assert [(n, p.default) for n, p in ours.items()] == documented


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("learning_rate", -0.1),
        ("decay", 1.5),
        ("momentum", 1.0),
        ("momentum", -0.5),
        ("epsilon", -1e-10),
    ],
)
def test_out_of_range_argument_raises_value_error_naming_it(name, value):
    kwargs = {"learning_rate": 0.01, name: value}
    with pytest.raises(ValueError, match=f"`{name}`"):
        rj.compat.tf1_rmsprop(**kwargs)


def test_complex_parameters_raise_type_error():
    with pytest.raises(TypeError, match="TF1 squares complex gradients"):
        rj.compat.tf1_rmsprop(0.01).init(jnp.zeros(2, jnp.complex64))
