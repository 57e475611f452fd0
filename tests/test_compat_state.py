"""Porting RMSprop checkpoints between `torch.optim.RMSprop` and `rj.compat.torch_rmsprop`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_preset, worst_relative_difference

import rmsprop_jax as rj

STEPS, SPLIT = 100, 50
SHAPES = [(), (5,), (3, 4), (2, 3, 4)]
TOLERANCE = 1e-5
LR = 0.01


def warmup(t):
    """LambdaLR multiplier: linear warm-up from 0.1 to 1 over 80 steps, across the split."""
    return 0.1 + 0.9 * min(t, 80) / 80


WARMUP = optax.linear_schedule(0.1 * LR, LR, transition_steps=80)


def make_problem(seed):
    """Real parameters of several ranks plus a complex one, and a fixed gradient sequence."""
    rng = np.random.default_rng(seed)

    def draw(shape, complex_):
        x = rng.normal(size=shape)
        return (x + 1j * rng.normal(size=shape)).astype(np.complex64) if complex_ else x

    kinds = [(s, False) for s in SHAPES] + [((3,), True)]
    params = [np.asarray(draw(s, c)).astype(np.complex64 if c else np.float32) for s, c in kinds]
    grads = [
        np.asarray(0.3 + draw((STEPS, *s), c)).astype(np.complex64 if c else np.float32)
        for s, c in kinds
    ]
    return params, grads


def run_torch(torch, optimizer, tensors, grads, steps, scheduler=None):
    """Steps `optimizer` through `steps`; returns the parameters after each step."""
    history = []
    for t in steps:
        for tensor, g in zip(tensors, grads, strict=True):
            tensor.grad = torch.tensor(g[t])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        history.append([x.detach().numpy().copy() for x in tensors])
    return [np.stack([h[i] for h in history]) for i in range(len(tensors))]


CONFIGS = [
    dict(momentum=0.0, centered=False, weight_decay=0.0),
    dict(momentum=0.9, centered=False, weight_decay=0.01),
    dict(momentum=0.9, centered=True, weight_decay=0.01, maximize=True),
]


def new_torch(torch, params, lr_lambda, **kwargs):
    tensors = [torch.tensor(p) for p in params]
    optimizer = torch.optim.RMSprop(tensors, lr=LR, **kwargs)
    return tensors, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


@pytest.mark.conformance
@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_torch_checkpoint_continued_here_equals_100_torch_steps(torch, kwargs):
    params, grads = make_problem(seed=0)
    tensors, optimizer, scheduler = new_torch(torch, params, warmup, **kwargs)
    full = run_torch(torch, optimizer, tensors, grads, range(STEPS), scheduler)

    tensors, optimizer, scheduler = new_torch(torch, params, warmup, **kwargs)
    run_torch(torch, optimizer, tensors, grads, range(SPLIT), scheduler)
    halfway = [x.detach().numpy().copy() for x in tensors]
    tx = rj.compat.torch_rmsprop(WARMUP, **kwargs)
    state = rj.compat.state_from_torch(optimizer.state_dict(), halfway, tx)
    _, ours = run_preset(tx, halfway, grads, slice(SPLIT, STEPS), state)

    worst = worst_relative_difference(ours, [h[SPLIT:] for h in full])
    print(
        f"torch {SPLIT} steps, torch_rmsprop {STEPS - SPLIT}: worst relative difference {worst:.2e}"
    )
    assert worst <= TOLERANCE


@pytest.mark.conformance
@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_checkpoint_from_here_continued_in_torch_equals_100_torch_steps(torch, kwargs):
    params, grads = make_problem(seed=1)
    tensors, optimizer, scheduler = new_torch(torch, params, warmup, **kwargs)
    full = run_torch(torch, optimizer, tensors, grads, range(STEPS), scheduler)

    tx = rj.compat.torch_rmsprop(WARMUP, **kwargs)
    params_jax = [jnp.asarray(p) for p in params]
    state, ours = run_preset(tx, params, grads, slice(0, SPLIT), tx.init(params_jax), jit=False)
    halfway = [h[-1] for h in ours]
    # A scheduler that resumes at step SPLIT, as a restored LambdaLR would.
    tensors, optimizer, scheduler = new_torch(torch, halfway, lambda t: warmup(t + SPLIT), **kwargs)
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict(rj.compat.state_to_torch(state, halfway, groups))
    theirs = run_torch(torch, optimizer, tensors, grads, range(SPLIT, STEPS), scheduler)

    worst = worst_relative_difference(theirs, [h[SPLIT:] for h in full])
    print(
        f"torch_rmsprop {SPLIT} steps, torch {STEPS - SPLIT}: worst relative difference {worst:.2e}"
    )
    assert worst <= TOLERANCE


@pytest.mark.conformance
def test_round_trip_through_a_torch_state_dict_is_exact(torch):
    params, grads = make_problem(seed=2)
    tx = rj.compat.torch_rmsprop(WARMUP, momentum=0.9, centered=True)
    state, ours = run_preset(tx, params, grads, slice(0, 10), tx.init(params))
    now = [h[-1] for h in ours]
    _, optimizer, _ = new_torch(torch, now, warmup, momentum=0.9, centered=True)
    state_dict = rj.compat.state_to_torch(state, now, optimizer.state_dict()["param_groups"])
    assert state_dict["state"][4]["square_avg"].dtype == torch.complex64
    back = rj.compat.state_from_torch(state_dict, now, tx)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.conformance
def test_optimizers_that_have_not_stepped_convert_to_initial_states(torch):
    params, _ = make_problem(seed=3)
    tx = rj.compat.torch_rmsprop(momentum=0.9)
    _, optimizer, _ = new_torch(torch, params, warmup, momentum=0.9)
    state = rj.compat.state_from_torch(optimizer.state_dict(), params, tx)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(tx.init(params)), strict=True):
        np.testing.assert_array_equal(a, b)
    state_dict = rj.compat.state_to_torch(state, params, optimizer.state_dict()["param_groups"])
    assert state_dict["state"] == {}
    optimizer.load_state_dict(state_dict)


def stepped_torch(torch, params, grads, steps=3, **kwargs):
    tensors = [torch.tensor(p) for p in params]
    optimizer = torch.optim.RMSprop(tensors, lr=LR, **kwargs)
    run_torch(torch, optimizer, tensors, grads, range(steps))
    return optimizer


@pytest.mark.conformance
@pytest.mark.parametrize(
    ("torch_kwargs", "preset_kwargs", "message"),
    [
        (dict(centered=True), dict(), "centered=True"),
        (dict(), dict(centered=True), "centered=False"),
        (dict(momentum=0.9), dict(), "momentum=0.9"),
        (dict(), dict(momentum=0.9), "no momentum buffer"),
    ],
)
def test_mismatched_flags_raise_value_error_in_both_directions(
    torch, torch_kwargs, preset_kwargs, message
):
    params, grads = make_problem(seed=4)
    optimizer = stepped_torch(torch, params, grads, **torch_kwargs)
    tx = rj.compat.torch_rmsprop(**preset_kwargs)
    with pytest.raises(ValueError, match=message):
        rj.compat.state_from_torch(optimizer.state_dict(), params, tx)
    with pytest.raises(ValueError, match=message):
        rj.compat.state_to_torch(tx.init(params), params, optimizer.state_dict()["param_groups"])


@pytest.mark.conformance
def test_wrong_number_of_parameters_raises_value_error(torch):
    params, grads = make_problem(seed=5)
    optimizer = stepped_torch(torch, params, grads)
    tx = rj.compat.torch_rmsprop()
    with pytest.raises(ValueError, match="5 parameters but `params` has 4 leaves"):
        rj.compat.state_from_torch(optimizer.state_dict(), params[:4], tx)
    with pytest.raises(ValueError, match="5 parameters but `params` has 4 leaves"):
        rj.compat.state_to_torch(
            tx.init(params[:4]), params[:4], optimizer.state_dict()["param_groups"]
        )


@pytest.mark.conformance
def test_mismatched_shapes_raise_value_error_naming_the_parameter(torch):
    params, grads = make_problem(seed=6)
    optimizer = stepped_torch(torch, params, grads)
    tx = rj.compat.torch_rmsprop()
    wrong = [*params[:2], np.zeros((4, 3), np.float32), *params[3:]]
    with pytest.raises(
        ValueError, match=r"parameter 2 has shape \(3, 4\).*\[2\] has shape \(4, 3\)"
    ):
        rj.compat.state_from_torch(optimizer.state_dict(), wrong, tx)
    with pytest.raises(ValueError, match=r"shape \(3, 4\) where the parameter of shape \(4, 3\)"):
        rj.compat.state_to_torch(tx.init(params), wrong, optimizer.state_dict()["param_groups"])


@pytest.mark.conformance
def test_parameters_with_different_step_counts_raise_value_error(torch):
    params, grads = make_problem(seed=7)
    tensors = [torch.tensor(p) for p in params]
    optimizer = torch.optim.RMSprop(tensors, lr=LR)
    run_torch(torch, optimizer, tensors, grads, range(2))
    tensors[0].grad = None  # The first parameter sits out one step.
    optimizer.step()
    with pytest.raises(ValueError, match=r"different step counts \[2.0, 3.0\]"):
        rj.compat.state_from_torch(optimizer.state_dict(), params, rj.compat.torch_rmsprop())


@pytest.mark.conformance
def test_parameter_without_state_raises_value_error(torch):
    params, grads = make_problem(seed=8)
    tensors = [torch.tensor(p) for p in params]
    optimizer = torch.optim.RMSprop(tensors, lr=LR)
    for tensor, g in zip(tensors[1:], grads[1:], strict=True):
        tensor.grad = torch.tensor(g[0])
    optimizer.step()
    with pytest.raises(ValueError, match=r"parameters \[0\] have no optimizer state"):
        rj.compat.state_from_torch(optimizer.state_dict(), params, rj.compat.torch_rmsprop())


@pytest.mark.conformance
def test_param_groups_with_different_settings_raise_value_error(torch):
    params, _ = make_problem(seed=9)
    tensors = [torch.tensor(p) for p in params]
    optimizer = torch.optim.RMSprop(
        [{"params": tensors[:2]}, {"params": tensors[2:], "alpha": 0.9}], lr=LR
    )
    with pytest.raises(ValueError, match="param_groups 0 and 1 have different settings"):
        rj.compat.state_from_torch(optimizer.state_dict(), params, rj.compat.torch_rmsprop())


def test_a_state_without_rms_statistics_raises_value_error():
    params = [jnp.zeros(2)]
    groups = [{"lr": LR, "momentum": 0, "centered": False, "params": [0]}]
    with pytest.raises(ValueError, match="no RMS statistics"):
        rj.compat.state_to_torch(optax.sgd(0.1).init(params), params, groups)
    state_dict = {"state": {}, "param_groups": groups}
    with pytest.raises(ValueError, match="no RMS statistics"):
        rj.compat.state_from_torch(state_dict, params, optax.sgd(0.1))
