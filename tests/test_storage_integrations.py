"""Every storage format in every integration the README names.

nnx.Optimizer under nnx.jit, a Linen TrainState, orbax checkpoints of NNX optimizer state,
optax.inject_hyperparams, optax.apply_if_finite, optax.MultiSteps and jax.vmap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax as rj

FORMATS = ["float32", "bfloat16", "int8", "factored"]
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "centered_momentum": {"centered": True, "momentum": 0.9},
}

if TYPE_CHECKING:
    from flax import nnx
else:
    nnx = pytest.importorskip("flax.nnx")


class _Model(nnx.Module):
    """Big enough that int8 and factored compress its first kernel."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(128, 256, rngs=rngs)
        self.l2 = nnx.Linear(256, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def _batch():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(16, 128)), jnp.float32), jnp.asarray(rng.integers(0, 4, 16))


def _nnx_losses(tx, steps=4):
    model = _Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = _batch()

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)], model, optimizer


def _plain_losses(tx, steps=4):
    """The same training in plain JAX, the reference for the NNX run."""
    model = _Model(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda v: v, nnx.to_pure_dict(params))
    x, y = _batch()

    def loss_fn(p):
        merged = nnx.merge(graphdef, _as_state(graphdef, p))
        return optax.softmax_cross_entropy_with_integer_labels(merged(x), y).mean()

    state, losses = tx.init(params), []
    for _ in range(steps):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    return losses


def _as_state(graphdef, pure):
    state = nnx.state(nnx.merge(graphdef, nnx.state(_Model(nnx.Rngs(0)), nnx.Param)), nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    return state


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("moment_storage", FORMATS)
def test_nnx_optimizer_under_nnx_jit_trains_as_plain_jax(moment_storage, variant):
    tx = rj.rmsprop(1e-2, moment_storage=moment_storage, **VARIANTS[variant])
    losses, _, _ = _nnx_losses(tx)
    np.testing.assert_allclose(losses, _plain_losses(tx), rtol=1e-5)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("moment_storage", FORMATS)
def test_nnx_optimizer_state_round_trips_through_an_orbax_checkpoint(moment_storage, tmp_path):
    pytest.importorskip("orbax.checkpoint")
    tx = rj.rmsprop(1e-2, centered=True, momentum=0.9, moment_storage=moment_storage)
    _, _, optimizer = _nnx_losses(tx, steps=3)
    saved = nnx.state(optimizer)
    manager = rj.checkpoint.open_manager(tmp_path / "ckpt")
    rj.checkpoint.save(manager, 3, {"opt_state": saved})
    manager.wait_until_finished()
    fresh = nnx.Optimizer(_Model(nnx.Rngs(1)), tx, wrt=nnx.Param)
    restored = rj.checkpoint.restore(manager, {"opt_state": nnx.state(fresh)})["opt_state"]
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype


@pytest.mark.parametrize("moment_storage", FORMATS)
def test_linen_train_state_trains(moment_storage):
    if TYPE_CHECKING:
        from flax import linen
    else:
        linen = pytest.importorskip("flax.linen")
    train_state = pytest.importorskip("flax.training.train_state")

    class Dense(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(4)(linen.relu(linen.Dense(256)(x)))

    x, y = _batch()
    module = Dense()
    params = module.init(jax.random.key(0), x)["params"]
    tx = rj.rmsprop(1e-2, centered=True, moment_storage=moment_storage)
    state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)

    @jax.jit
    def step(state):
        def loss_fn(p):
            logits = state.apply_fn({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(5):
        state, loss = step(state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def _quadratic_run(tx, steps=5, grad_fn=None):
    params = {"m": jnp.ones((128, 256)), "b": jnp.ones(8)}
    grad_fn = grad_fn or (lambda p, i: jax.tree.map(lambda x: x * (1.0 + 0.1 * i), p))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(steps):
        updates, state = update(grad_fn(params, i), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("moment_storage", FORMATS)
def test_inject_hyperparams_equals_the_fixed_optimizer(moment_storage):
    fixed, _ = _quadratic_run(rj.rmsprop(1e-2, momentum=0.9, moment_storage=moment_storage))
    injected = optax.inject_hyperparams(rj.rmsprop)(
        learning_rate=1e-2, momentum=0.9, moment_storage=moment_storage
    )
    ours, _ = _quadratic_run(injected)
    # An array learning rate rounds differently in the last bit; stochastic rounding may then
    # move an isolated stored element to its neighbouring code.
    rtol = 1e-6 if moment_storage == "float32" else 1e-3
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(fixed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol)


@pytest.mark.parametrize("moment_storage", FORMATS)
def test_apply_if_finite_skips_a_nan_step_and_keeps_the_state(moment_storage):
    def grads(p, i):
        g = jax.tree.map(lambda x: x * 1.0, p)
        return {"m": g["m"].at[3, 5].set(jnp.nan), "b": g["b"]} if i == 2 else g

    tx = optax.apply_if_finite(rj.rmsprop(1e-2, moment_storage=moment_storage), 3)
    params, state = _quadratic_run(tx, steps=4, grad_fn=grads)
    assert int(state.total_notfinite) == 1
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
    for leaf in jax.tree.leaves(state.inner_state):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


@pytest.mark.parametrize("moment_storage", FORMATS)
def test_multi_steps_accumulates_then_updates(moment_storage):
    inner = rj.rmsprop(1e-2, centered=True, moment_storage=moment_storage)

    def pairs(p, i):  # the same gradient on both calls of each pair
        return jax.tree.map(lambda x: x * (1.0 + 0.1 * (i // 2)), p)

    accumulated, _ = _quadratic_run(optax.MultiSteps(inner, every_k_schedule=2), 4, pairs)
    plain, _ = _quadratic_run(inner, steps=2)
    assert not np.allclose(np.asarray(accumulated["m"]), 1.0)
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)


@pytest.mark.parametrize("moment_storage", FORMATS)
def test_vmap_over_learning_rates_equals_separate_runs(moment_storage):
    params = {"m": jnp.ones((128, 256)), "b": jnp.ones(8)}
    grads = jax.tree.map(lambda x: 0.5 * x, params)

    def run(lr):
        tx = rj.rmsprop(lr, centered=True, moment_storage=moment_storage)
        updates, _ = tx.update(grads, tx.init(params), params)
        return updates

    rates = jnp.asarray([1e-3, 1e-2])
    batched = jax.jit(jax.vmap(run))(rates)
    for i, lr in enumerate(rates):
        single = run(float(lr))
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
            np.testing.assert_allclose(np.asarray(a)[i], np.asarray(b), rtol=1e-6)
