"""PyTorch learning-rate schedulers as optax schedules, against torch's own scheduler objects."""

from __future__ import annotations

import warnings
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import conformance_problem, max_error_relative_to_leaf_scale, run_trajectory

import rmsprop_jax as rj

LR = 0.01
SEQUENCE_STEPS = 3000
TRAJECTORY_STEPS = 200
SEQUENCE_TOLERANCE = 1e-6
TOLERANCE = 1e-5
C = rj.compat


def lambda_factor(epoch):
    """Works on a Python int (torch) and a traced JAX integer (the optax schedule)."""
    return 1.0 / (1.0 + 0.01 * epoch)


def configs(horizon):
    """(torch scheduler factory, equivalent optax schedule, steps per epoch) per scheduler."""
    return {
        "StepLR": (lambda L, o: L.StepLR(o, 30, 0.5), C.torch_step_lr(LR, 30, 0.5), 1),
        "StepLR-per-epoch": (
            lambda L, o: L.StepLR(o, 3, 0.5),
            C.torch_step_lr(LR, 3, 0.5, steps_per_epoch=10),
            10,
        ),
        "MultiStepLR": (
            lambda L, o: L.MultiStepLR(o, [20, 50, 50, 120, 1000], 0.3),
            C.torch_multi_step_lr(LR, [20, 50, 50, 120, 1000], 0.3),
            1,
        ),
        "ExponentialLR": (
            lambda L, o: L.ExponentialLR(o, 0.995),
            C.torch_exponential_lr(LR, 0.995),
            1,
        ),
        "LinearLR": (
            lambda L, o: L.LinearLR(o, 0.1, 1.0, 100),
            C.torch_linear_lr(LR, 0.1, 1.0, 100),
            1,
        ),
        "ConstantLR": (
            lambda L, o: L.ConstantLR(o, 0.5, 40),
            C.torch_constant_lr(LR, 0.5, 40),
            1,
        ),
        "CosineAnnealingLR": (
            lambda L, o: L.CosineAnnealingLR(o, 70, 1e-4),
            C.torch_cosine_annealing_lr(LR, 70, 1e-4),
            1,
        ),
        "CosineAnnealingWarmRestarts": (
            lambda L, o: L.CosineAnnealingWarmRestarts(o, 10, 2, 1e-4),
            C.torch_cosine_annealing_warm_restarts(LR, 10, 2, 1e-4),
            1,
        ),
        "CosineAnnealingWarmRestarts-Tmult1": (
            lambda L, o: L.CosineAnnealingWarmRestarts(o, 45),
            C.torch_cosine_annealing_warm_restarts(LR, 45),
            1,
        ),
        "OneCycleLR": (
            lambda L, o: L.OneCycleLR(o, 0.05, total_steps=horizon, cycle_momentum=False),
            C.torch_one_cycle_lr(0.05, total_steps=horizon),
            1,
        ),
        "OneCycleLR-three-phase-linear": (
            lambda L, o: L.OneCycleLR(
                o,
                0.05,
                total_steps=horizon,
                anneal_strategy="linear",
                three_phase=True,
                cycle_momentum=False,
            ),
            C.torch_one_cycle_lr(
                0.05, total_steps=horizon, anneal_strategy="linear", three_phase=True
            ),
            1,
        ),
        "PolynomialLR": (
            lambda L, o: L.PolynomialLR(o, 150, 2.0),
            C.torch_polynomial_lr(LR, 150, 2.0),
            1,
        ),
        "LambdaLR": (
            lambda L, o: L.LambdaLR(o, lambda_factor),
            C.torch_lambda_lr(LR, lambda_factor),
            1,
        ),
        "SequentialLR": (
            lambda L, o: L.SequentialLR(
                o, [L.LinearLR(o, 0.1, 1.0, 20), L.ExponentialLR(o, 0.99)], milestones=[20]
            ),
            C.torch_sequential_lr(
                [C.torch_linear_lr(LR, 0.1, 1.0, 20), C.torch_exponential_lr(LR, 0.99)], [20]
            ),
            1,
        ),
    }


NAMES = list(configs(1))


