"""`rj.compat.torch_rmsprop` follows the trajectory of the real `torch.optim.RMSprop`."""

from __future__ import annotations

import inspect
import itertools
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import conformance_problem, max_error_relative_to_leaf_scale, preset_trajectory

import rmsprop_jax as rj

STEPS = 100
SHAPES = [(), (5,), (3, 4), (2, 3, 4)]
TOLERANCE = 1e-5
LR = 0.01


def warmup(t):
    """LambdaLR multiplier: linear warm-up from 0.1 to 1 over 20 steps, then 1."""
    return 0.1 + 0.9 * min(t, 20) / 20


WARMUP = optax.linear_schedule(0.1 * LR, LR, transition_steps=20)


def make_problem(seed, shapes=SHAPES, dtype=np.float32):
    return conformance_problem(seed, shapes, STEPS, dtype)


def torch_trajectory(torch, params, grads, lr_lambda=None, **kwargs):
    """Parameters after each of the steps of `torch.optim.RMSprop(**kwargs)`."""
    tensors = [torch.tensor(p) for p in params]
    optimizer = torch.optim.RMSprop(tensors, **kwargs)
    scheduler = (
        None if lr_lambda is None else torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    )
    history: list[list[np.ndarray]] = [[] for _ in tensors]
    for t in range(len(grads[0])):
        for tensor, g in zip(tensors, grads, strict=True):
            tensor.grad = torch.tensor(g[t])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        for h, tensor in zip(history, tensors, strict=True):
            h.append(tensor.detach().numpy().copy())
    return [np.stack(h) for h in history]


CONFIGS = list(
    itertools.product([0.0, 0.9], [False, True], [0.0, 0.01], [False, True], [False, True])
)


