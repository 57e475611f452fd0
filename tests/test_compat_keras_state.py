"""Keras 3 RMSprop state crosses over to `keras_rmsprop` and back, trajectories unchanged."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import import_reference_framework
from helpers import max_error_relative_to_leaf_scale, run_trajectory

import rmsprop_jax as rj

STEPS, SPLIT = 40, 20
TOLERANCE = 1e-5
LR = 0.01


@pytest.fixture(scope="module")
def keras():
    return import_reference_framework("keras")


def new_model(keras):
    """Two Dense layers: variable paths sequential/dense/kernel, ..., sequential/dense_1/bias."""
    keras.utils.clear_session()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(2)])
    model.build((None, 3))
    return model


def as_tree(flat):
    """{"sequential/dense/kernel": w, ...} as the nested dict a JAX model would hold."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *scopes, leaf = path.split("/")
        node = tree
        for scope in scopes:
            node = node.setdefault(scope, {})
        node[leaf] = value
    return tree


def gradients(model, seed):
    rng = np.random.default_rng(seed)
    return {
        v.path: (0.3 + rng.normal(size=(STEPS, *v.shape))).astype(np.float32)
        for v in model.trainable_variables
    }


def keras_optimizer(keras, kwargs):
    kwargs = dict(kwargs)
    kwargs["learning_rate"] = (
        keras.optimizers.schedules.ExponentialDecay(LR, 7, 0.8)
        if kwargs.pop("scheduled", False)
        else LR
    )
    return keras.optimizers.RMSprop(**kwargs)


def our_optimizer(kwargs):
    kwargs = dict(kwargs)
    rate = optax.exponential_decay(LR, 7, 0.8) if kwargs.pop("scheduled", False) else LR
    return rj.compat.keras_rmsprop(rate, **kwargs)


def keras_steps(model, optimizer, grads, steps):
    history = []
    for t in steps:
        variables = model.trainable_variables
        optimizer.apply([grads[v.path][t] for v in variables], variables)
        history.append({v.path: np.asarray(v.value) for v in variables})
    return history


def run_ours(tx, params, state, grads, steps):
    stacked = as_tree({k: jnp.asarray(g) for k, g in grads.items()})
    state, history = run_trajectory(tx, params, stacked, steps, state)
    return (jax.tree.map(lambda h: h[-1], history), state), history


CONFIGS = [
    dict(momentum=0.9, centered=True, use_ema=True, ema_overwrite_frequency=5, scheduled=True),
    dict(weight_decay=0.01),
]


