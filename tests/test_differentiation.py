"""Differentiating through updates (meta-learning a hyperparameter, unrolled optimization)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import enable_x64

import rmsprop_jax as rj
from rmsprop_jax import storage

STEPS = 3


def problem(dtype, large=False):
    """Parameters and inputs: one 256 x 256 matrix, or (`large`) two matrices whose factored
    statistics come from whole-leaf sums (or row chunks, with JAX before 0.10.2)."""
    rng = np.random.default_rng(0)
    shapes = {"w": (512, 256), "v": (256, 384)} if large else {"w": (256, 256)}
    params = {k: jnp.asarray(0.1 * rng.normal(size=s), dtype) for k, s in shapes.items()}
    inputs = jnp.asarray(rng.normal(size=(32, shapes["w"][0])), dtype)
    return params, inputs


def unrolled_loss(moment_storage, options, dtype=jnp.float32, large=False):
    """The loss after STEPS updates, as a function of (decay, learning rate, parameters), and
    the parameters."""
    params, inputs = problem(dtype, large)

    def loss(p):
        outputs = inputs @ p["w"]
        if "v" in p:
            outputs = outputs @ p["v"]
        return jnp.mean(jnp.tanh(outputs) ** 2)

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
    ("moment_storage", "options", "large"),
    [
        ("float32", {}, False),
        ("float32", {"centered": True, "momentum": 0.9}, False),
        ("factored", {}, False),
        # Not centered: centered factored storage keeps `mu` in bfloat16, whose stochastic
        # rounding a central difference would step across (forward against reverse below).
        ("factored", {"momentum": 0.9}, False),
        # Two matrices large enough that their statistics come from whole-leaf sums.
        ("factored", {}, True),
        ("factored", {"momentum": 0.9}, True),
    ],
    ids=[
        "float32-plain",
        "float32-c+m",
        "factored-plain",
        "factored-momentum",
        "factored-large-plain",
        "factored-large-momentum",
    ],
)
def test_exact_formats_differentiate_as_finite_differences_say(moment_storage, options, large):
    # float64 parameters, so that a central difference with a small step is accurate (the loss
    # curves fast in the learning rate: a step of 1e-6 is off by 2e-4 there; with the large
    # leaves, steps of 1e-2 curve it too fast for 1e-7).
    with enable_x64(True):
        f, _ = unrolled_loss(moment_storage, options, jnp.float64, large)
        decay, rate, h = 0.9, 1e-3 if large else 1e-2, 1e-7
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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_large_centered_factored_leaves_differentiate_alike_both_ways(dtype):
    """Centered, the factored statistics of large leaves read `mu` in their sums and count
    the non-finite entries in a loop that runs only where needed (a loop JAX cannot
    differentiate in reverse mode by itself): forward and reverse mode give the same
    derivatives, but for `mu`'s bfloat16 tangents, rounded at other points in each mode (a
    central difference would step across `mu`'s stochastic rounding)."""
    with enable_x64(dtype == jnp.float64):
        f, _ = unrolled_loss("factored", {"centered": True, "momentum": 0.9}, dtype, large=True)
        primals = (0.9, 1e-2)  # decay, learning rate
        reverse = jax.jit(jax.grad(f, argnums=(0, 1)))(*primals)

        def along(direction):
            return jax.jvp(f, primals, direction)[1]

        forward = [jax.jit(along)((1.0, 0.0)), jax.jit(along)((0.0, 1.0))]
        assert all(np.isfinite(r) and abs(r) > 1e-2 for r in reverse), reverse
        np.testing.assert_allclose(forward, reverse, rtol=2e-3)


def test_ordering_ties_pass_derivatives_through():
    """`storage.after` orders a write after other arrays with bit operations, which alone
    would give a derivative of 0 (silently, through `mu` of centered factored storage)."""
    x, y = jnp.arange(4.0), jnp.ones(4)
    grad = jax.grad(lambda x: (storage.after(x, y) ** 2).sum())(x)
    np.testing.assert_array_equal(grad, 2 * x)
