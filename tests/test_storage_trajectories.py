"""Trajectories with compressed moving averages track float32 RMSprop, variant by variant."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import is_compressed, stored_leaf

import rmsprop_jax as rj

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "eps_in_sqrt": {"eps_in_sqrt": True},
    "initial_scale": {"initial_scale": 1.0},
    "centered": {"centered": True},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "bias_correction": {"bias_correction": True},
    "weight_decay": {"weight_decay": 0.1},
    "decoupled_weight_decay": {"weight_decay": 0.1, "decoupled_weight_decay": True},
}
STEPS = 20
LEARNING_RATE = 3e-3


def _general_quadratic(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """0.5 * sum(a * p**2) with curvatures a in [0.1, 10], started in [1, 2], far from 0."""
    rng = np.random.default_rng(seed)
    shapes = {"matrix": (128, 256), "vector": (256,)}
    curvature = {k: np.exp(rng.uniform(np.log(0.1), np.log(10), s)) for k, s in shapes.items()}
    start = {k: rng.uniform(1, 2, s) for k, s in shapes.items()}
    return curvature, start


def _rank_one_quadratic(
    seed: int, variant: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Curvature r c^T and a uniform start: in exact arithmetic every squared gradient is then
    rank one, and so is their average, which the factored estimator reproduces exactly.

    The coupled weight decay adds `weight_decay * p` to the gradient, so it is taken out of
    the curvature; an initial scale adds a constant matrix to the average, which stays rank
    one only if the curvature is constant too.
    """
    rng = np.random.default_rng(seed)
    rows, cols = rng.uniform(0.3, 3, (128, 1)), rng.uniform(0.3, 3, (1, 256))
    if variant.get("initial_scale"):
        rows, cols = np.full_like(rows, 2.0), np.full_like(cols, 0.7)
    matrix = rows * cols
    if not variant.get("decoupled_weight_decay"):
        matrix = matrix - variant.get("weight_decay", 0.0)
    curvature = {"matrix": matrix, "vector": rng.uniform(0.1, 10, 256)}
    return curvature, {k: np.ones(v.shape) for k, v in curvature.items()}


