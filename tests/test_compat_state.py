"""Porting RMSprop checkpoints between `torch.optim.RMSprop` and `rj.compat.torch_rmsprop`."""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import max_error_relative_to_leaf_scale, run_trajectory

import rmsprop_jax as rj

STEPS, SPLIT = 100, 50
SHAPES = [(), (5,), (3, 4), (2, 3, 4)]
TOLERANCE = 1e-5
LR = 0.01


# The settings of a torch.optim.RMSprop group, as `state_dict()` lists them.
GROUP = dict(lr=LR, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False)


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
    _, ours = run_trajectory(tx, halfway, grads, slice(SPLIT, STEPS), state)

    worst = max_error_relative_to_leaf_scale(ours, [h[SPLIT:] for h in full])
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
    state, ours = run_trajectory(tx, params, grads, slice(0, SPLIT), tx.init(params_jax), jit=False)
    halfway = [h[-1] for h in ours]
    # A scheduler that resumes at step SPLIT, as a restored LambdaLR would.
    tensors, optimizer, scheduler = new_torch(torch, halfway, lambda t: warmup(t + SPLIT), **kwargs)
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict(rj.compat.state_to_torch(state, halfway, groups))
    theirs = run_torch(torch, optimizer, tensors, grads, range(SPLIT, STEPS), scheduler)

    worst = max_error_relative_to_leaf_scale(theirs, [h[SPLIT:] for h in full])
    print(
        f"torch_rmsprop {SPLIT} steps, torch {STEPS - SPLIT}: worst relative difference {worst:.2e}"
    )
    assert worst <= TOLERANCE


@pytest.mark.conformance
def test_round_trip_through_a_torch_state_dict_is_exact(torch):
    params, grads = make_problem(seed=2)
    tx = rj.compat.torch_rmsprop(WARMUP, momentum=0.9, centered=True)
    state, ours = run_trajectory(tx, params, grads, slice(0, 10), tx.init(params))
    now = [h[-1] for h in ours]
    _, optimizer, _ = new_torch(torch, now, warmup, momentum=0.9, centered=True)
    state_dict = rj.compat.state_to_torch(state, now, optimizer.state_dict()["param_groups"])
    assert state_dict["state"][4]["square_avg"].dtype == torch.complex64
    back = rj.compat.state_from_torch(state_dict, now, tx)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.conformance
@pytest.mark.parametrize("count", [2**24 + 1, 2**25 + 3, 2**31 - 1])
def test_counts_past_float32s_whole_numbers_round_trip_through_torch_exactly(torch, count):
    # torch's `step` was written as a float32 tensor, which holds whole numbers up to 2**24:
    # 2**24 + 1 came back as 2**24, 2**25 + 3 as 2**25 + 4, and 2**31 - 1 as 2**31 (refused).
    params, grads = make_problem(seed=16)
    tx = rj.compat.torch_rmsprop(LR, momentum=0.9)
    state, _ = run_trajectory(tx, params, grads, slice(0, 2), tx.init(params))
    state = jax.tree.map(
        lambda leaf: jnp.asarray(count, jnp.int32) if leaf.dtype == jnp.int32 else leaf, state
    )
    tensors = [torch.tensor(p) for p in params]
    optimizer = torch.optim.RMSprop(tensors, lr=LR, momentum=0.9)
    state_dict = rj.compat.state_to_torch(state, params, optimizer.state_dict()["param_groups"])
    back = rj.compat.state_from_torch(state_dict, params, tx)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    optimizer.load_state_dict(state_dict)
    run_torch(torch, optimizer, tensors, grads, range(2, 3))  # counts on from there, exactly
    assert float(optimizer.state_dict()["state"][0]["step"]) == count + 1


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
def test_careless_arguments_are_named(torch):
    params, grads = make_problem(seed=5)
    optimizer = stepped_torch(torch, params, grads)
    tx = rj.compat.torch_rmsprop()
    # The preset's factory, or the arguments in the other order: an AttributeError before.
    for not_built in (rj.compat.torch_rmsprop, params):
        with pytest.raises(
            TypeError, match=r"`optimizer` must be an optax\.GradientTransformation"
        ):
            rj.compat.state_from_torch(optimizer.state_dict(), params, not_built)
    # The optimizer's live groups hold its parameters, not a state_dict's indices: torch's
    # "only one element tensors can be converted to Python scalars" before.
    with pytest.raises(ValueError, match=r"holds Tensors, not the parameter indices.*state_dict"):
        rj.compat.state_to_torch(tx.init(params), params, optimizer.param_groups)


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
    with pytest.raises(ValueError, match=r"different step counts \[2, 3\]"):
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
    groups = [GROUP | {"params": [0]}]
    with pytest.raises(ValueError, match="no RMS statistics"):
        rj.compat.state_to_torch(optax.sgd(0.1).init(params), params, groups)
    state_dict = {"state": {}, "param_groups": groups}
    with pytest.raises(ValueError, match="no RMS statistics"):
        rj.compat.state_from_torch(state_dict, params, optax.sgd(0.1))


