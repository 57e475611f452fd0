"""`rj.rmsprop` equals `optax.rmsprop` wherever optax can express the configuration."""

from __future__ import annotations

import itertools

import numpy as np
import optax
import pytest
from helpers import random_problem, run_transformation

import rmsprop_jax as rj

CASES = [
    dict(
        eps_in_sqrt=eps_in_sqrt,
        centered=centered,
        momentum=momentum,
        nesterov=nesterov,
        bias_correction=bias_correction,
        initial_scale=initial_scale,
    )
    for eps_in_sqrt, (centered, bias_correction), (momentum, nesterov), initial_scale in (
        itertools.product(
            (False, True),
            ((False, False), (True, False), (False, True)),
            ((None, False), (0.9, False), (0.9, True)),
            (0.0, 0.3),
        )
    )
]


@pytest.mark.parametrize("learning_rate", [0.01, optax.linear_schedule(0.02, 0.001, 40)])
@pytest.mark.parametrize(
    "case", CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items())
)
def test_rmsprop_equals_optax_rmsprop(case, learning_rate):
    params, grads = random_problem({"w": (6, 4), "b": (4,)}, 40, seed=11)
    ours, _ = run_transformation(rj.rmsprop(learning_rate, 0.85, 1e-6, **case), params, grads)
    theirs, _ = run_transformation(optax.rmsprop(learning_rate, 0.85, 1e-6, **case), params, grads)
    for name in params:
        np.testing.assert_allclose(ours[-1][name], theirs[-1][name], rtol=2e-6, atol=1e-6)


def test_defaults_follow_the_course_not_optax():
    """decay 0.9 and eps 1e-8 outside the root (optax puts it inside)."""
    params, grads = random_problem({"w": (3,)}, 5, seed=2)
    ours, _ = run_transformation(rj.rmsprop(0.01), params, grads)
    outside, _ = run_transformation(
        optax.rmsprop(0.01, decay=0.9, eps=1e-8, eps_in_sqrt=False), params, grads
    )
    np.testing.assert_allclose(ours[-1]["w"], outside[-1]["w"], rtol=1e-6)