def _trajectory(moment_storage, variant, curvature, start, transform_fn, **options):
    curvature = {k: jnp.asarray(v, jnp.float32) for k, v in curvature.items()}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in start.items()}
    tx = rj.rmsprop(LEARNING_RATE, moment_storage=moment_storage, **variant, **options)

    def step(params, state):
        grads = jax.tree.map(lambda a, p: a * p, curvature, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = transform_fn(step)
    state, trajectory = tx.init(params), []
    for _ in range(STEPS):
        params, state = step(params, state)
        trajectory.append({k: np.asarray(v, np.float64) for k, v in params.items()})
    return trajectory


def _deviation(
    trajectory: list[dict[str, np.ndarray]],
    reference: list[dict[str, np.ndarray]],
    start: dict[str, np.ndarray],
) -> float:
    """Largest distance from the float32 trajectory, as a fraction of the float32 travel."""
    travel = max(np.max(np.abs(reference[-1][k] - start[k])) for k in start)
    return (
        max(
            np.max(np.abs(a[k] - b[k]))
            for a, b in zip(trajectory, reference, strict=True)
            for k in a
        )
        / travel
    )


# bfloat16 rounds each stored average by < 0.4%; int8 by < one code step (12.5%) of nu, a
# spread of about 3.6% in nu and so 1.8% in each step's sqrt(nu), which partly averages out
# over the steps. With centering, int8's signed 7-bit code of mu enters through g - mu, a small
# difference for these noiseless gradients.
TOLERANCE = {"bfloat16": 0.02, "int8": 0.12}
CENTERED_TOLERANCE = {"bfloat16": 0.03, "int8": 0.25}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("moment_storage", ["bfloat16", "int8"])
def test_quantized_storage_tracks_float32_on_a_quadratic(moment_storage, variant, maybe_jit):
    curvature, start = _general_quadratic(seed=list(VARIANTS).index(variant))
    options = VARIANTS[variant]
    reference = _trajectory("float32", options, curvature, start, maybe_jit)
    trajectory = _trajectory(moment_storage, options, curvature, start, maybe_jit)
    tolerance = (CENTERED_TOLERANCE if options.get("centered") else TOLERANCE)[moment_storage]
    deviation = _deviation(trajectory, reference, start)
    assert 0 < deviation < tolerance


@pytest.mark.parametrize(
    ("moment_storage", "first_moment_storage"),
    [
        ("bfloat16", "int8"),
        ("bfloat16", "float32"),
        ("int8", "int8"),
        ("int8", "float32"),
    ],
)
def test_every_first_moment_storage_tracks_float32_centered_with_momentum(
    moment_storage, first_moment_storage, maybe_jit
):
    """μ in another format than ν: the trajectory stays within the tolerance of the coarser
    of the two formats."""
    curvature, start = _general_quadratic(seed=7)
    options = {"centered": True, "momentum": 0.9}
    reference = _trajectory("float32", options, curvature, start, maybe_jit)
    trajectory = _trajectory(
        moment_storage,
        options,
        curvature,
        start,
        maybe_jit,
        first_moment_storage=first_moment_storage,
    )
    coarsest = max(
        (moment_storage, first_moment_storage),
        key=["float32", "bfloat16", "int8"].index,
    )
    assert 0 < _deviation(trajectory, reference, start) < CENTERED_TOLERANCE[coarsest]


def test_int8_first_moment_storage_keeps_the_8_bit_mu_of_earlier_versions(maybe_jit):
    """`first_moment_storage="int8"` keeps the int8 state of release 0.1.0 (μ as signed codes
    beside the variance's): its trajectory tracks float32's within int8's tolerance, and is
    not the default's (μ in bfloat16)."""
    curvature, start = _general_quadratic(seed=8)
    options: dict[str, Any] = {"centered": True, "momentum": 0.9}
    tx = rj.rmsprop(LEARNING_RATE, moment_storage="int8", first_moment_storage="int8", **options)
    state = tx.init({k: jnp.asarray(v, jnp.float32) for k, v in start.items()})
    preconditioner = state[2]
    assert isinstance(preconditioner.mu, rj.QuantizedMoment)
    assert stored_leaf(preconditioner.mu, "matrix").codes.dtype == jnp.int8
    default = _trajectory("int8", options, curvature, start, maybe_jit)
    eight_bit = _trajectory(
        "int8", options, curvature, start, maybe_jit, first_moment_storage="int8"
    )
    reference = _trajectory("float32", options, curvature, start, maybe_jit)
    assert 0 < _deviation(eight_bit, reference, start) < CENTERED_TOLERANCE["int8"]
    assert _deviation(eight_bit, default, start) > 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_factored_storage_equals_float32_when_squared_gradients_are_rank_one(variant, maybe_jit):
    options = VARIANTS[variant]
    curvature, start = _rank_one_quadratic(seed=list(VARIANTS).index(variant), variant=options)
    reference = _trajectory("float32", options, curvature, start, maybe_jit)
    trajectory = _trajectory("factored", options, curvature, start, maybe_jit)
    # Centered keeps mu in bfloat16 (stochastically rounded); otherwise only float32 rounding.
    tolerance = 0.02 if options.get("centered") else 1e-4
    assert _deviation(trajectory, reference, start) < tolerance


def _factored_reference(grads, *, decay, eps, eps_in_sqrt, initial_scale, bias_correction):
    """Adafactor's estimator in the RMSprop preconditioner, float64, one matrix at a time."""
    shape = grads[0].shape
    row, col = np.full(shape[:-1], initial_scale), np.full(shape[:-2] + shape[-1:], initial_scale)
    updates = []
    for step, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        row = decay * row + (1 - decay) * np.mean(g**2, axis=-1)
        col = decay * col + (1 - decay) * np.mean(g**2, axis=-2)
        row_mean = np.mean(row, axis=-1, keepdims=True)
        nu = np.divide(row, row_mean, out=np.zeros_like(row), where=row_mean > 0)
        nu = nu[..., :, None] * col[..., None, :]
        if bias_correction:
            nu = nu / (1 - decay**step)
        denominator = np.sqrt(nu + eps) if eps_in_sqrt else np.sqrt(nu) + eps
        updates.append(np.divide(g, denominator, out=np.zeros_like(g), where=denominator > 0))
    return updates


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"eps": 0.0},
        {"eps_in_sqrt": True, "eps": 1e-3},
        {"initial_scale": 0.5},
        {"bias_correction": True, "decay": 0.99},
    ],
    ids=["plain", "eps_0", "eps_in_sqrt", "initial_scale", "bias_correction"],
)
def test_factored_preconditioner_matches_a_float64_reference(options, maybe_jit):
    rng = np.random.default_rng(5)
    shapes = {"matrix": (128, 192), "stacked": (2, 128, 128)}
    grads = [
        {k: (rng.normal(size=s) * rng.uniform(0.01, 100, (*s[:-1], 1))) for k, s in shapes.items()}
        for _ in range(6)
    ]
    grads[2]["matrix"][:, :5] = 0.0
    settings: dict[str, Any] = {
        "decay": 0.9,
        "eps": 1e-8,
        "eps_in_sqrt": False,
        "initial_scale": 0.0,
    }
    settings.update({"bias_correction": False}, **options)
    tx = rj.scale_by_rms(**settings, moment_storage="factored")
    update = maybe_jit(tx.update)
    state = tx.init({k: jnp.zeros(s) for k, s in shapes.items()})
    assert isinstance(state.nu, rj.FactoredMoment)
    for name in shapes:
        assert is_compressed(stored_leaf(state.nu, name))
    actual = []
    for g in grads:
        updates, state = update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state)
        actual.append(updates)
    for name in shapes:
        expected = _factored_reference([g[name] for g in grads], **settings)
        for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
            np.testing.assert_allclose(a[name], e, rtol=2e-5, atol=1e-6, err_msg=f"step {step}")