@pytest.mark.conformance
@pytest.mark.parametrize(
    ("momentum", "centered", "weight_decay", "maximize", "scheduled"),
    CONFIGS,
    ids=[f"m{m}-c{int(c)}-wd{w}-max{int(x)}-sched{int(s)}" for m, c, w, x, s in CONFIGS],
)
def test_jitted_preset_matches_torch_for_100_steps(
    torch, momentum, centered, weight_decay, maximize, scheduled
):
    params, grads = make_problem(seed=0)
    kwargs = dict(momentum=momentum, centered=centered, weight_decay=weight_decay)
    reference = torch_trajectory(
        torch, params, grads, warmup if scheduled else None, lr=LR, maximize=maximize, **kwargs
    )
    tx = rj.compat.torch_rmsprop(WARMUP if scheduled else LR, maximize=maximize, **kwargs)
    worst = max_error_relative_to_leaf_scale(preset_trajectory(tx, params, grads), reference)
    print(f"torch_rmsprop vs torch.optim.RMSprop, worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE


@pytest.mark.conformance
def test_eager_preset_matches_torch_with_every_option_on(torch):
    params, grads = make_problem(seed=1)
    kwargs: dict[str, Any] = dict(
        alpha=0.9, eps=1e-6, momentum=0.5, centered=True, weight_decay=0.1, maximize=True
    )
    reference = torch_trajectory(torch, params, grads, warmup, lr=LR, **kwargs)
    tx = rj.compat.torch_rmsprop(WARMUP, **kwargs)
    worst = max_error_relative_to_leaf_scale(
        preset_trajectory(tx, params, grads, jit=False), reference
    )
    print(f"eager torch_rmsprop vs torch.optim.RMSprop, worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE


@pytest.mark.conformance
@pytest.mark.parametrize("extra", [{"foreach": True}, {"foreach": False}, {"differentiable": True}])
def test_kernel_choice_flags_are_accepted_and_keep_the_torch_trajectory(torch, extra):
    params, grads = make_problem(seed=2)
    kwargs = dict(momentum=0.9, centered=True, weight_decay=0.01, **extra)
    reference = torch_trajectory(torch, params, grads, lr=LR, **kwargs)
    worst = max_error_relative_to_leaf_scale(
        preset_trajectory(rj.compat.torch_rmsprop(LR, **kwargs), params, grads), reference
    )
    print(f"torch_rmsprop({extra}) vs torch, worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE


@pytest.mark.conformance
@pytest.mark.parametrize("centered", [False, True])
def test_complex_parameters_match_torch_real_and_imaginary_accumulators(torch, centered):
    params, grads = make_problem(seed=3, shapes=[(4,), (2, 3)], dtype=np.complex64)
    kwargs = dict(momentum=0.9, centered=centered, weight_decay=0.01)
    reference = torch_trajectory(torch, params, grads, warmup, lr=LR, **kwargs)
    tx = rj.compat.torch_rmsprop(WARMUP, **kwargs)
    ours = preset_trajectory(tx, params, grads)
    assert all(np.iscomplexobj(a) for a in ours)
    worst = max_error_relative_to_leaf_scale(ours, reference)
    print(f"complex torch_rmsprop vs torch, worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE
    # |g|**2 in a single accumulator (the library's own convention) is a different optimizer.
    single = rj.rmsprop(WARMUP, decay=0.99, eps=1e-8, centered=centered, momentum=0.9)
    assert (
        max_error_relative_to_leaf_scale(preset_trajectory(single, params, grads), reference) > 1e-3
    )


@pytest.mark.conformance
def test_learning_rate_before_the_buffer_would_not_match_torch_under_a_schedule(torch):
    """Shows the comparison can fail: only PyTorch's order of rate and momentum matches."""
    params, grads = make_problem(seed=4)
    reference = torch_trajectory(torch, params, grads, warmup, lr=LR, momentum=0.9)
    keras_order = rj.rmsprop(WARMUP, decay=0.99, eps=1e-8, momentum=0.9)
    assert (
        max_error_relative_to_leaf_scale(preset_trajectory(keras_order, params, grads), reference)
        > 1e-3
    )


def test_torch_order_and_keras_order_agree_for_a_constant_rate():
    params, grads = make_problem(seed=5)
    torch_order = rj.compat.torch_rmsprop(LR, momentum=0.9)
    keras_order = rj.rmsprop(LR, decay=0.99, eps=1e-8, momentum=0.9)
    worst = max_error_relative_to_leaf_scale(
        preset_trajectory(torch_order, params, grads), preset_trajectory(keras_order, params, grads)
    )
    assert worst <= TOLERANCE


def test_momentum_buffer_exists_only_for_non_zero_momentum():
    params = [jnp.zeros(3)]
    assert not optax.tree.get_all_with_path(rj.compat.torch_rmsprop().init(params), "trace")
    state = rj.compat.torch_rmsprop(momentum=0.9).init(params)
    assert len(optax.tree.get_all_with_path(state, "trace")) == 1


@pytest.mark.conformance
def test_signature_matches_torch_optim_rmsprop(torch):
    theirs = inspect.signature(torch.optim.RMSprop.__init__).parameters
    ours = inspect.signature(rj.compat.torch_rmsprop).parameters
    expected = [(n, p.default) for n, p in theirs.items() if n not in ("self", "params")]
    assert [(n, p.default) for n, p in ours.items()] == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("lr", -0.1),
        ("alpha", 1.5),
        ("alpha", -0.1),
        ("eps", -1e-8),
        ("weight_decay", -0.01),
        ("momentum", 1.0),
        ("momentum", float("nan")),
    ],
)
def test_out_of_range_argument_raises_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        rj.compat.torch_rmsprop(**{name: value})


@pytest.mark.parametrize(
    "name", ["centered", "maximize", "capturable", "differentiable", "foreach"]
)
def test_non_boolean_flag_raises_type_error_naming_it(name):
    with pytest.raises(TypeError, match=f"`{name}`"):
        rj.compat.torch_rmsprop(**{name: cast(Any, "yes")})  # not a `bool`: rejected


def test_traced_hyperparameters_are_accepted_under_vmap():
    params, grads = make_problem(seed=6, shapes=[(3,)])

    def final(lr, momentum):
        tx = rj.compat.torch_rmsprop(lr, momentum=momentum)
        p, state = params, tx.init(params)
        for t in range(10):
            updates, state = tx.update([grads[0][t]], state, p)
            p = optax.apply_updates(p, updates)
        return p[0]

    rates, momenta = jnp.array([0.01, 0.02]), jnp.array([0.0, 0.9])
    swept = jax.jit(jax.vmap(final))(rates, momenta)
    for i in range(2):
        single = final(float(rates[i]), float(momenta[i]))
        np.testing.assert_allclose(swept[i], single, rtol=1e-5)