@pytest.mark.conformance
@pytest.mark.parametrize("centered", [False, True])
def test_an_rmsprop_whose_buffer_holds_scaled_steps_is_refused_in_both_directions(torch, centered):
    params, grads = make_problem(seed=10)
    params, grads = params[:4], grads[:4]  # rj.rmsprop keeps |g|**2 for complex leaves
    optimizer = stepped_torch(torch, params, grads, momentum=0.9, centered=centered)
    tx = rj.rmsprop(LR, momentum=0.9, centered=centered)
    with pytest.raises(ValueError, match=r"not one of `rmsprop_jax\.compat\.torch_rmsprop`"):
        rj.compat.state_from_torch(optimizer.state_dict(), params, tx)
    with pytest.raises(ValueError, match=r"Build the optimizer with `rmsprop_jax\.compat"):
        rj.compat.state_to_torch(tx.init(params), params, optimizer.state_dict()["param_groups"])


@pytest.mark.conformance
def test_a_wrapped_torch_rmsprop_is_still_recognised_and_continues_torch(torch):
    params, grads = make_problem(seed=11)
    kwargs: dict[str, Any] = dict(momentum=0.9, centered=True)
    tensors = [torch.tensor(p) for p in params]
    optimizer = torch.optim.RMSprop(tensors, lr=LR, **kwargs)
    full = run_torch(torch, optimizer, tensors, grads, range(20))
    tensors = [torch.tensor(p) for p in params]
    optimizer = torch.optim.RMSprop(tensors, lr=LR, **kwargs)
    run_torch(torch, optimizer, tensors, grads, range(10))
    halfway = [x.detach().numpy().copy() for x in tensors]
    # The rate becomes a traced hyperparameter; the chain (and its marker) sit one level down.
    tx = optax.inject_hyperparams(rj.compat.torch_rmsprop, hyperparam_dtype=jnp.float32)(
        lr=LR, **kwargs
    )
    state = rj.compat.state_from_torch(optimizer.state_dict(), halfway, tx)
    _, ours = run_trajectory(tx, halfway, grads, slice(10, 20), state)
    assert max_error_relative_to_leaf_scale(ours, [h[10:] for h in full]) <= TOLERANCE
    # Other wrappers keep the chain too: the torch statistics land inside them.
    preset = rj.compat.torch_rmsprop(LR, **kwargs)
    expected = rj.compat.state_from_torch(optimizer.state_dict(), halfway, preset)
    for wrapped in (
        optax.MultiSteps(preset, 2).gradient_transformation(),
        optax.apply_if_finite(preset, 3),
    ):
        state = rj.compat.state_from_torch(optimizer.state_dict(), halfway, wrapped)
        inner = state.inner_state if hasattr(state, "inner_state") else state.inner_opt_state
        for a, b in zip(jax.tree.leaves(inner), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)
    # A foreign buffer chained after the preset is not mistaken for the preset's.
    tx = optax.chain(rj.compat.torch_rmsprop(LR, centered=True), optax.trace(0.5))
    with pytest.raises(ValueError, match=r"momentum=0\.9"):
        rj.compat.state_from_torch(optimizer.state_dict(), halfway, tx)


def other_state_dicts(torch):
    """State dicts that are not a torch.optim.RMSprop's, and the key each message must name."""
    model = torch.nn.Linear(3, 2)
    model(torch.ones(3)).sum().backward()
    adam = torch.optim.Adam(model.parameters())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rmsprop = torch.optim.RMSprop(model.parameters(), lr=0.1)
    for optimizer in (adam, sgd, rmsprop):
        optimizer.step()
    # state_dict() shares the per-parameter dicts with the optimizer: copy before deleting.
    without_square_avg = copy.deepcopy(rmsprop.state_dict())
    del without_square_avg["state"][1]["square_avg"]
    without_step = copy.deepcopy(rmsprop.state_dict())
    del without_step["state"][0]["step"]
    without_groups = {"state": rmsprop.state_dict()["state"]}
    return {
        "adam": (adam.state_dict(), "'alpha'"),
        "sgd": (sgd.state_dict(), "'alpha'"),
        "model": (model.state_dict(), "no 'state' and no 'param_groups'.*weight"),
        "no-square-avg": (without_square_avg, "parameter 1 has no 'square_avg'"),
        "no-step": (without_step, "parameter 0 has no 'step'"),
        "no-param-groups": (without_groups, "no 'param_groups'"),
    }


