"""Property tests: random shapes, dtypes and hyperparameters against the float64 reference."""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from helpers import enable_x64
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from reference import Config, reference_trajectory

import rmsprop_jax as rj

# Relative tolerance of one update against the float64 reference: the float32 arithmetic, then
# one rounding to the parameter dtype.
TOLERANCE = {"float32": 2e-5, "float64": 1e-10, "bfloat16": 1e-2, "float16": 2e-3}

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def configs(draw: st.DrawFn) -> Config:
    centered = draw(st.booleans())
    bias_correction = not centered and draw(st.booleans())
    # Centered RMSprop divides by a variance; with a decay near 0 it is a difference of nearly
    # equal numbers (exactly 0 for decay 0), where any arithmetic loses every digit.
    decay = draw(st.floats(0.5 if centered else 0.0, 0.999 if bias_correction else 1.0))
    momentum = draw(st.none() | st.floats(0.0, 0.99))
    return Config(
        learning_rate=draw(st.floats(0.0, 1.0)),
        decay=decay,
        eps=draw(st.sampled_from([0.0, 1e-8, 1e-6, 1e-3])),
        eps_in_sqrt=draw(st.booleans()),
        initial_scale=draw(st.sampled_from([0.0, 0.1, 1.0])),
        centered=centered,
        momentum=momentum,
        nesterov=momentum is not None and draw(st.booleans()),
        bias_correction=bias_correction,
        weight_decay=draw(st.sampled_from([0.0, 1e-2, 0.5])),
        decoupled_weight_decay=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


def _float16_scalar(steps: int, **config: Any) -> Any:
    """An example of one float16 scalar leaf, seed 0, with `config` (else Config's defaults)."""
    return example(config=Config(**config), leaf_shapes=[()], dtype="float16", seed=0, steps=steps)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=configs(),
    leaf_shapes=st.lists(shapes, min_size=1, max_size=3),
    dtype=st.sampled_from(["float32", "bfloat16", "float16", "float64"]),
    seed=st.integers(0, 2**16),
    steps=st.integers(1, 4),
)
@_float16_scalar(  # An update in float16's subnormal range (found by a search).
    2, learning_rate=5.960464477539063e-08, decay=0.5, eps=0.0, centered=True
)
@_float16_scalar(  # An exact update of 1.3e7, beyond float16's range (found by a search).
    1, learning_rate=1.0, decay=1.0, eps=1e-08, centered=True, momentum=0.0
)
def test_updates_match_the_float64_reference_for_random_shapes_dtypes_and_hyperparameters(
    config, leaf_shapes, dtype, seed, steps
):
    rng = np.random.default_rng(seed)
    x64 = enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
    with x64:
        names = [f"leaf{i}" for i in range(len(leaf_shapes))]
        params = {
            n: jnp.asarray(rng.normal(size=s), dtype)
            for n, s in zip(names, leaf_shapes, strict=True)
        }
        grads = [
            {
                n: jnp.asarray(rng.normal(size=s), dtype)
                for n, s in zip(names, leaf_shapes, strict=True)
            }
            for _ in range(steps)
        ]
        tx = rj.rmsprop(**config.as_kwargs())
        state = tx.init(params)
        update = jax.jit(tx.update)
        actual = []
        for grad in grads:
            updates, state = update(grad, state, params)
            actual.append(updates)
        as64 = lambda tree: {n: np.asarray(v, np.float64) for n, v in tree.items()}  # noqa: E731
        # The reference sees the same (rounded) inputs, and params held fixed as here.
        _, expected = reference_trajectory(
            as64(params), [as64(g) for g in grads], config, hold_params=True
        )
    for step_updates, step_expected in zip(actual, expected, strict=True):
        for name in names:
            value = np.asarray(step_updates[name], np.float64).reshape(-1)
            assert step_updates[name].dtype == jnp.dtype(dtype)
            reference = np.asarray(step_expected[name]).reshape(-1)
            # An exact update beyond the dtype's range (a decay of 1 keeps nu at 0, and g / eps
            # exceeds float16's 65504) rounds to an infinity of its sign; every other is finite.
            within = np.abs(reference) * (1 + TOLERANCE[dtype]) <= float(jnp.finfo(dtype).max)
            assert not np.any(np.isnan(value))
            assert np.all(np.sign(value[~within]) == np.sign(reference[~within]))
            assert np.all(np.isfinite(value[within]))
            value, reference = value[within], reference[within]
            scale = np.max(np.abs(reference), initial=0.0)
            # Below the dtype's normal range an update is a multiple of its smallest
            # subnormal (5.96e-8 in float16), whatever the relative tolerance; subnormal
            # results may also be flushed to 0 (1e-30).
            quantum = max(float(jnp.finfo(dtype).smallest_subnormal), 1e-30)
            np.testing.assert_allclose(
                value, reference, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale + quantum
            )
