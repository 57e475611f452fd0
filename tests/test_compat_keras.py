"""`rj.compat.keras_rmsprop` follows the trajectory of Keras 3's `keras.optimizers.RMSprop`."""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import import_reference_framework
from helpers import conformance_problem, max_error_relative_to_leaf_scale, preset_trajectory

import rmsprop_jax as rj

STEPS = 100
SHAPES = [(), (5,), (3, 4), (2, 3, 4)]
TOLERANCE = 1e-5
LR = 0.01
DECAY_STEPS, DECAY_RATE = 10, 0.8


@pytest.fixture(scope="module")
def keras():
    return import_reference_framework("keras")


def make_problem(seed, shapes=SHAPES, dtype=np.float32):
    return conformance_problem(seed, shapes, STEPS, dtype)


def keras_trajectory(keras, params, grads, **kwargs):
    """Parameters after each `optimizer.apply` of `keras.optimizers.RMSprop(**kwargs)`."""
    variables = [keras.Variable(p) for p in params]
    optimizer = keras.optimizers.RMSprop(**kwargs)
    history: list[list[np.ndarray]] = [[] for _ in variables]
    for t in range(len(grads[0])):
        optimizer.apply([g[t] for g in grads], variables)
        for h, variable in zip(history, variables, strict=True):
            h.append(np.asarray(variable.value))
    return [np.stack(h) for h in history]


def keras_jitted_trajectory(keras, params, grads, **kwargs):
    """As `keras_trajectory`, through `stateless_apply` under `jax.jit` (Keras's JAX trainer).

    Eager `apply` with gradient accumulation re-traces Keras's `lax.cond` branches on every
    call (about half a second each); the jitted path runs the same Keras code once.
    """
    optimizer = keras.optimizers.RMSprop(**kwargs)
    optimizer.build([keras.Variable(p) for p in params])
    apply = jax.jit(optimizer.stateless_apply)
    values, state, history = [jnp.asarray(p) for p in params], optimizer.variables, []
    state = [v.value for v in state]
    for t in range(len(grads[0])):
        values, state = apply(state, [jnp.asarray(g[t]) for g in grads], values)
        history.append([np.asarray(v) for v in values])
    return [np.stack([h[i] for h in history]) for i in range(len(params))]


def rates(keras, scheduled):
    """Keras's ExponentialDecay and the optax schedule with the matching arguments."""
    if not scheduled:
        return LR, LR
    theirs = keras.optimizers.schedules.ExponentialDecay(LR, DECAY_STEPS, DECAY_RATE)
    return theirs, optax.exponential_decay(LR, DECAY_STEPS, DECAY_RATE)


CONFIGS = list(itertools.product([0.0, 0.9], [False, True], [None, 0.01], [False, True]))