def torch_rates(torch, factory, steps, steps_per_epoch, momentum=0.0):
    """The rate of each of `steps` updates, stepping the scheduler once per epoch."""
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.RMSprop([weight], lr=LR, momentum=momentum)
    scheduler = factory(torch.optim.lr_scheduler, optimizer)
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for t in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            if (t + 1) % steps_per_epoch == 0 and t + 1 < steps:
                scheduler.step()
    return np.asarray(rates, np.float64)


@pytest.mark.conformance
@pytest.mark.parametrize("name", NAMES)
def test_schedule_equals_the_torch_scheduler_over_3000_steps(torch, name):
    factory, schedule, steps_per_epoch = configs(SEQUENCE_STEPS)[name]
    theirs = torch_rates(torch, factory, SEQUENCE_STEPS, steps_per_epoch)
    ours = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(SEQUENCE_STEPS)), np.float64)
    worst = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
    print(f"{name}: {SEQUENCE_STEPS} rates, worst relative difference {worst:.2e}")
    assert worst <= SEQUENCE_TOLERANCE
    # Rate by rate too, wherever the rate is not negligible (above 1e-3 of its peak).
    large = np.abs(theirs) > 1e-3 * np.max(np.abs(theirs))
    np.testing.assert_allclose(ours[large], theirs[large], rtol=1e-5)


def torch_trajectory(torch, params, grads, factory, steps_per_epoch, momentum):
    tensors = [torch.tensor(p) for p in params]
    optimizer = torch.optim.RMSprop(tensors, lr=LR, momentum=momentum)
    scheduler = factory(torch.optim.lr_scheduler, optimizer)
    history = []
    for t in range(len(grads[0])):
        for tensor, g in zip(tensors, grads, strict=True):
            tensor.grad = torch.tensor(g[t])
        optimizer.step()
        if (t + 1) % steps_per_epoch == 0 and t + 1 < len(grads[0]):
            scheduler.step()
        history.append([x.detach().numpy().copy() for x in tensors])
    return [np.stack([h[i] for h in history]) for i in range(len(tensors))]


