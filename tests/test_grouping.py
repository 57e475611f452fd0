"""`rj.pack_small_leaves`: same updates as the unpacked transformation, fewer kernels."""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    array_kernels,
    compile_step,
    distinct_fusions,
    max_elementwise_relative_error,
    random_problem,
    run_transformation,
)
from reference import Config, reference_trajectory

import rmsprop_jax as rj
from rmsprop_jax import _jax_compat, _runtime_integers, grouping

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
        assert max_elementwise_relative_error(trajectory[step], expected[step]) < 2e-5, step


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
    settings: dict[str, Any] = dict(
        centered=True, momentum=0.9, weight_decay=0.01, decoupled_weight_decay=True
    )
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
    restored = grouping.unpack(packed, params)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_nothing_small_means_nothing_packed():
    params = {"w": jnp.ones((100, 100))}
    state = rj.pack_small_leaves(rj.rmsprop(0.01), max_size=10).init(params)
    assert state[2].nu.packed == {}
    assert state[2].nu.leaves["w"].shape == (100, 100)


def test_many_small_leaves_compile_to_fewer_kernels():
    params = {f"bias{i}": jnp.ones((100,)) for i in range(32)}
    cases: tuple[dict[str, Any], ...] = ({}, dict(centered=True, momentum=0.9))
    for settings in cases:
        per_leaf = array_kernels(compile_step(rj.rmsprop(0.01, **settings), params))
        packed_tx = rj.pack_small_leaves(rj.rmsprop(0.01, **settings))
        packed = array_kernels(compile_step(packed_tx, params))
        # Per leaf: the parameter's kernel only. Per dtype: a few, whatever the leaf count.
        assert packed <= len(params) + 6, (settings, packed)
        assert per_leaf >= 2 * len(params), (settings, per_leaf)


@pytest.mark.skipif(
    jax.default_backend() != "cpu"
    or _jax_compat.JAX_VERSION < _runtime_integers.SHARED_KERNELS_FROM,
    reason="leaves are sliced at run-time starts on CPU, from JAX 0.7.2 on",
)
def test_same_shaped_packed_leaves_compile_to_one_kernel_whatever_their_number():
    # Each packed leaf is sliced out of its buffer at a start the kernel takes as an argument,
    # so its kernel is the same code as its same-shaped neighbours' and compiles once; with the
    # start written into the code there was one distinct kernel per leaf.
    cases: tuple[dict[str, Any], ...] = ({}, dict(centered=True, momentum=0.9))
    for settings in cases:
        distinct = {}
        for leaves in (64, 256):
            params = {f"bias{i:03d}": jnp.ones((100,)) for i in range(leaves)}
            packed_tx = rj.pack_small_leaves(rj.rmsprop(0.01, **settings))
            distinct[leaves] = distinct_fusions(compile_step(packed_tx, params))
        per_leaf = distinct_fusions(compile_step(rj.rmsprop(0.01, **settings), params))
        assert distinct[64] == distinct[256], (settings, distinct)
        # The unpacked step's kernels, plus the few of the packed state and the starts.
        assert distinct[256] <= per_leaf + 4, (settings, distinct, per_leaf)


def test_a_nan_in_the_first_packed_gradient_leaves_the_other_leaves_updates_exact(maybe_jit):
    # The starts come from a condition on that element: a NaN takes the other branch, which
    # must read every leaf from the same place.
    rng = np.random.default_rng(4)
    params = {f"b{i}": jnp.asarray(rng.normal(size=(i + 2,)), jnp.float32) for i in range(5)}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    for first in (jnp.nan, 1.0):
        grads["b0"] = grads["b0"].at[0].set(first)
        plain, _ = run_transformation(rj.rmsprop(0.01), params, [grads] * 2, maybe_jit)
        tx = rj.pack_small_leaves(rj.rmsprop(0.01), max_size=64)
        packed, _ = run_transformation(tx, params, [grads] * 2, maybe_jit)
        for name in params:
            np.testing.assert_array_equal(packed[-1][name], plain[-1][name])
        assert np.isnan(packed[-1]["b0"][0]) == np.isnan(first)


def test_composes_with_optax_and_sweeps():
    params, grads = random_problem(SHAPES, 5, seed=3)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        rj.pack_small_leaves(rj.rmsprop(0.01, momentum=0.9), max_size=MAX_SIZE),
    )
    reference = optax.chain(optax.clip_by_global_norm(1.0), rj.rmsprop(0.01, momentum=0.9))
    ours, _ = run_transformation(tx, params, grads)
    theirs, _ = run_transformation(reference, params, grads)
    assert max_elementwise_relative_error(ours[-1], theirs[-1]) < 1e-6

    rates = jnp.array([0.01, 0.02, 0.05])

    def final_params(rate):
        tx = rj.pack_small_leaves(rj.rmsprop(rate), max_size=MAX_SIZE)
        return run_transformation(tx, params, grads, transform_fn=lambda f: f)[0][-1]

    swept = jax.vmap(final_params)(rates)
    for i, rate in enumerate(rates):
        single = run_transformation(rj.rmsprop(float(rate)), params, grads)[0][-1]
        row = jax.tree.map(lambda x, i=i: x[i], swept)
        assert max_elementwise_relative_error(row, single) < 1e-5


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


