"""A caller's stricter NumPy rules leave every update as it is under JAX's defaults.

`jax_numpy_dtype_promotion="strict"` and `jax_numpy_rank_promotion="raise"` are global
settings some codebases use for their own code. Under them, each public transformation must
still trace, and give bit for bit the parameters and state it gives under the defaults.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import enable_x64

import rmsprop_jax as rj
from rmsprop_jax import compat

FORMATS = ("float32", "bfloat16", "int8", "factored")
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "centered_momentum": {"centered": True, "momentum": 0.9},
    "nesterov_bias_decoupled": {
        "momentum": 0.9,
        "nesterov": True,
        "bias_correction": True,
        "weight_decay": 0.01,
        "decoupled_weight_decay": True,
    },
    "coupled_decay_eps_in_sqrt": {"weight_decay": 0.01, "eps_in_sqrt": True, "maximize": True},
}
TRANSFORMATIONS = {
    **{
        f"rmsprop_{fmt}_{variant}": functools.partial(
            rj.rmsprop, optax.cosine_decay_schedule(1e-3, 10), moment_storage=fmt, **kwargs
        )
        for fmt in FORMATS
        for variant, kwargs in VARIANTS.items()
    },
    "rmsprop_int8_mu_int8": lambda: rj.rmsprop(
        1e-3, centered=True, momentum=0.9, moment_storage="int8", first_moment_storage="int8"
    ),
    "scale_by_rms_factored": lambda: rj.scale_by_rms(moment_storage="factored"),
    "add_decoupled_weight_decay": lambda: rj.add_decoupled_weight_decay(1e-3, 0.01),
    "pack_small_leaves_int8": lambda: rj.pack_small_leaves(
        rj.rmsprop(1e-3, centered=True, momentum=0.9, moment_storage="int8")
    ),
    "inject_hyperparams_factored": lambda: optax.inject_hyperparams(rj.rmsprop)(
        learning_rate=1e-3, momentum=0.9, moment_storage="factored"
    ),
    # Integer hyperparameters (weight_decay=0) become int32 arrays in the injected state.
    "inject_hyperparams_torch": lambda: optax.inject_hyperparams(compat.torch_rmsprop)(
        lr=compat.torch_one_cycle_lr(1e-2, total_steps=10),
        momentum=compat.torch_one_cycle_momentum(total_steps=10),
    ),
    "torch_rmsprop": lambda: compat.torch_rmsprop(
        compat.torch_step_lr(1e-2, 2), momentum=0.9, centered=True, weight_decay=1e-3
    ),
    "keras_rmsprop": lambda: compat.keras_rmsprop(
        1e-3, momentum=0.9, centered=True, use_ema=True, gradient_accumulation_steps=2
    ),
    "tf1_rmsprop": lambda: compat.tf1_rmsprop(1e-3, momentum=0.9, centered=True),
    "example_libraries_rmsprop_momentum": lambda: compat.example_libraries_rmsprop_momentum(1e-3),
    "torch_reduce_lr_on_plateau": lambda: optax.chain(
        rj.rmsprop(1.0, moment_storage="int8"), compat.torch_reduce_lr_on_plateau(1e-3, patience=0)
    ),
}


def params(dtype):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        # Past 2 * 2**15 elements: the factored format's row-wise path.
        "matrix": jax.random.normal(keys[0], (256, 330), dtype),
        "kernel": jax.random.normal(keys[1], (64, 40), dtype),
        "bias": jnp.zeros((40,), dtype),
        "cube": jax.random.normal(keys[2], (4, 5, 6), dtype),
        "scalar": jnp.asarray(0.5, dtype),
    }


def trajectory(make, dtype, steps=3):
    tx = make()
    p = params(dtype)
    state = tx.init(p)

    @jax.jit
    def step(p, state, i):
        grads = jax.tree.map(lambda x: jnp.sin(x * (i + 1)) + 0.1, p)
        # The plateau scheduler reads a loss; the other transformations ignore extra args.
        updates, state = tx.update(grads, state, p, value=jnp.sum(p["kernel"]))
        return optax.apply_updates(p, updates), state

    for i in range(steps):
        p, state = step(p, state, i)
    return p, state


@contextlib.contextmanager
def strict_rules():
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


def assert_bitwise_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.mark.parametrize("name", sorted(TRANSFORMATIONS))
def test_strict_rules_give_the_default_updates(name):
    expected = trajectory(TRANSFORMATIONS[name], jnp.float32)
    with strict_rules():
        actual = trajectory(TRANSFORMATIONS[name], jnp.float32)
    assert_bitwise_equal(actual, expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
@pytest.mark.parametrize(
    "name",
    [f"rmsprop_{fmt}_centered_momentum" for fmt in FORMATS] + ["torch_reduce_lr_on_plateau"],
)
def test_strict_rules_with_other_parameter_dtypes(name, dtype):
    """bfloat16 parameters meet float32 arithmetic; float64 ones (x64) float32 constants."""
    with enable_x64(dtype == "float64"):
        expected = trajectory(TRANSFORMATIONS[name], jnp.dtype(dtype))
        with strict_rules():
            actual = trajectory(TRANSFORMATIONS[name], jnp.dtype(dtype))
    assert_bitwise_equal(actual, expected)


def test_the_callers_rules_hold_around_the_optimizer():
    tx = rj.rmsprop(1e-3, moment_storage="factored", centered=True, momentum=0.9)
    with strict_rules():
        p = params(jnp.float32)
        jax.jit(tx.update)(p, tx.init(p), p)
        # A ValueError in every release (public as jax.dtypes.TypePromotionError in newer ones).
        with pytest.raises(ValueError, match="jax_numpy_dtype_promotion=strict"):
            jnp.zeros(2, jnp.int32) * 0.5
        with pytest.raises(ValueError, match="rank_promotion"):
            jnp.zeros((2, 3)) + jnp.zeros(3)