@pytest.mark.conformance
@pytest.mark.parametrize("name", NAMES)
def test_rmsprop_under_the_schedule_follows_torch_under_the_scheduler(torch, name):
    factory, schedule, steps_per_epoch = configs(TRAJECTORY_STEPS)[name]
    params, grads = conformance_problem(3, [(3, 4), (5,)], TRAJECTORY_STEPS)
    theirs = torch_trajectory(torch, params, grads, factory, steps_per_epoch, momentum=0.9)
    _, ours = run_trajectory(C.torch_rmsprop(schedule, momentum=0.9), params, grads)
    worst = max_error_relative_to_leaf_scale(ours, theirs)
    print(f"RMSprop under {name}, {TRAJECTORY_STEPS} steps: worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE


@pytest.mark.conformance
def test_one_cycle_with_its_momentum_cycle_follows_torch(torch):
    def factory(L, o):
        return L.OneCycleLR(o, 0.05, total_steps=TRAJECTORY_STEPS, pct_start=0.25)

    params, grads = conformance_problem(4, [(3, 4), (5,)], TRAJECTORY_STEPS)
    # torch cycles `momentum` between 0.85 and 0.95 (overriding the optimizer's).
    theirs = torch_trajectory(torch, params, grads, factory, 1, momentum=0.9)
    tx = optax.inject_hyperparams(C.torch_rmsprop)(
        lr=C.torch_one_cycle_lr(0.05, total_steps=TRAJECTORY_STEPS, pct_start=0.25),
        momentum=C.torch_one_cycle_momentum(total_steps=TRAJECTORY_STEPS, pct_start=0.25),
    )
    _, ours = run_trajectory(tx, params, grads)
    worst = max_error_relative_to_leaf_scale(ours, theirs)
    print(f"RMSprop under OneCycleLR with momentum: worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE


PLATEAU = [
    dict(),
    dict(mode="max", threshold_mode="abs", threshold=0.05, patience=2, cooldown=3, factor=0.5),
    dict(patience=1, cooldown=1, factor=0.3, min_lr=5e-4),
]


@pytest.mark.conformance
@pytest.mark.parametrize("kwargs", PLATEAU, ids=["defaults", "max-abs-cooldown", "min-lr"])
def test_reduce_lr_on_plateau_follows_torch_with_a_metric_per_epoch(torch, kwargs):
    epoch_length, epochs = 5, 60
    steps = epoch_length * epochs
    params, grads = conformance_problem(5, [(3, 4), (5,)], steps)
    # A noisy, slowly improving metric with long stalls, reported once per epoch.
    rng = np.random.default_rng(5)
    metric = (np.exp(-np.arange(epochs) / 15) + 0.05 * rng.random(epochs)).astype(np.float32)
    metric[20:45] = metric[20]
    if kwargs.get("mode") == "max":
        metric = -metric

    tensors = [torch.tensor(p) for p in params]
    optimizer = torch.optim.RMSprop(tensors, lr=LR, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)
    theirs, torch_lrs = [], []
    for t in range(steps):
        for tensor, g in zip(tensors, grads, strict=True):
            tensor.grad = torch.tensor(g[t])
        optimizer.step()
        if (t + 1) % epoch_length == 0:
            scheduler.step(float(metric[t // epoch_length]))
            torch_lrs.append(optimizer.param_groups[0]["lr"])
        theirs.append([x.detach().numpy().copy() for x in tensors])

    tx = optax.chain(C.torch_rmsprop(1.0, momentum=0.9), C.torch_reduce_lr_on_plateau(LR, **kwargs))

    @jax.jit
    def step(p, state, g, value):
        updates, state = tx.update(g, state, p, value=value)
        return optax.apply_updates(p, updates), state

    @jax.jit
    def plain_step(p, state, g):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    p = [jnp.asarray(x) for x in params]
    state = tx.init(p)
    ours, our_lrs = [], []
    for t in range(steps):
        g = [jnp.asarray(x[t]) for x in grads]
        if (t + 1) % epoch_length == 0:
            p, state = step(p, state, g, metric[t // epoch_length])
            our_lrs.append(float(state[1].lr))
        else:
            p, state = plain_step(p, state, g)
        ours.append(p)
    np.testing.assert_allclose(our_lrs, torch_lrs, rtol=1e-6)
    assert len(set(torch_lrs)) >= 3  # the rate was cut at least twice
    worst = max_error_relative_to_leaf_scale(
        [np.stack([o[i] for o in ours]) for i in range(2)],
        [np.stack([h[i] for h in theirs]) for i in range(2)],
    )
    print(f"RMSprop under ReduceLROnPlateau {kwargs}: worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE


def test_bad_scheduler_arguments_are_named():
    with pytest.raises(ValueError, match=r"`step_size` must be a positive integer \(.*\), got 0"):
        C.torch_step_lr(LR, 0)
    with pytest.raises(ValueError, match="`milestones` must be 1 increasing epochs"):
        C.torch_sequential_lr([C.torch_step_lr(LR, 2), C.torch_step_lr(LR, 2)], [5, 6])
    with pytest.raises(ValueError, match="`schedules` must hold at least one schedule"):
        C.torch_sequential_lr([], [])
    with pytest.raises(TypeError, match=r"`schedules\[1\]` must be a schedule .* got 0.01"):
        C.torch_sequential_lr([C.torch_step_lr(LR, 2), 0.01], [5])
    with pytest.raises(ValueError, match="`mode` must be 'min' or 'max', got 'lowest'"):
        C.torch_reduce_lr_on_plateau(LR, mode="lowest")
    with pytest.raises(ValueError, match=r"`factor` must be in \[0, 1\), got 1.0"):
        C.torch_reduce_lr_on_plateau(LR, factor=1.0)
    with pytest.raises(ValueError, match="Pass `total_steps`"):
        C.torch_one_cycle_lr(0.1)
    with pytest.raises(ValueError, match="`lr` must be a finite number"):
        C.torch_exponential_lr(float("inf"), 0.9)


def test_careless_scheduler_arguments_are_named_not_left_to_python():
    # Each raised a TypeError or ZeroDivisionError from inside the schedule's construction,
    # or (`three_phase="no"`) built the three-phase cycle. The arguments are mistyped on
    # purpose (`cast(Any, ...)`).
    with pytest.raises(TypeError, match=r"`milestones` must be a sequence of epochs .* got 3"):
        C.torch_multi_step_lr(LR, milestones=cast(Any, 3))
    with pytest.raises(TypeError, match=r"`milestones` must be a sequence of epochs .* got '35'"):
        C.torch_multi_step_lr(LR, milestones=cast(Any, "35"))
    with pytest.raises(TypeError, match="`schedules` must be a sequence of schedules"):
        C.torch_sequential_lr(C.torch_step_lr(LR, 2), [])
    with pytest.raises(ValueError, match=r"`div_factor` must be a finite number > 0.*got 0"):
        C.torch_one_cycle_lr(0.1, total_steps=10, div_factor=0)
    with pytest.raises(ValueError, match="`final_div_factor` must be a finite number > 0"):
        C.torch_one_cycle_lr(0.1, total_steps=10, final_div_factor=0.0)
    with pytest.raises(TypeError, match="`three_phase` must be True or False, got 'no'"):
        C.torch_one_cycle_lr(0.1, total_steps=10, three_phase=cast(Any, "no"))
    with pytest.raises(TypeError, match="`three_phase` must be True or False"):
        C.torch_one_cycle_momentum(total_steps=10, three_phase=cast(Any, 1))


@pytest.mark.parametrize("maybe_jit", [lambda f: f, jax.jit], ids=["eager", "jit"])
@pytest.mark.parametrize("returned", ["half", None, {"factor": 0.5}], ids=repr)
def test_a_lambda_that_returns_no_number_is_named(maybe_jit, returned):
    # jnp.asarray's own error ("could not convert string to float") named no argument.
    schedule = C.torch_lambda_lr(LR, lambda epoch: returned)
    with pytest.raises(TypeError, match=r"`lr_lambda` must return a number .* got "):
        maybe_jit(schedule)(3)


@pytest.mark.parametrize("maybe_jit", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_a_plateau_metric_must_be_one_number(maybe_jit):
    tx = C.torch_reduce_lr_on_plateau(LR, patience=0)
    params = jnp.ones(2)
    state = tx.init(params)

    def rate_after(value):
        return maybe_jit(lambda s, v: tx.update(params, s, value=v)[1].lr)(state, value)

    # A vector of losses (one per batch, say) made the rate, and every later update, a vector.
    with pytest.raises(ValueError, match=r"`value` must be one real number .* shape \(3,\)"):
        rate_after(jnp.array([1.0, 0.5, 0.2]))
    with pytest.raises(ValueError, match=r"`value` must be one real number .* complex64"):
        rate_after(jnp.array(1.0 + 1.0j, jnp.complex64))
    # As torch's float(metrics): a one-element array is the number it holds.
    assert rate_after(jnp.array([0.5])).shape == ()
    assert rate_after(jnp.array([0.5])) == jnp.float32(LR)  # better than the start: kept
    with pytest.raises(TypeError, match=r"`value` must be a real number .* got 'low'"):
        tx.update(params, state, value="low")


@pytest.mark.parametrize("anneal_strategy", ["cos", "linear"])
@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_holds_its_final_value_past_total_steps(anneal_strategy, three_phase):
    # torch extrapolates the last phase once (a rate rising again, or below 0 when linear)
    # and then raises; the schedule holds its final value instead.
    options = dict(total_steps=6, anneal_strategy=anneal_strategy, three_phase=three_phase)
    lr = C.torch_one_cycle_lr(0.1, **options)
    momentum = C.torch_one_cycle_momentum(**options)
    counts = jnp.arange(5, 40)
    # Within float32 rounding of the peak (cos(pi) in float32), as torch's rates are matched.
    for schedule, final, peak in ((lr, 0.1 / 25 / 1e4, 0.1), (momentum, 0.95, 0.95)):
        values = np.asarray(jax.jit(jax.vmap(schedule))(counts))
        np.testing.assert_allclose(values, final, rtol=0, atol=SEQUENCE_TOLERANCE * peak)


@pytest.mark.conformance
def test_one_cycle_equals_torch_over_its_total_steps_and_holds_torchs_last_rate(torch):
    def factory(L, o):
        return L.OneCycleLR(o, 0.05, total_steps=50, anneal_strategy="linear", cycle_momentum=False)

    theirs = torch_rates(torch, factory, 50, 1)
    ours = np.asarray(
        jax.vmap(C.torch_one_cycle_lr(0.05, total_steps=50, anneal_strategy="linear"))(
            jnp.arange(60)
        )
    )
    atol = SEQUENCE_TOLERANCE * np.max(theirs)
    np.testing.assert_allclose(ours[:50], theirs, rtol=0, atol=atol)
    np.testing.assert_allclose(ours[50:], theirs[-1], rtol=0, atol=atol)