def test_a_checkpoint_without_the_layout_record_restores_and_trains_on(tmp_path):
    # Orbax stores a NamedTuple as a dict of its fields: a packed state saved before
    # PackedTree recorded its layout is this tree, without the "layout" entries.
    params, grads = random_problem(SHAPES, 6, seed=6)
    tx = rj.pack_small_leaves(rj.rmsprop(0.01, momentum=0.9), max_size=MAX_SIZE)
    trajectory, state = run_transformation(tx, params, grads[:3])
    legacy = jax.tree.map(
        lambda x: {"leaves": x.leaves, "packed": x.packed} if isinstance(x, rj.PackedTree) else x,
        state,
        is_leaf=lambda x: isinstance(x, rj.PackedTree),
    )
    with rj.checkpoint.open_manager(tmp_path) as manager:
        rj.checkpoint.save(manager, 3, legacy, force=True)
        manager.wait_until_finished()
        restored = rj.checkpoint.restore(manager, tx.init(params))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    resumed, step = trajectory[-1], jax.jit(tx.update)
    for grad in grads[3:]:
        updates, restored = step(grad, restored, resumed)
        resumed = optax.apply_updates(resumed, updates)
    straight, _ = run_transformation(tx, params, grads)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight[-1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_unbuilt_inner_transformation_is_refused_when_wrapping():
    with pytest.raises(TypeError, match=r"`inner` must be an optax.GradientTransformation"):
        rj.pack_small_leaves(rj.rmsprop)


@pytest.mark.parametrize("max_size", [0, -3, 2.5, True, "16"])
def test_bad_max_size_is_rejected_with_its_value(max_size):
    with pytest.raises(ValueError, match=r"max_size.*" + re.escape(repr(max_size))):
        rj.pack_small_leaves(rj.rmsprop(0.01), max_size=max_size)


def error_of(fn, *args):
    """The exception `fn(*args)` raises (the test fails if it raises none)."""
    with pytest.raises((ValueError, TypeError)) as error:
        fn(*args)
    return error.value


SMALL = {"kernel": jnp.ones((12, 10)), "bias": jnp.ones((10,)), "col": jnp.ones((4, 1))}
WRONG_GRADIENTS = {
    "transposed": {**SMALL, "col": jnp.ones((1, 4))},
    "wrong size": {**SMALL, "bias": jnp.ones((11,))},
    "missing leaf": {"kernel": SMALL["kernel"], "bias": SMALL["bias"]},
    "extra leaf": {**SMALL, "gain": jnp.ones(())},
    "renamed leaf": {"kernel": SMALL["kernel"], "bias": SMALL["bias"], "row": SMALL["col"]},
    "None for an array": {**SMALL, "bias": None},
}


@pytest.mark.parametrize("case", WRONG_GRADIENTS)
def test_a_wrong_gradient_gets_the_unpacked_optimizers_error_naming_the_leaf(case, maybe_jit):
    plain, packed = rj.rmsprop(0.01), rj.pack_small_leaves(rj.rmsprop(0.01), max_size=MAX_SIZE)
    grads = WRONG_GRADIENTS[case]
    expected = error_of(plain.update, grads, plain.init(SMALL))
    actual = error_of(maybe_jit(packed.update), grads, packed.init(SMALL))
    assert (type(actual), str(actual)) == (type(expected), str(expected))
    assert "packed" not in str(actual)


def test_a_transposed_gradient_never_reshapes_the_parameter(maybe_jit):
    # Same size, other shape: slicing the packed vector back out would hide it.
    tx = rj.pack_small_leaves(rj.rmsprop(0.01))
    params = {"w": jnp.ones((4, 1))}
    with pytest.raises(
        ValueError,
        match=re.escape("Gradient at ['w'] has shape (1, 4) but the optimizer state was "),
    ):
        maybe_jit(tx.update)({"w": jnp.ones((1, 4))}, tx.init(params), params)


def test_parameters_of_another_shape_are_named(maybe_jit):
    tx = rj.pack_small_leaves(rj.rmsprop(0.01, weight_decay=0.1))
    state = tx.init(SMALL)
    with pytest.raises(ValueError, match=re.escape("Parameter at ['col'] has shape (1, 4)")):
        maybe_jit(tx.update)(SMALL, state, {**SMALL, "col": jnp.ones((1, 4))})


@pytest.mark.parametrize("grad_dtypes", ["float16", "bfloat16", "mixed"])
def test_low_precision_gradients_of_float32_params_give_the_unpacked_updates(
    grad_dtypes, maybe_jit
):
    params, grads = random_problem(SHAPES, 3, seed=7)
    names = sorted(SHAPES)

    def cast(grad):
        if grad_dtypes == "mixed":  # one float16 leaf in the float32 buffer, one bfloat16
            dtypes = dict(zip(names, ["bfloat16", "float16", "float32", "float32"], strict=True))
        else:
            dtypes = dict.fromkeys(names, grad_dtypes)
        return {name: g.astype(dtypes[name]) for name, g in grad.items()}

    settings: dict[str, Any] = dict(momentum=0.9, centered=True, weight_decay=0.01)
    plain_tx = rj.rmsprop(0.01, **settings)
    packed_tx = rj.pack_small_leaves(rj.rmsprop(0.01, **settings), max_size=MAX_SIZE)
    plain_state, packed_state = plain_tx.init(params), packed_tx.init(params)
    for grad in map(cast, grads):
        plain, plain_state = maybe_jit(plain_tx.update)(grad, plain_state, params)
        packed, packed_state = maybe_jit(packed_tx.update)(grad, packed_state, params)
        for name in names:
            assert packed[name].dtype == plain[name].dtype == grad[name].dtype, name
            np.testing.assert_array_equal(
                np.asarray(packed[name], np.float32), np.asarray(plain[name], np.float32)
            )
    assert {k: v.dtype for k, v in packed_state[2].nu.packed.items()} == {"float32": jnp.float32}


@pytest.mark.parametrize(
    ("bad", "dtype"), [(jnp.ones((10,), jnp.int32), "int32"), (jnp.ones((10,), bool), "bool")]
)
def test_an_integer_gradient_is_refused_not_silently_converted_by_packing(bad, dtype, maybe_jit):
    tx = rj.pack_small_leaves(rj.rmsprop(0.01), max_size=MAX_SIZE)
    with pytest.raises(TypeError, match=re.escape(f"Gradient at ['bias'] has dtype {dtype}")):
        maybe_jit(tx.update)({**SMALL, "bias": bad}, tx.init(SMALL))


def test_a_stateless_inner_transformation_packs_by_the_gradients(maybe_jit):
    grads = {"a": jnp.ones((3,), jnp.float16), "b": jnp.full((2, 2), 2.0)}
    tx = rj.pack_small_leaves(optax.scale(-0.5))
    updates, _ = maybe_jit(tx.update)(grads, tx.init(grads))
    assert updates["a"].dtype == jnp.float16 and updates["b"].shape == (2, 2)
    np.testing.assert_array_equal(updates["b"], -np.ones((2, 2)))


def test_state_shardings_and_memory_see_the_packed_state():
    # float32 whatever the default dtype (JAX_ENABLE_X64): the byte count below assumes it.
    params = {
        "w": jnp.ones((64, 64), jnp.float32),
        "b": jnp.ones((64,), jnp.float32),
        "gain": jnp.ones((), jnp.float32),
    }
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


def test_flax_nnx_optimizer_keeps_the_layout_and_the_unpacked_updates():
    if TYPE_CHECKING:
        from flax import nnx
    else:
        nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.small = nnx.Linear(4, 3, rngs=rngs)  # kernel 12, bias 3: packed
            self.large = nnx.Linear(3, 60, rngs=rngs)  # kernel 180: kept; bias 60: kept

        def __call__(self, x):
            return self.large(jnp.tanh(self.small(x)))

    def train(tx):
        model = Model()
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, x):
            grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
            optimizer.update(model, grads)

        for i in range(3):
            step(model, optimizer, jnp.full((2, 4), 0.5 + i))
        return nnx.state(model, nnx.Param), optimizer

    settings: dict[str, Any] = dict(centered=True, momentum=0.9)
    packed_params, optimizer = train(
        rj.pack_small_leaves(rj.rmsprop(0.01, **settings), max_size=MAX_SIZE)
    )
    plain_params, _ = train(rj.rmsprop(0.01, **settings))
    assert max_elementwise_relative_error(packed_params, plain_params) < 1e-6
    nu = nnx.as_pure(optimizer.opt_state)[2].nu
    assert nu.packed["float32"].shape == (15,)
    slots = jax.tree.leaves(nu.layout, is_leaf=lambda x: isinstance(x, grouping.LeafSlot))
    assert sorted(s.shape for s in slots if s.buffer) == [(3,), (4, 3)]


def test_complex_leaves_pack_without_warnings():
    # The first packed gradient element decides a condition XLA cannot fold; a complex one is
    # compared as it is, not cast to a real dtype (which JAX warns about).
    params = {"a": jnp.arange(8, dtype=jnp.complex64) * (1 + 1j), "b": jnp.ones(4, jnp.complex64)}
    tx = rj.pack_small_leaves(rj.rmsprop(0.01))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
    plain, _ = rj.rmsprop(0.01).update(params, rj.rmsprop(0.01).init(params), params)
    for name in params:
        np.testing.assert_array_equal(updates[name], plain[name])


def test_packing_inside_packing_is_refused_by_name():
    tx = rj.pack_small_leaves(rj.pack_small_leaves(rj.rmsprop(1e-3)))
    params = {"b": jnp.zeros(4), "w": jnp.ones((64, 64))}
    with pytest.raises(ValueError, match=r"already packed .* nested inside another"):
        tx.init(params)