@pytest.mark.conformance
@pytest.mark.parametrize("kwargs", CONFIGS, ids=["momentum-centered-ema-schedule", "plain"])
def test_keras_state_continued_here_and_back_equals_the_keras_run(keras, kwargs):
    model = new_model(keras)
    start = {v.path: np.asarray(v.value) for v in model.trainable_variables}
    grads = gradients(model, seed=0)
    full_optimizer = keras_optimizer(keras, kwargs)
    full = keras_steps(model, full_optimizer, grads, range(STEPS))
    expected = as_tree({k: np.stack([h[k] for h in full[SPLIT:]]) for k in start})

    # Keras for SPLIT steps, then here: the tree's order differs from Keras's (bias < kernel).
    model = new_model(keras)
    for v in model.trainable_variables:
        v.assign(start[v.path])
    optimizer = keras_optimizer(keras, kwargs)
    keras_steps(model, optimizer, grads, range(SPLIT))
    halfway = as_tree({v.path: jnp.asarray(v.value) for v in model.trainable_variables})
    tx = our_optimizer(kwargs)
    state = rj.compat.state_from_keras(optimizer, halfway, tx)
    (_, final_state), ours = run_ours(tx, halfway, state, grads, slice(SPLIT, STEPS))
    worst = max_error_relative_to_leaf_scale(jax.tree.leaves(ours), jax.tree.leaves(expected))
    print(f"Keras {SPLIT} steps, keras_rmsprop after: worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE
    if kwargs.get("use_ema"):
        theirs = as_tree(
            {
                v.path: np.asarray(a.value)
                for v, a in zip(
                    model.trainable_variables,
                    [a for a in full_optimizer.variables if a.path.endswith("_average")],
                    strict=True,
                )
            }
        )
        worst_ema = max_error_relative_to_leaf_scale(
            jax.tree.leaves(rj.compat.keras_ema_weights(final_state)), jax.tree.leaves(theirs)
        )
        assert worst_ema <= TOLERANCE

    # Here for SPLIT steps, then Keras.
    tx = our_optimizer(kwargs)
    params = as_tree({k: jnp.asarray(v) for k, v in start.items()})
    (params, state), _ = run_ours(tx, params, tx.init(params), grads, slice(0, SPLIT))
    model = new_model(keras)
    flat = {"/".join(k.key for k in path): leaf for path, leaf in jax.tree.leaves_with_path(params)}
    for v in model.trainable_variables:
        v.assign(np.asarray(flat[v.path]))
    optimizer = keras_optimizer(keras, kwargs)
    optimizer.build(model.trainable_variables)
    values = rj.compat.state_to_keras(state, params, optimizer)
    assert set(values) <= {v.path for v in optimizer.variables}
    for v in optimizer.variables:
        if v.path in values:
            v.assign(values[v.path])
    theirs = keras_steps(model, optimizer, grads, range(SPLIT, STEPS))
    theirs = as_tree({k: np.stack([h[k] for h in theirs]) for k in start})
    worst = max_error_relative_to_leaf_scale(jax.tree.leaves(theirs), jax.tree.leaves(expected))
    print(f"keras_rmsprop {SPLIT} steps, Keras after: worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE


@pytest.mark.conformance
def test_states_that_do_not_match_are_refused(keras):
    model = new_model(keras)
    params = as_tree({v.path: np.asarray(v.value) for v in model.trainable_variables})
    adam = keras.optimizers.Adam()
    adam.build(model.trainable_variables)
    with pytest.raises(ValueError, match=r"is a Adam, not a keras\.optimizers\.RMSprop"):
        rj.compat.state_from_keras(adam, params, rj.compat.keras_rmsprop(momentum=0.9))
    sgd = keras.optimizers.SGD(momentum=0.9)
    sgd.build(model.trainable_variables)
    sgd_variables = {v.path: v.value for v in sgd.variables}
    with pytest.raises(ValueError, match=r"no '\*_velocity' variables.*not an RMSprop"):
        rj.compat.state_from_keras(sgd_variables, params, rj.compat.keras_rmsprop(momentum=0.9))
    rmsprop = keras.optimizers.RMSprop(momentum=0.9)
    rmsprop.build(model.trainable_variables)
    with pytest.raises(TypeError, match=r"`optimizer` must be an optax\.GradientTransformation"):
        rj.compat.state_from_keras(rmsprop, params, rj.compat.keras_rmsprop)
    with pytest.raises(ValueError, match="has a momentum buffer"):
        rj.compat.state_from_keras(rmsprop, params, rj.compat.keras_rmsprop())
    with pytest.raises(ValueError, match=r"Keras optimizer has no use_ema"):
        rj.compat.state_from_keras(
            rmsprop, params, rj.compat.keras_rmsprop(momentum=0.9, use_ema=True)
        )
    renamed = {"sequential": {"dense": params["sequential"]["dense"], "head": {"w": 0, "b": 0}}}
    renamed["sequential"]["head"] = params["sequential"]["dense_1"]
    with pytest.raises(ValueError, match=r"\['head'\]\['bias'\].*'sequential_head_bias'"):
        rj.compat.state_from_keras(rmsprop, renamed, rj.compat.keras_rmsprop(momentum=0.9))
    # By order the shapes decide: dense's bias (4,) is paired with Keras's kernel (3, 4).
    with pytest.raises(ValueError, match=r"has shape \(3, 4\), but the parameter"):
        rj.compat.state_from_keras(
            rmsprop, renamed, rj.compat.keras_rmsprop(momentum=0.9), match_by="order"
        )


@pytest.mark.parametrize(
    ("keras_state", "message"),
    [
        ("velocity", r"`keras_state` must be a built keras\.optimizers\.RMSprop, .*got 'velocity'"),
        (3, r"`keras_state` must be .*, got 3\."),
        ([np.ones(3)], r"`keras_state` holds array\(\[1\., 1\., 1\.\]\), which is not a Keras"),
    ],
    ids=["string", "number", "list of arrays"],
)
def test_a_keras_state_that_holds_no_keras_variables_is_named(keras_state, message):
    # Needs no Keras: it was "names must be strings, got None", or an AttributeError.
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    tx = rj.compat.keras_rmsprop(0.001)
    with pytest.raises(TypeError, match=message):
        rj.compat.state_from_keras(keras_state, params, tx)
    with pytest.raises(TypeError, match=message):
        rj.compat.state_to_keras(tx.init(params), params, keras_state)


@pytest.mark.conformance
@pytest.mark.parametrize("iteration", [np.float32(2.5), np.int64(-3), np.int64(2**31)])
def test_an_edited_keras_iteration_is_refused(keras, iteration):
    # A fractional iteration was truncated and a negative one kept as every step count; one
    # past int32 raised an OverflowError that named no variable.
    model = new_model(keras)
    params = as_tree({v.path: np.asarray(v.value) for v in model.trainable_variables})
    optimizer = keras.optimizers.RMSprop()
    optimizer.build(model.trainable_variables)
    values = {v.path: np.array(v.value) for v in optimizer.variables}
    (path,) = [path for path in values if path.endswith("/iteration")]
    values[path] = iteration
    with pytest.raises(ValueError, match=r"Keras `iteration` must be one whole number"):
        rj.compat.state_from_keras(values, params, rj.compat.keras_rmsprop())


@pytest.mark.conformance
@pytest.mark.parametrize(
    ("slot", "value", "message"),
    [
        ("velocity", np.nan, r"sequential_dense_kernel_velocity holds 1 NaN entries of 12"),
        ("velocity", -2.0, r"sequential_dense_kernel_velocity holds 1 negative .* -2\.0"),
        ("momentum", np.nan, r"sequential_dense_kernel_momentum holds 1 NaN entries"),
        ("average_gradient", np.nan, r"kernel_average_gradient holds 1 NaN entries"),
    ],
    ids=["nan-velocity", "negative-velocity", "nan-momentum", "nan-average-gradient"],
)
def test_a_diverged_or_edited_keras_state_is_refused_naming_the_variable(
    keras, slot, value, message
):
    # Imported as it was, each made every later update of the kernel NaN.
    model = new_model(keras)
    params = as_tree({v.path: np.asarray(v.value) for v in model.trainable_variables})
    optimizer = keras.optimizers.RMSprop(momentum=0.9, centered=True)
    optimizer.build(model.trainable_variables)
    values = {v.path: np.array(v.value) for v in optimizer.variables}
    # The optimizer's name prefixes the paths: "rm_sprop/" in newer Keras, "rmsprop/" in 3.5.
    (edited,) = [path for path in values if path.endswith(f"/sequential_dense_kernel_{slot}")]
    values[edited][1, 2] = value
    tx = rj.compat.keras_rmsprop(momentum=0.9, centered=True)
    with pytest.raises(ValueError, match=message):
        rj.compat.state_from_keras(values, params, tx)
    # An overflowed (infinite) velocity is kept: Keras divides by it and goes on.
    if slot == "velocity":
        values[edited][1, 2] = np.inf
        state = rj.compat.state_from_keras(values, params, tx)
        (stats,) = [
            node
            for node in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "nu"))
            if hasattr(node, "nu")
        ]
        assert np.isposinf(stats.nu["sequential"]["dense"]["kernel"][1, 2])
