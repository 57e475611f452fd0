"""Extreme gradients: every storage format is finite where float32 storage is, non-finite
exactly where it is, and one element's non-finite gradient never reaches another element."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsprop_jax as rj

FORMATS = ["bfloat16", "int8", "factored"]
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "centered": {"centered": True},
    "momentum": {"momentum": 0.9},
    "bias_correction": {"bias_correction": True},
    "centered_momentum": {"centered": True, "momentum": 0.9},
}
EXTREMES = [1e38, -1e38, 1.5e19, 1e-45, 0.0, np.nan, np.inf, -np.inf]
SHAPES = {"matrix": (128, 256), "small": (8,), "stack": (2, 128, 128)}


def _gradients(seed: int, bad_value: float | None) -> list[dict[str, np.ndarray]]:
    """Three steps of normal gradients; the second holds `bad_value` at a few entries (or, for
    None, a random extreme from EXTREMES at each of many entries)."""
    rng = np.random.default_rng(seed)
    steps = [
        {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(3)
    ]
    for name, grad in steps[1].items():
        flat = grad.reshape(-1)
        where = rng.choice(flat.size, size=max(1, flat.size // 500), replace=False)
        if bad_value is None:
            flat[where] = rng.choice(np.asarray(EXTREMES, np.float32), size=where.size)
        else:
            flat[where] = bad_value
        steps[1][name] = flat.reshape(grad.shape)
    return steps


def _updates(
    moment_storage: str, variant: str, grads: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    tx = rj.rmsprop(0.1, moment_storage=moment_storage, **VARIANTS[variant])
    params = {k: jnp.ones(s) for k, s in SHAPES.items()}
    state, update, out = tx.init(params), jax.jit(tx.update), []
    for g in grads:
        updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
        out.append(jax.tree.map(np.asarray, updates))
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("moment_storage", FORMATS)
def test_finite_exactly_where_float32_storage_is_finite(moment_storage, variant, seed):
    grads = _gradients(seed, None)
    reference = _updates("float32", variant, grads)
    actual = _updates(moment_storage, variant, grads)
    for step in range(3):
        for name in SHAPES:
            ours = np.isfinite(actual[step][name])
            theirs = np.isfinite(reference[step][name])
            # Finite wherever float32 is; the extreme step is non-finite exactly where float32's
            # is, and so are later steps except for factored statistics, which cannot remember
            # one element's non-finite value (their own average is not stored).
            assert np.all(ours[theirs]), (step, name)
            if step == 1 or moment_storage != "factored":
                np.testing.assert_array_equal(ours, theirs, err_msg=f"step {step} {name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("moment_storage", ["float32", *FORMATS])
def test_a_non_finite_gradient_never_reaches_other_elements(moment_storage, variant):
    runs = {bad: _updates(moment_storage, variant, _gradients(2, bad)) for bad in EXTREMES[5:]}
    healthy = np.isfinite(_gradients(2, np.nan)[1]["matrix"])
    first = runs[np.nan]
    for bad, run in runs.items():
        for step in range(3):
            for name in SHAPES:
                mask = np.isfinite(_gradients(2, np.nan)[1][name])
                assert not np.all(np.isfinite(run[1][name][~mask])) or mask.all()
                np.testing.assert_array_equal(
                    run[step][name][mask], first[step][name][mask], err_msg=f"{bad} {step}"
                )
                assert np.all(np.isfinite(run[step][name][mask]))
    assert healthy.sum() < healthy.size


@pytest.mark.parametrize("moment_storage", FORMATS)
def test_squared_gradient_overflow_gives_the_float32_update(moment_storage):
    """g = 1e38: g**2 overflows, nu = inf, the update is 0 (float32) and stays finite after."""
    params = {"matrix": jnp.ones((128, 256))}
    grads = [np.ones((128, 256), np.float32) for _ in range(3)]
    grads[0][5, 7] = 1e38
    tx = rj.rmsprop(0.1, moment_storage=moment_storage)
    state = tx.init(params)
    for step, g in enumerate(grads):
        updates, state = jax.jit(tx.update)({"matrix": jnp.asarray(g)}, state, params)
        u = np.asarray(updates["matrix"])
        assert np.all(np.isfinite(u)), step
        if step == 0:
            assert u[5, 7] == 0
            # Factored statistics count the overflowed entry as 0: its row and column move a
            # little (1/256 and 1/128), never to NaN. The step divides by the stored average:
            # bfloat16 rounds 0.1 to a neighbour at most 2**-7 away (2**-8 in the root); int8
            # stores a block of equal values exactly (the top code).
            rtol = {"factored": 1e-2, "bfloat16": 2**-8}.get(moment_storage, 1e-6)
            others = np.delete(u.reshape(-1), 5 * 256 + 7)
            np.testing.assert_allclose(others, -0.1 / np.sqrt(0.1), rtol=rtol)
