"""`rj.pack_small_leaves`: same updates as the unpacked transformation, fewer kernels."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    array_kernels,
    compile_step,
    max_relative_difference,
    random_problem,
    run_transformation,
)
from reference import Config, reference_trajectory

import rmsprop_jax as rj
from rmsprop_jax import grouping

SHAPES = {"kernel": (12, 10), "bias": (10,), "gain": (), "table": (3, 4)}
MAX_SIZE = 16  # packs bias, gain and table; not kernel (120 elements)
STEPS = 30

CONFIGS = [
    Config(),
    Config(eps_in_sqrt=True, initial_scale=0.5),
    Config(centered=True, momentum=0.9),
    Config(momentum=0.9, nesterov=True, bias_correction=True),
    Config(weight_decay=0.05, momentum=0.5),
    Config(weight_decay=0.05, decoupled_weight_decay=True, maximize=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(CONFIGS.index(c)))
def test_packed_rmsprop_matches_float64_reference(config, maybe_jit):
    params, grads = random_problem(SHAPES, STEPS, seed=CONFIGS.index(config))
    tx = rj.pack_small_leaves(rj.rmsprop(**config.as_kwargs()), max_size=MAX_SIZE)
    trajectory, _ = run_transformation(tx, params, grads, maybe_jit)
    expected, _ = reference_trajectory(params, grads, config)
    for step in (0, STEPS - 1):
        assert max_relative_difference(trajectory[step], expected[step]) < 2e-5, step


def mixed_tree(rng: np.random.Generator) -> dict:
    """Nested dicts, a list, a tuple, None, float32 and bfloat16 leaves, small and large."""

    def normal(shape, dtype=jnp.float32):
        return jnp.asarray(rng.normal(size=shape), dtype)

    return {
        "dense": {"w": normal((40, 30)), "b": normal((30,))},
        "norms": [normal((30,)), normal((30,), jnp.bfloat16), normal(())],
        "heads": (normal((5, 2), jnp.bfloat16), normal((64, 64), jnp.bfloat16)),
        "frozen": None,
    }


@pytest.mark.parametrize("max_size", [1, 64, None])
def test_packed_updates_equal_unpacked_updates_exactly(max_size, maybe_jit):
    rng = np.random.default_rng(0)
    params = mixed_tree(rng)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)]
    grads *= 3
    settings = dict(centered=True, momentum=0.9, weight_decay=0.01, decoupled_weight_decay=True)
    plain, _ = run_transformation(rj.rmsprop(0.01, **settings), params, grads, maybe_jit)
    packed_tx = rj.pack_small_leaves(rj.rmsprop(0.01, **settings), max_size=max_size)
    packed, _ = run_transformation(packed_tx, params, grads, maybe_jit)
    assert jax.tree.structure(packed[-1]) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(packed[-1]), jax.tree.leaves(plain[-1]), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_state_packs_small_leaves_per_dtype_in_tree_order():
    params = mixed_tree(np.random.default_rng(1))
    state = rj.pack_small_leaves(rj.rmsprop(0.01), max_size=64).init(params)
    nu = state[2].nu
    assert isinstance(nu, rj.PackedTree)
    # float32: dense.b (30), norms[0] (30), norms[2] (1); bfloat16: norms[1] (30), heads[0] (10).
    assert {name: v.shape for name, v in nu.packed.items()} == {
        "bfloat16": (40,),
        "float32": (61,),
    }
    assert nu.leaves["dense"]["b"] is None and nu.leaves["dense"]["w"].shape == (40, 30)
    assert nu.leaves["heads"][1].shape == (64, 64) and nu.leaves["frozen"] is None

    packed = grouping.pack(params, max_size=64)
    np.testing.assert_array_equal(packed.packed["float32"][:30], params["dense"]["b"])
    np.testing.assert_array_equal(packed.packed["float32"][30:60], params["norms"][0])
    restored = grouping.unpack(packed, params, max_size=64)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_nothing_small_means_nothing_packed():
    params = {"w": jnp.ones((100, 100))}
    state = rj.pack_small_leaves(rj.rmsprop(0.01), max_size=10).init(params)
    assert state[2].nu.packed == {}
    assert state[2].nu.leaves["w"].shape == (100, 100)


def test_many_small_leaves_compile_to_fewer_kernels():
    params = {f"bias{i}": jnp.ones((100,)) for i in range(32)}
    for settings in ({}, dict(centered=True, momentum=0.9)):
        per_leaf = array_kernels(compile_step(rj.rmsprop(0.01, **settings), params))
        packed_tx = rj.pack_small_leaves(rj.rmsprop(0.01, **settings))
        packed = array_kernels(compile_step(packed_tx, params))
        # Per leaf: the parameter's kernel only. Per dtype: a few, whatever the leaf count.
        assert packed <= len(params) + 6, (settings, packed)
        assert per_leaf >= 2 * len(params), (settings, per_leaf)


def test_composes_with_optax_and_sweeps():
    params, grads = random_problem(SHAPES, 5, seed=3)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        rj.pack_small_leaves(rj.rmsprop(0.01, momentum=0.9), max_size=MAX_SIZE),
    )
    reference = optax.chain(optax.clip_by_global_norm(1.0), rj.rmsprop(0.01, momentum=0.9))
    ours, _ = run_transformation(tx, params, grads)
    theirs, _ = run_transformation(reference, params, grads)
    assert max_relative_difference(ours[-1], theirs[-1]) < 1e-6

    rates = jnp.array([0.01, 0.02, 0.05])

    def final_params(rate):
        tx = rj.pack_small_leaves(rj.rmsprop(rate), max_size=MAX_SIZE)
        return run_transformation(tx, params, grads, transform_fn=lambda f: f)[0][-1]

    swept = jax.vmap(final_params)(rates)
    for i, rate in enumerate(rates):
        single = run_transformation(rj.rmsprop(float(rate)), params, grads)[0][-1]
        row = jax.tree.map(lambda x, i=i: x[i], swept)
        assert max_relative_difference(row, single) < 1e-5


def test_packed_state_survives_a_checkpoint(tmp_path):
    params, grads = random_problem(SHAPES, 4, seed=5)
    tx = rj.pack_small_leaves(rj.rmsprop(0.01, centered=True), max_size=MAX_SIZE)
    _, state = run_transformation(tx, params, grads)
    with rj.checkpoint.open_manager(tmp_path) as manager:
        rj.checkpoint.save(manager, 4, state, force=True)
        manager.wait_until_finished()
        restored = rj.checkpoint.restore(manager, tx.init(params))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("max_size", [0, -3, 2.5, True, "16"])
def test_bad_max_size_is_rejected_with_its_value(max_size):
    with pytest.raises(ValueError, match=r"max_size.*" + re.escape(repr(max_size))):
        rj.pack_small_leaves(rj.rmsprop(0.01), max_size=max_size)


def test_a_gradient_for_another_model_fails_readably():
    tx = rj.pack_small_leaves(rj.rmsprop(0.01), max_size=MAX_SIZE)
    state = tx.init({"kernel": jnp.ones((12, 10)), "bias": jnp.ones((10,))})
    with pytest.raises(ValueError, match=r"packed\['float32'\] has shape \(11,\)"):
        tx.update({"kernel": jnp.ones((12, 10)), "bias": jnp.ones((11,))}, state)


def test_state_shardings_and_memory_see_the_packed_state():
    params = {"w": jnp.ones((64, 64)), "b": jnp.ones((64,)), "gain": jnp.ones(())}
    tx = rj.pack_small_leaves(rj.rmsprop(0.01, centered=True, momentum=0.9))
    state = tx.init(params)
    shardings = rj.sharding.state_shardings(tx, params)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    abstract = rj.sharding.abstract_state(tx, params)
    assert [a.shape for a in jax.tree.leaves(abstract)] == [a.shape for a in jax.tree.leaves(state)]
    # mu, nu and the momentum trace: 12 bytes per parameter, plus the step count.
    parameters = 64 * 64 + 64 + 1
    assert rj.state_bytes(state, params).total_bytes == 12 * parameters + 4


def test_a_mask_tree_for_the_unpacked_params_is_refused_not_misapplied():
    params = {"kernel": jnp.ones((12, 10)), "bias": jnp.ones((10,))}
    mask = {"kernel": True, "bias": False}
    tx = rj.pack_small_leaves(rj.rmsprop(0.01, weight_decay=0.1, weight_decay_mask=mask))
    with pytest.raises(ValueError, match="PackedTree"):
        tx.init(params)
