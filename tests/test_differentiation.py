"""Differentiating through updates (meta-learning a hyperparameter, unrolled optimization)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import enable_x64

import rmsprop_jax as rj

STEPS = 3


def problem(dtype):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(0.1 * rng.normal(size=(256, 256)), dtype)}
    inputs = jnp.asarray(rng.normal(size=(32, 256)), dtype)
    return params, inputs


def unrolled_loss(moment_storage, options, dtype=jnp.float32):
    """The loss after STEPS updates, as a function of (decay, learning rate, parameters), and
    the parameters."""
    params, inputs = problem(dtype)

    def loss(p):
        return jnp.mean(jnp.tanh(inputs @ p["w"]) ** 2)

    def after_steps(decay, learning_rate, p=params):
        tx = rj.rmsprop(learning_rate, decay=decay, moment_storage=moment_storage, **options)
        state = tx.init(p)
        for _ in range(STEPS):
            updates, state = tx.update(jax.grad(loss)(p), state, p)
            p = optax.apply_updates(p, updates)
        return loss(p)

    return after_steps, params


VARIANTS = [{}, {"centered": True, "momentum": 0.9}]
IDS = ["plain", "c+m"]


@pytest.mark.parametrize(
    ("moment_storage", "options"),
    [
        ("float32", {}),
        ("float32", {"centered": True, "momentum": 0.9}),
        ("factored", {}),
        # Centered factored storage keeps `mu` in bfloat16, differentiated straight through.
        ("factored", {"momentum": 0.9}),
    ],
    ids=["float32-plain", "float32-c+m", "factored-plain", "factored-momentum"],
)
def test_exact_formats_differentiate_as_finite_differences_say(moment_storage, options):
    # float64 parameters, so that a central difference with a small step is accurate (the loss
    # curves fast in the learning rate: a step of 1e-6 is off by 2e-4 there).
    with enable_x64(True):
        f, _ = unrolled_loss(moment_storage, options, jnp.float64)
        decay, rate, h = 0.9, 1e-2, 1e-7
        by_decay, by_rate = jax.jit(jax.grad(f, argnums=(0, 1)))(decay, rate)
        assert abs(by_decay) > 1e-3
        np.testing.assert_allclose(
            by_decay, (f(decay + h, rate) - f(decay - h, rate)) / (2 * h), rtol=1e-5
        )
        np.testing.assert_allclose(
            by_rate, (f(decay, rate + h) - f(decay, rate - h)) / (2 * h), rtol=1e-5
        )


@pytest.mark.parametrize("options", VARIANTS, ids=IDS)
def test_bfloat16_differentiates_straight_through_its_rounding(options):
    # Its stochastic rounding (bit operations) would give a derivative of 0 through the stored
    # average; treated as the identity, derivatives are float32 storage's along the rounded
    # trajectory, also through the state kept from step to step.
    f, params = unrolled_loss("float32", options)
    exact = jax.jit(jax.grad(f, argnums=(0, 2)))(0.9, 1e-2, params)
    f, params = unrolled_loss("bfloat16", options)
    ours = jax.jit(jax.grad(f, argnums=(0, 2)))(0.9, 1e-2, params)
    np.testing.assert_allclose(ours[0], exact[0], rtol=0.05)
    relative = jnp.linalg.norm(ours[1]["w"] - exact[1]["w"]) / jnp.linalg.norm(exact[1]["w"])
    assert relative < 0.05


@pytest.mark.parametrize("options", VARIANTS, ids=IDS)
def test_int8_refuses_to_be_differentiated_through_its_codes(options):
    f, params = unrolled_loss("int8", options)
    for argnums in (0, 2):  # the decay; the parameters (through the gradients)
        with pytest.raises(TypeError, match="moment_storage='int8' was differentiated"):
            jax.grad(f, argnums=argnums)(0.9, 1e-2, params)
