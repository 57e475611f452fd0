"""`rj.rmsprop` composes with optax's wrappers and combinators."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import random_problem, run_transformation
from reference import Config, reference_trajectory

import rmsprop_jax as rj


def test_chain_with_global_norm_clipping_clips_before_the_moments():
    params, grads = random_problem({"w": (4, 4)}, 20, seed=0)
    grads = [{"w": 10.0 * g["w"]} for g in grads]
    tx = optax.chain(optax.clip_by_global_norm(1.0), rj.rmsprop(0.01, momentum=0.9))
    trajectory, _ = run_transformation(tx, params, grads)
    clipped = [{"w": g["w"] / max(1.0, float(np.linalg.norm(g["w"])))} for g in grads]
    expected, _ = reference_trajectory(params, clipped, Config(momentum=0.9))
    np.testing.assert_allclose(trajectory[-1]["w"], expected[-1]["w"], rtol=2e-5, atol=1e-6)


def test_inject_hyperparams_changes_the_rate_between_steps_without_recompiling():
    params, grads = random_problem({"w": (5,)}, 6, seed=1)
    tx = optax.inject_hyperparams(rj.rmsprop)(learning_rate=0.01)
    state = tx.init(params)
    traces: list[None] = []

    @jax.jit
    def step(params, state, grad):
        traces.append(None)
        updates, state = tx.update(grad, state, params)
        return optax.apply_updates(params, updates), state

    rates = [0.01, 0.01, 0.1, 0.1, 0.001, 0.001]
    for rate, grad in zip(rates, grads, strict=True):
        state.hyperparams["learning_rate"] = jnp.asarray(rate)
        params, state = step(params, state, grad)
    assert len(traces) == 1
    expected, _ = reference_trajectory(
        random_problem({"w": (5,)}, 6, seed=1)[0],
        grads,
        Config(learning_rate=lambda index: rates[index]),
    )
    np.testing.assert_allclose(params["w"], expected[-1]["w"], rtol=2e-5)


def test_multi_steps_accumulates_gradients_before_each_rmsprop_step():
    params, grads = random_problem({"w": (3, 2)}, 12, seed=2)
    tx = optax.MultiSteps(rj.rmsprop(0.01, centered=True), every_k_schedule=3)
    trajectory, _ = run_transformation(tx, params, grads)
    averaged = [{"w": np.mean([g["w"] for g in grads[i : i + 3]], axis=0)} for i in range(0, 12, 3)]
    expected, _ = reference_trajectory(params, averaged, Config(centered=True))
    np.testing.assert_allclose(trajectory[-1]["w"], expected[-1]["w"], rtol=2e-5, atol=1e-7)
    np.testing.assert_array_equal(trajectory[0]["w"], params["w"])


def test_apply_if_finite_skips_a_nan_step_and_leaves_params_and_state_unchanged():
    params, grads = random_problem({"w": (4,)}, 3, seed=3)
    tx = optax.apply_if_finite(rj.rmsprop(0.01, momentum=0.9), max_consecutive_errors=5)
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates, state = step(grads[0], state, params)
    params = optax.apply_updates(params, updates)
    before = jax.tree.map(np.asarray, (params, state.inner_state))
    bad = {"w": grads[1]["w"].copy()}
    bad["w"][2] = np.nan
    updates, state = step(bad, state, params)
    after_params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(after_params["w"], before[0]["w"])
    for old, new in zip(
        jax.tree.leaves(before[1]), jax.tree.leaves(state.inner_state), strict=True
    ):
        np.testing.assert_array_equal(old, new)
    assert int(state.notfinite_count) == 1


def test_masked_rmsprop_updates_only_the_selected_leaves():
    params, grads = random_problem({"trained": (3,), "frozen": (2,)}, 5, seed=4)
    tx = optax.chain(
        optax.masked(rj.rmsprop(0.01), {"trained": True, "frozen": False}),
        optax.masked(optax.set_to_zero(), {"trained": False, "frozen": True}),
    )
    trajectory, _ = run_transformation(tx, params, grads)
    np.testing.assert_array_equal(trajectory[-1]["frozen"], params["frozen"])
    expected, _ = reference_trajectory(
        {"trained": params["trained"]}, [{"trained": g["trained"]} for g in grads], Config()
    )
    np.testing.assert_allclose(trajectory[-1]["trained"], expected[-1]["trained"], rtol=2e-5)
