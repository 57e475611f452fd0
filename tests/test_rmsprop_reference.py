"""Every combination of the knobs of `rj.rmsprop` against the float64 NumPy reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import max_elementwise_relative_error, random_problem, run_transformation
from reference import Config, reference_trajectory

import rmsprop_jax as rj

STEPS = 50
SHAPES = {"matrix": (4, 3), "vector": (5,), "scalar": ()}


def exponential_schedule(count):
    return 0.01 * 0.97**count


def all_configs():
    for eps_in_sqrt, (centered, bias_correction), (momentum, nesterov), (
        weight_decay,
        decoupled,
    ), maximize, initial_scale in itertools.product(
        (False, True),
        ((False, False), (True, False), (False, True)),
        ((None, False), (0.9, False), (0.9, True)),
        ((0.0, False), (0.05, False), (0.05, True)),
        (False, True),
        (0.0, 0.5),
    ):
        yield Config(
            learning_rate=exponential_schedule,
            eps_in_sqrt=eps_in_sqrt,
            initial_scale=initial_scale,
            centered=centered,
            momentum=momentum,
            nesterov=nesterov,
            bias_correction=bias_correction,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled,
            maximize=maximize,
        )


CONFIGS = list(all_configs())


def config_id(config: Config) -> str:
    parts = [
        "sqrt" if config.eps_in_sqrt else "add",
        "centered" if config.centered else "",
        "debiased" if config.bias_correction else "",
        "" if config.momentum is None else ("nesterov" if config.nesterov else "momentum"),
        ("decoupled" if config.decoupled_weight_decay else "l2") if config.weight_decay else "",
        "max" if config.maximize else "",
        f"nu0={config.initial_scale}" if config.initial_scale else "",
    ]
    return "-".join(part for part in parts if part)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_rmsprop_matches_float64_reference_for_every_knob_combination(config, maybe_jit):
    params, grads = random_problem(SHAPES, STEPS, seed=len(config_id(config)))
    trajectory, _ = run_transformation(rj.rmsprop(**config.as_kwargs()), params, grads, maybe_jit)
    expected, _ = reference_trajectory(params, grads, config)
    for step in (0, STEPS // 2, STEPS - 1):
        assert max_elementwise_relative_error(trajectory[step], expected[step]) < 2e-5, step


def test_weight_decay_mask_exempts_masked_leaves_from_both_kinds_of_decay():
    params, grads = random_problem({"kernel": (3, 3), "bias": (3,)}, STEPS, seed=3)
    mask = {"kernel": True, "bias": False}
    for decoupled in (False, True):
        config = Config(weight_decay=0.1, decoupled_weight_decay=decoupled, momentum=0.5)
        tx = rj.rmsprop(**config.as_kwargs(), weight_decay_mask=mask)
        trajectory, _ = run_transformation(tx, params, grads)
        expected, _ = reference_trajectory(params, grads, config, mask=mask)
        assert max_elementwise_relative_error(trajectory[-1], expected[-1]) < 2e-5
        unmasked, _ = reference_trajectory(params, grads, config)
        assert not np.allclose(expected[-1]["bias"], unmasked[-1]["bias"])


def test_weight_decay_mask_accepts_a_function_of_the_params():
    params, grads = random_problem({"kernel": (3, 3), "bias": (3,)}, 10, seed=4)
    mask = {"kernel": True, "bias": False}
    config = Config(weight_decay=0.1, decoupled_weight_decay=True)
    tx = rj.rmsprop(
        **config.as_kwargs(),
        weight_decay_mask=lambda tree: {name: name == "kernel" for name in tree},
    )
    trajectory, _ = run_transformation(tx, params, grads)
    expected, _ = reference_trajectory(params, grads, config, mask=mask)
    assert max_elementwise_relative_error(trajectory[-1], expected[-1]) < 2e-5


@pytest.mark.parametrize("decay", [0.999, 0.99999, 0.999999, 0.9999999, 0.99999999])
def test_bias_correction_matches_float64_reference_for_decays_near_one(decay, maybe_jit):
    """1 - decay**t was computed from `decay` rounded to float32 while the average adds
    (1 - decay) g² exactly: 0.66% off at 0.999999, 9% at 0.9999999, and (rounded to 1, the
    correction 0) updates of 0 at 0.99999999. optax.rmsprop computes it that way."""
    config = Config(decay=decay, bias_correction=True, eps=1e-12, momentum=0.5)
    params, grads = random_problem(SHAPES, 20, seed=5)
    trajectory, _ = run_transformation(rj.rmsprop(**config.as_kwargs()), params, grads, maybe_jit)
    expected, _ = reference_trajectory(params, grads, config)
    for step in (0, 9, 19):
        assert max_elementwise_relative_error(trajectory[step], expected[step]) < 2e-5, step