@pytest.mark.conformance
@pytest.mark.parametrize(
    ("momentum", "centered", "weight_decay", "scheduled"),
    CONFIGS,
    ids=[f"m{m}-c{int(c)}-wd{w}-sched{int(s)}" for m, c, w, s in CONFIGS],
)
def test_jitted_preset_matches_keras_for_100_steps(
    keras, momentum, centered, weight_decay, scheduled
):
    params, grads = make_problem(seed=0)
    kwargs = dict(momentum=momentum, centered=centered, weight_decay=weight_decay)
    theirs, ours = rates(keras, scheduled)
    reference = keras_trajectory(keras, params, grads, learning_rate=theirs, **kwargs)
    tx = rj.compat.keras_rmsprop(ours, **kwargs)
    worst = max_error_relative_to_leaf_scale(preset_trajectory(tx, params, grads), reference)
    print(f"keras_rmsprop vs keras.optimizers.RMSprop, worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE


@pytest.mark.conformance
def test_eager_preset_matches_keras_with_every_option_on(keras):
    params, grads = make_problem(seed=1)
    kwargs: dict[str, Any] = dict(
        rho=0.8, epsilon=1e-5, momentum=0.5, centered=True, weight_decay=0.1
    )
    theirs, ours = rates(keras, scheduled=True)
    reference = keras_trajectory(keras, params, grads, learning_rate=theirs, **kwargs)
    tx = rj.compat.keras_rmsprop(ours, **kwargs)
    worst = max_error_relative_to_leaf_scale(
        preset_trajectory(tx, params, grads, jit=False), reference
    )
    print(f"eager keras_rmsprop vs keras, worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE


GRADIENT_OPTIONS = [
    {"clipnorm": 1.0},
    {"clipvalue": 0.5},
    {"global_clipnorm": 2.0},
    {"loss_scale_factor": 128.0},
    {"gradient_accumulation_steps": 3},
]


@pytest.mark.conformance
@pytest.mark.parametrize("option", GRADIENT_OPTIONS, ids=lambda o: next(iter(o)))
def test_gradient_options_match_keras(keras, option):
    params, grads = make_problem(seed=2)
    if "loss_scale_factor" in option:
        grads = [g * np.float32(option["loss_scale_factor"]) for g in grads]
    # A large epsilon makes the step depend on the gradient's scale, so that clipping and
    # loss scaling change the trajectory visibly.
    plain: dict[str, Any] = dict(epsilon=1.0, momentum=0.9, centered=True, weight_decay=0.01)
    theirs, ours = rates(keras, scheduled=True)
    run_keras = (
        keras_jitted_trajectory if "gradient_accumulation_steps" in option else keras_trajectory
    )
    reference = run_keras(keras, params, grads, learning_rate=theirs, **plain, **option)
    tx = rj.compat.keras_rmsprop(ours, **plain, **option)
    worst = max_error_relative_to_leaf_scale(preset_trajectory(tx, params, grads), reference)
    print(f"keras_rmsprop({option}) vs keras, worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE
    # The option changes the trajectory, so the agreement above is not vacuous.
    baseline = preset_trajectory(rj.compat.keras_rmsprop(ours, **plain), params, grads)
    assert max_error_relative_to_leaf_scale(baseline, reference) > 1e-3


def test_gradient_accumulation_updates_once_per_window_with_the_window_mean():
    params, grads = make_problem(seed=3, shapes=[(4,)])
    tx = rj.compat.keras_rmsprop(0.1, gradient_accumulation_steps=4)
    trajectory = preset_trajectory(tx, params, grads)[0]
    moved = np.any(np.diff(np.concatenate([params[0][None], trajectory]), axis=0) != 0, axis=1)
    np.testing.assert_array_equal(np.flatnonzero(moved), np.arange(3, STEPS, 4))
    window_means = grads[0][: STEPS // 4 * 4].reshape(-1, 4, 4).mean(axis=1)
    single = preset_trajectory(rj.compat.keras_rmsprop(0.1), params, [window_means])[0]
    np.testing.assert_allclose(trajectory[3::4], single, rtol=1e-5)


def test_decoupled_weight_decay_is_not_divided_by_the_rms():
    """With zero gradients only the decay acts: p_t = (1 - lr * wd)**t * p_0, as in Keras."""
    params = [np.array([1.0, -2.0], np.float32)]
    grads = [np.zeros((STEPS, 2), np.float32)]
    tx = rj.compat.keras_rmsprop(0.1, momentum=0.9, weight_decay=0.5)
    trajectory = preset_trajectory(tx, params, grads)[0]
    expected = params[0] * (1 - 0.1 * 0.5) ** np.arange(1, STEPS + 1)[:, None]
    np.testing.assert_allclose(trajectory, expected, rtol=1e-5)


@pytest.mark.conformance
def test_weight_decay_mask_of_rmsprop_matches_keras_exclude_from_weight_decay(keras):
    """The documented replacement for `exclude_from_weight_decay`, checked against Keras."""
    params, grads = make_problem(seed=4)
    kwargs = dict(momentum=0.9, centered=True, weight_decay=0.1)
    variables = [keras.Variable(p) for p in params]
    optimizer = keras.optimizers.RMSprop(learning_rate=LR, **kwargs)
    optimizer.exclude_from_weight_decay(var_list=variables[1:3])
    history = []
    for t in range(STEPS):
        optimizer.apply([g[t] for g in grads], variables)
        history.append([np.asarray(v.value) for v in variables])
    reference = [np.stack([h[i] for h in history]) for i in range(len(params))]
    tx = rj.rmsprop(
        LR,
        decay=0.9,
        eps=1e-7,
        eps_in_sqrt=True,
        centered=True,
        momentum=0.9,
        weight_decay=0.1,
        decoupled_weight_decay=True,
        weight_decay_mask=[True, False, False, True],
    )
    worst = max_error_relative_to_leaf_scale(preset_trajectory(tx, params, grads), reference)
    print(f"masked rj.rmsprop vs keras exclude_from_weight_decay, worst {worst:.2e}")
    assert worst <= TOLERANCE


@pytest.mark.conformance
def test_signature_matches_keras_optimizers_rmsprop(keras):
    theirs = inspect.signature(keras.optimizers.RMSprop.__init__).parameters
    ours = inspect.signature(rj.compat.keras_rmsprop).parameters
    # Keras names its optimizer variables "rmsprop" by default before 3.15 and None since; a
    # label that changes no update, so the preset takes the newest default.
    assert theirs["name"].default in ("rmsprop", None)
    expected = [
        (n, None if n == "name" else p.default)
        for n, p in theirs.items()
        if n not in ("self", "kwargs")
    ]
    assert [(n, p.default) for n, p in ours.items()] == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("learning_rate", -0.1),
        ("rho", 1.5),
        ("momentum", 1.0),
        ("epsilon", -1e-7),
        ("weight_decay", -0.01),
        ("clipnorm", -1.0),
        ("clipvalue", -1.0),
        ("global_clipnorm", float("nan")),
        ("loss_scale_factor", 0.0),
        ("gradient_accumulation_steps", 1),
        ("gradient_accumulation_steps", 2.5),
    ],
)
def test_out_of_range_argument_raises_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        rj.compat.keras_rmsprop(**{name: value})


def test_two_clipping_arguments_raise_value_error():
    with pytest.raises(ValueError, match="Only one of `clipnorm`"):
        rj.compat.keras_rmsprop(clipnorm=1.0, global_clipnorm=1.0)


def test_complex_parameters_raise_type_error_naming_the_leaf():
    tx = rj.compat.keras_rmsprop()
    with pytest.raises(TypeError, match=r"\['w'\] is complex"):
        tx.init({"b": jnp.zeros(2), "w": jnp.zeros(2, jnp.complex64)})
