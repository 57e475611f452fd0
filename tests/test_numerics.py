"""The numerics rules (README, Numerics): float32 math, no 0/0, no NaN, dtypes preserved."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import enable_x64, max_elementwise_relative_error, run_transformation
from reference import Config, reference_trajectory

import rmsprop_jax as rj

VARIANTS = [
    dict(
        eps_in_sqrt=eps_in_sqrt,
        centered=centered,
        bias_correction=bias_correction,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled,
    )
    for eps_in_sqrt, (centered, bias_correction), (momentum, nesterov), (
        weight_decay,
        decoupled,
    ) in itertools.product(
        (False, True),
        ((False, False), (True, False), (False, True)),
        ((None, False), (0.9, False), (0.9, True)),
        ((0.0, False), (0.1, False), (0.1, True)),
    )
]


def variant_id(variant: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in variant.items() if v not in (False, None, 0.0))


def scan_updates(tx, params, grad, steps):
    """The updates of `steps` jitted steps with a constant gradient (params held fixed)."""

    @jax.jit
    def run(params, state):
        def body(state, _):
            updates, state = tx.update(grad, state, params)
            return state, updates

        return jax.lax.scan(body, state, None, length=steps)

    return run(params, tx.init(params))


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_zero_gradient_since_init_gives_exactly_zero_update_even_with_eps_zero(variant, maybe_jit):
    params = {"still": jnp.zeros((3, 2)), "moving": jnp.ones(4)}
    tx = rj.rmsprop(0.1, eps=0.0, **variant)
    state = tx.init(params)
    update = maybe_jit(tx.update)
    for step in range(3):
        grads = {"still": jnp.zeros((3, 2)), "moving": jnp.full(4, float(step + 1))}
        updates, state = update(grads, state, params)
        np.testing.assert_array_equal(updates["still"], 0.0)
        assert np.all(np.isfinite(updates["moving"]))


def test_centered_with_constant_gradient_of_ten_stays_finite_for_1000_float32_steps():
    params = {"w": jnp.ones((8,), jnp.float32)}
    for momentum in (None, 0.9):
        tx = rj.rmsprop(0.01, centered=True, momentum=momentum)
        state, updates = scan_updates(tx, params, {"w": jnp.full((8,), 10.0)}, 1000)
        assert np.all(np.isfinite(updates["w"]))
        assert np.all(np.isfinite(optax.tree.get(state, "nu")["w"]))


def test_centered_variance_never_negative_when_rounding_puts_nu_below_mu_squared():
    """Rounding can leave nu a hair below mu**2; the clamp turns sqrt(negative) into 0, not NaN."""
    eps = 1e-8
    tx = rj.scale_by_rms(centered=True, eps=eps)
    nu = np.nextafter(np.float32(100.0), np.float32(0.0), dtype=np.float32)
    state = rj.ScaleByCenteredRmsState(
        count=jnp.asarray(7, jnp.int32),
        mu={"w": jnp.full((4,), 10.0)},
        nu={"w": jnp.full((4,), nu)},
    )
    updates, state = jax.jit(tx.update)({"w": jnp.full((4,), 10.0)}, state)
    assert float(state.nu["w"][0]) < float(state.mu["w"][0]) ** 2
    np.testing.assert_allclose(updates["w"], 10.0 / eps, rtol=1e-6)


def test_float16_gradients_of_magnitude_1000_give_finite_updates_and_float32_moments():
    params = {"w": jnp.ones((4,), jnp.float16)}
    grad = {"w": jnp.full((4,), 1000.0, jnp.float16)}
    for centered in (False, True):
        tx = rj.rmsprop(0.01, centered=centered, momentum=0.9)
        state, updates = scan_updates(tx, params, grad, 20)
        assert updates["w"].dtype == jnp.float16
        assert np.all(np.isfinite(np.asarray(updates["w"], np.float32)))
        assert optax.tree.get(state, "nu")["w"].dtype == jnp.float32
        # g**2 = 1e6 is inf in float16. In float32 the first step is lr * g / sqrt(0.1 g**2)
        # uncentered and lr * g / sqrt((0.1 - 0.01) g**2) centered.
        first = np.asarray(updates["w"][0], np.float32)[0]
        expected = -0.01 / np.sqrt(0.09 if centered else 0.1)
        np.testing.assert_allclose(first, expected, rtol=2e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_get_float32_state_and_updates_in_their_own_dtype(dtype):
    params = {"w": jnp.ones((3,), dtype)}
    tx = rj.rmsprop(
        1e-3, centered=True, momentum=0.9, weight_decay=0.1, decoupled_weight_decay=True
    )
    state = tx.init(params)
    updates, state = jax.jit(tx.update)({"w": jnp.full((3,), 0.25, dtype)}, state, params)
    assert updates["w"].dtype == dtype
    for leaf in jax.tree.leaves(state):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype


def test_low_precision_updates_are_the_float32_result_rounded_once():
    grads = [{"w": np.linspace(-2, 2, 7).astype(np.float32) * (k + 1)} for k in range(5)]
    params = {"w": np.zeros(7, np.float32)}
    config = Config(learning_rate=1e-3, momentum=0.9)
    tx = rj.rmsprop(**config.as_kwargs())
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), (params, grads))
    state = tx.init(bf16[0])
    _, expected_updates = reference_trajectory(
        params, [jax.tree.map(lambda x: np.asarray(x, np.float64), g) for g in bf16[1]], config
    )
    for grad, expected in zip(bf16[1], expected_updates, strict=True):
        updates, state = tx.update(grad, state, bf16[0])
        np.testing.assert_array_equal(
            np.asarray(updates["w"], np.float32),
            np.asarray(jnp.asarray(expected["w"].astype(np.float32), jnp.bfloat16), np.float32),
        )


def test_float64_params_keep_float64_moments_when_x64_is_enabled():
    with enable_x64(True):
        params = {"w": jnp.ones((3,), jnp.float64)}
        tx = rj.rmsprop(0.1, centered=True, momentum=0.5)
        state = tx.init(params)
        grad = {"w": jnp.asarray([1e-3, 1.0, 1e3], jnp.float64)}
        updates, state = jax.jit(tx.update)(grad, state, params)
        assert updates["w"].dtype == jnp.float64
        assert optax.tree.get(state, "nu")["w"].dtype == jnp.float64
        assert optax.tree.get(state, "mu")["w"].dtype == jnp.float64
        _, expected = reference_trajectory(
            {"w": np.ones(3)},
            [{"w": np.asarray(grad["w"])}],
            Config(0.1, centered=True, momentum=0.5),
        )
        np.testing.assert_allclose(updates["w"], expected[0]["w"], rtol=1e-12)


@pytest.mark.parametrize("moment_storage", ["float32", "bfloat16", "int8", "factored"])
def test_a_gradient_computed_from_captured_constants_updates_as_eagerly(moment_storage):
    # XLA in JAX 0.5.3 to 0.7.2 folded such a gradient (transposed by the matrix product's
    # derivative) into the per-leaf calls in the wrong layout: every update came out wrong.
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(0.1 * rng.normal(size=(8, 8)), jnp.float32)}
    inputs = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    tx = rj.rmsprop(0.1, moment_storage=moment_storage, centered=True, momentum=0.9)

    def step():
        grads = jax.grad(lambda p: jnp.mean(jnp.tanh(inputs @ p["w"]) ** 2))(params)
        return tx.update(grads, tx.init(params), params)[0]["w"]

    np.testing.assert_allclose(jax.jit(step)(), step(), rtol=1e-5, atol=1e-7)


def _updates_of_three_steps(moment_storage, options, dtype):
    # 512 x 256: large enough to be updated in row chunks where a JAX release needs them.
    params = {"w": jnp.ones((512, 256), dtype), "b": jnp.zeros(4, dtype)}
    rng = np.random.default_rng(0)
    tx = rj.rmsprop(1e-3, moment_storage=moment_storage, **options)
    state, step, trajectory = tx.init(params), jax.jit(tx.update), []
    for _ in range(3):
        grads = {k: jnp.asarray(rng.normal(size=v.shape), dtype) for k, v in params.items()}
        updates, state = step(grads, state, params)
        trajectory.append(jax.tree.map(np.asarray, updates))
    return trajectory


@pytest.mark.parametrize("options", [{}, {"centered": True, "momentum": 0.9}], ids=["plain", "c+m"])
@pytest.mark.parametrize("moment_storage", ["float32", "bfloat16", "int8", "factored"])
def test_every_storage_format_runs_with_x64_enabled(moment_storage, options):
    # With jax_enable_x64 a Python int index becomes an int64: the rounding seeds' lookup
    # mixed it with int32 ones, and every rounding format failed.
    default = _updates_of_three_steps(moment_storage, options, jnp.float32)
    with enable_x64(True):
        same = _updates_of_three_steps(moment_storage, options, jnp.float32)
        wide = _updates_of_three_steps(moment_storage, options, jnp.float64)
    for ours, theirs in zip(same, default, strict=True):
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name])
    # float64 parameters: float64 updates, as float32 ones up to the stored format's rounding
    # (bfloat16 may round one element the other way).
    for ours, theirs in zip(wide, default, strict=True):
        for name in ours:
            assert ours[name].dtype == np.float64
            scale = np.max(np.abs(theirs[name])) or 1.0
            assert np.max(np.abs(ours[name] - theirs[name])) / scale < 1e-2


@pytest.mark.parametrize("options", [{}, {"centered": True, "momentum": 0.9}], ids=["plain", "c+m"])
@pytest.mark.parametrize("moment_storage", ["float32", "bfloat16", "int8", "factored"])
def test_float64_hyperparameter_arrays_keep_the_state_in_its_dtypes(moment_storage, options):
    """With x64, a swept float64 `decay` (or rate, or momentum) widened the float32 averages
    it multiplies: the state changed dtype after one step, which a `lax.scan` carry refuses."""
    params = {"w": jnp.ones((128, 256), jnp.float32), "b": jnp.ones(8, jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p + jnp.arange(p.shape[-1])), params)

    def final_state(decay, learning_rate, momentum):
        tx = rj.rmsprop(
            learning_rate,
            decay,
            moment_storage=moment_storage,
            **{**options, **({"momentum": momentum} if "momentum" in options else {})},
        )

        def step(carry, _):
            current, state = carry
            updates, state = tx.update(grads, state, current)
            return (optax.apply_updates(current, updates), state), None

        return jax.lax.scan(step, (params, tx.init(params)), length=3)[0]

    narrow = jax.jit(final_state)(0.9, 0.01, 0.9)
    with enable_x64(True):
        wide = [jnp.asarray(value, jnp.float64) for value in (0.9, 0.01, 0.9)]
        kept = jax.jit(final_state)(*wide)
        swept = jax.jit(jax.vmap(final_state))(*(jnp.stack([w, w]) for w in wide))
    assert jax.tree.map(lambda x: x.dtype, kept) == jax.tree.map(lambda x: x.dtype, narrow)
    assert jax.tree.map(lambda x: x.dtype, swept) == jax.tree.map(lambda x: x.dtype, narrow)
    # A float64 hyperparameter rounds a little differently: a stored code may move one level.
    for ours, theirs in zip(jax.tree.leaves(kept[0]), jax.tree.leaves(narrow[0]), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-3)


@pytest.mark.parametrize("centered", [False, True])
def test_complex_parameters_use_the_squared_magnitude_and_a_real_nu(centered, maybe_jit):
    rng = np.random.default_rng(0)
    shape = (3, 2)
    params = {"z": (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)}
    grads = [
        {"z": (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)}
        for _ in range(30)
    ]
    config = Config(centered=centered, momentum=0.9, weight_decay=0.01)
    trajectory, state = run_transformation(
        rj.rmsprop(**config.as_kwargs()), params, grads, maybe_jit
    )
    expected, _ = reference_trajectory(params, grads, config)
    assert optax.tree.get(state, "nu")["z"].dtype == jnp.float32
    assert trajectory[-1]["z"].dtype == jnp.complex64
    assert max_elementwise_relative_error(trajectory[-1], expected[-1]) < 2e-5


def test_none_leaves_empty_arrays_and_scalars_pass_through(maybe_jit):
    params = {"none": None, "empty": jnp.zeros((0, 3)), "scalar": jnp.asarray(2.0)}
    grads = {"none": None, "empty": jnp.zeros((0, 3)), "scalar": jnp.asarray(0.5)}
    tx = rj.rmsprop(0.1, centered=True, momentum=0.9, weight_decay=0.1, decoupled_weight_decay=True)
    state = tx.init(params)
    updates, state = maybe_jit(tx.update)(grads, state, params)
    assert updates["none"] is None
    assert updates["empty"].shape == (0, 3)
    assert updates["scalar"].shape == ()
    _, expected = reference_trajectory(
        {"scalar": np.asarray(2.0)},
        [{"scalar": np.asarray(0.5)}],
        Config(0.1, centered=True, momentum=0.9, weight_decay=0.1, decoupled_weight_decay=True),
    )
    np.testing.assert_allclose(updates["scalar"], expected[0]["scalar"], rtol=1e-6)


@pytest.mark.parametrize(
    "variant", [dict(), dict(centered=True), dict(eps=0.0), dict(momentum=0.9)]
)
def test_a_nan_gradient_gives_a_nan_update_rather_than_silently_freezing(variant):
    """Non-finite gradients must stay visible (to optax.apply_if_finite, to the user)."""
    params = {"w": jnp.ones(3)}
    tx = rj.rmsprop(0.1, **variant)
    updates, _ = tx.update({"w": jnp.asarray([1.0, jnp.nan, jnp.inf])}, tx.init(params), params)
    assert np.isfinite(updates["w"][0])
    assert not np.any(np.isfinite(updates["w"][1:]))