@pytest.mark.conformance
@pytest.mark.parametrize(
    "kind", ["adam", "sgd", "model", "no-square-avg", "no-step", "no-param-groups"]
)
def test_a_state_dict_that_is_not_rmsprop_raises_value_error_naming_what_is_missing(torch, kind):
    state_dict, message = other_state_dicts(torch)[kind]
    params = [np.zeros((2, 3), np.float32), np.zeros(2, np.float32)]
    with pytest.raises(ValueError, match=message):
        rj.compat.state_from_torch(state_dict, params, rj.compat.torch_rmsprop())
    if "param_groups" in state_dict:
        tx = rj.compat.torch_rmsprop()
        groups = state_dict["param_groups"]
        if kind in ("adam", "sgd"):
            with pytest.raises(ValueError, match=message):
                rj.compat.state_to_torch(tx.init(params), params, groups)


def named_torch(torch, seed, **kwargs):
    """A two-layer torch model, optimized in two groups built from `named_parameters()`."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    named = list(model.named_parameters())
    optimizer = torch.optim.RMSprop([{"params": named[:2]}, {"params": named[2:]}], lr=LR, **kwargs)
    return model, optimizer


def torch_steps(torch, model, optimizer, grads, steps):
    history = []
    for t in steps:
        for name, tensor in model.named_parameters():
            tensor.grad = torch.tensor(grads[name][t])
        optimizer.step()
        history.append({n: p.detach().numpy().copy() for n, p in model.named_parameters()})
    return history


def as_tree(flat):
    """{"0.weight": w, ...} as the nested {"0": {"weight": w}, ...} a JAX model would hold."""
    tree: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        layer, leaf = name.split(".")
        tree.setdefault(layer, {})[leaf] = value
    return tree


@pytest.mark.conformance
def test_named_parameter_groups_port_by_name_in_both_directions(torch):
    kwargs: dict[str, Any] = dict(momentum=0.9, centered=True)
    model, optimizer = named_torch(torch, seed=12, **kwargs)
    rng = np.random.default_rng(12)
    grads = {
        n: rng.normal(size=(20, *p.shape)).astype(np.float32) for n, p in model.named_parameters()
    }
    start = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    full = torch_steps(torch, model, optimizer, grads, range(20))
    full_optimizer = optimizer

    model, optimizer = named_torch(torch, seed=12, **kwargs)
    torch_steps(torch, model, optimizer, grads, range(10))
    halfway = as_tree({n: p.detach().numpy().copy() for n, p in model.named_parameters()})
    # In tree order "0.bias" comes before "0.weight": only the names give the right pairing.
    tx = rj.compat.torch_rmsprop(LR, **kwargs)
    state = rj.compat.state_from_torch(optimizer.state_dict(), halfway, tx)

    tree_grads = as_tree({n: jnp.asarray(g[10:]) for n, g in grads.items()})
    state, ours = run_trajectory(tx, halfway, tree_grads, state=state)
    theirs = as_tree({n: np.stack([h[n] for h in full[10:]]) for n in start})
    assert (
        max_error_relative_to_leaf_scale(jax.tree.leaves(ours), jax.tree.leaves(theirs))
        <= TOLERANCE
    )

    # Back to torch: the state after 20 steps here is, index by index, torch's after 20 steps.
    ported = rj.compat.state_to_torch(
        state, jax.tree.map(lambda h: h[-1], ours), optimizer.state_dict()["param_groups"]
    )
    expected = full_optimizer.state_dict()["state"]
    assert sorted(ported["state"]) == sorted(expected) == [0, 1, 2, 3]
    for index, entry in expected.items():
        for key in ("square_avg", "momentum_buffer", "grad_avg"):
            np.testing.assert_allclose(
                ported["state"][index][key].numpy(), entry[key].numpy(), rtol=1e-5, atol=1e-7
            )
    _, fresh = named_torch(torch, seed=12, **kwargs)
    fresh.load_state_dict(ported)


@pytest.mark.conformance
def test_a_leaf_whose_name_torch_does_not_have_is_refused_naming_both(torch):
    model, optimizer = named_torch(torch, seed=13)
    params = {
        "0": {"kernel": np.zeros((3, 4), np.float32), "bias": np.zeros(3, np.float32)},
        "2": {"weight": np.zeros((2, 3), np.float32), "bias": np.zeros(2, np.float32)},
    }
    tx = rj.compat.torch_rmsprop(LR)
    message = r"\['0'\]\['kernel'\] of `params` is named '0.kernel'.*unmatched names are '0.weight'"
    with pytest.raises(ValueError, match=message):
        rj.compat.state_from_torch(optimizer.state_dict(), params, tx)
    with pytest.raises(ValueError, match=message):
        rj.compat.state_to_torch(tx.init(params), params, optimizer.state_dict()["param_groups"])
    # Pairing by position is still available, and then the shapes decide.
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(3, 4\)"):
        model(torch.ones(4)).sum().backward()
        optimizer.step()
        rj.compat.state_from_torch(optimizer.state_dict(), params, tx, match_by="order")


@pytest.mark.conformance
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("square_avg", np.nan, r"'square_avg' of parameter 2 holds 1 NaN entries of 12"),
        ("square_avg", -1.0, r"'square_avg' of parameter 2 holds 1 negative entries .* -1\.0"),
        ("grad_avg", np.nan, r"'grad_avg' of parameter 2 holds 1 NaN entries"),
        ("momentum_buffer", np.nan, r"'momentum_buffer' of parameter 2 holds 1 NaN entries"),
    ],
    ids=["nan-square", "negative-square", "nan-mean", "nan-buffer"],
)
def test_a_diverged_or_edited_torch_state_is_refused_naming_the_entry(torch, key, value, message):
    # Imported as it was, each made every later update of the parameter NaN.
    params, grads = make_problem(seed=12)
    optimizer = stepped_torch(torch, params, grads, momentum=0.9, centered=True)
    state_dict = copy.deepcopy(optimizer.state_dict())
    state_dict["state"][2][key][1, 2] = value
    with pytest.raises(ValueError, match=message):
        rj.compat.state_from_torch(
            state_dict, params, rj.compat.torch_rmsprop(LR, momentum=0.9, centered=True)
        )


@pytest.mark.conformance
@pytest.mark.parametrize(
    "step", [5.5, -1.0, np.nan, np.inf, 2.0**31], ids=["fraction", "negative", "nan", "inf", "big"]
)
def test_an_edited_torch_step_is_refused_naming_the_parameter(torch, step):
    # A fractional step was truncated and a negative one kept as the count; non-finite ones and
    # those past int32 raised errors that named no parameter.
    params, grads = make_problem(seed=15)
    optimizer = stepped_torch(torch, params, grads)
    state_dict = copy.deepcopy(optimizer.state_dict())
    state_dict["state"][1]["step"] = torch.tensor(step)
    with pytest.raises(ValueError, match=r"torch `step` of parameter 1 must be one whole number"):
        rj.compat.state_from_torch(state_dict, params, rj.compat.torch_rmsprop(LR))


@pytest.mark.conformance
def test_an_overflowed_torch_mean_square_is_kept_and_continues_as_torch_does(torch):
    # Squares of float32 gradients above about 1.8e19 overflow: torch divides by the infinite
    # mean square (a zero step for that entry) and goes on; so does the imported state.
    params, grads = make_problem(seed=13)
    optimizer = stepped_torch(torch, params, grads, momentum=0.9, centered=True)
    state_dict = copy.deepcopy(optimizer.state_dict())
    state_dict["state"][2]["square_avg"][1, 2] = np.inf
    tx = rj.compat.torch_rmsprop(LR, momentum=0.9, centered=True)
    stepped = [t.detach().numpy().copy() for t in optimizer.param_groups[0]["params"]]
    opt_state = rj.compat.state_from_torch(state_dict, stepped, tx)
    tensors = [torch.tensor(p) for p in stepped]
    reference = torch.optim.RMSprop(tensors, lr=LR, momentum=0.9, centered=True)
    reference.load_state_dict(state_dict)
    theirs = run_torch(torch, reference, tensors, grads, range(3, 5))
    _, ours = run_trajectory(tx, stepped, grads, slice(3, 5), opt_state)
    assert all(np.isfinite(np.asarray(h)).all() for h in ours)
    assert max_error_relative_to_leaf_scale(ours, theirs) <= TOLERANCE


@pytest.mark.conformance
def test_an_imported_state_does_not_change_when_torch_steps_on(torch):
    # The state shared memory with torch's tensors (jnp.asarray of their NumPy views), so the
    # torch optimizer's next step() silently changed the JAX state imported before it.
    params, grads = make_problem(seed=14)
    optimizer = stepped_torch(torch, params, grads, momentum=0.9, centered=True)
    tx = rj.compat.torch_rmsprop(LR, momentum=0.9, centered=True)
    imported = rj.compat.state_from_torch(optimizer.state_dict(), params, tx)
    kept = [np.array(leaf, copy=True) for leaf in jax.tree.leaves(imported)]
    run_torch(torch, optimizer, optimizer.param_groups[0]["params"], grads, range(3, 5))
    for leaf, before in zip(jax.tree.leaves(imported), kept, strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), before)
