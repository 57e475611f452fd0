"""The state is a pytree of NamedTuples with stable structure and findable fields."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax as rj

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_state_tree_does_not_depend_on_bias_correction(momentum):
    with_correction = rj.rmsprop(0.1, momentum=momentum, bias_correction=True).init(PARAMS)
    without = rj.rmsprop(0.1, momentum=momentum, bias_correction=False).init(PARAMS)
    assert jax.tree.structure(with_correction) == jax.tree.structure(without)


def test_checkpointed_state_resumes_with_the_bias_correction_flag_flipped():
    grads = {"w": jnp.full((2, 3), 0.3), "b": jnp.full(3, -0.2)}
    saved = rj.rmsprop(0.1, bias_correction=False)
    state = saved.init(PARAMS)
    _, state = saved.update(grads, state, PARAMS)
    resumed = rj.rmsprop(0.1, bias_correction=True)
    updates, state = resumed.update(grads, state, PARAMS)
    nu = 0.9 * 0.1 * 0.09 + 0.1 * 0.09
    expected = -0.1 * 0.3 / (np.sqrt(nu / (1 - 0.9**2)) + 1e-8)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)


def test_tree_get_finds_nu_and_mu():
    state = rj.rmsprop(0.1, centered=True, momentum=0.9).init(PARAMS)
    nu = optax.tree.get(state, "nu")
    mu = optax.tree.get(state, "mu")
    assert jax.tree.structure(nu) == jax.tree.structure(PARAMS)
    assert jax.tree.structure(mu) == jax.tree.structure(PARAMS)


def test_scale_by_rms_state_types_and_initial_values():
    plain = rj.scale_by_rms(initial_scale=1.0).init(PARAMS)
    assert isinstance(plain, rj.ScaleByRmsState)
    np.testing.assert_array_equal(plain.nu["w"], 1.0)
    assert plain.count.dtype == jnp.int32 and int(plain.count) == 0
    centered = rj.scale_by_rms(centered=True).init(PARAMS)
    assert isinstance(centered, rj.ScaleByCenteredRmsState)
    np.testing.assert_array_equal(centered.mu["b"], 0.0)


def test_count_advances_once_per_update():
    tx = rj.rmsprop(0.1)
    state = tx.init(PARAMS)
    for _ in range(3):
        _, state = tx.update(jax.tree.map(jnp.ones_like, PARAMS), state, PARAMS)
    assert int(optax.tree.get(state, "count")) == 3


def test_scale_by_rms_neither_flips_the_sign_nor_scales_by_a_learning_rate():
    tx = rj.scale_by_rms(decay=0.0, eps=0.0)
    grads = {"w": jnp.full((2, 3), -4.0), "b": jnp.asarray([2.0, 0.0, 0.5])}
    updates, _ = tx.update(grads, tx.init(PARAMS))
    np.testing.assert_array_equal(updates["w"], -1.0)
    np.testing.assert_array_equal(updates["b"], [1.0, 0.0, 1.0])
