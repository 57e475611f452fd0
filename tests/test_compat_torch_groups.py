"""`rj.compat.torch_rmsprop_groups` against a multi-group `torch.optim.RMSprop`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import conformance_problem, max_error_relative_to_leaf_scale, run_trajectory

import rmsprop_jax as rj

STEPS, SPLIT = 100, 50
TOLERANCE = 1e-5
SHAPES = [(3, 4), (5,), (), (2, 3, 4), (3,)]
LABELS = [0, 1, 1, 0, 2]  # leaf i belongs to group LABELS[i]
DEFAULTS: dict[str, Any] = dict(lr=0.01, momentum=0.9)
GROUPS = [
    dict(weight_decay=0.01),
    dict(lr=0.05, alpha=0.9, centered=True, momentum=0),
    dict(maximize=True, eps=1e-6, centered=True),
]


def warmup(t):
    return 0.1 + 0.9 * min(t, 80) / 80


# Per group, the LambdaLR multiplier and the same rate as an optax schedule of the count.
LAMBDAS = [warmup, lambda t: 1.0, lambda t: 0.97**t]


def schedules():
    rates = [group.get("lr", DEFAULTS["lr"]) for group in GROUPS]
    return [
        optax.linear_schedule(0.1 * rates[0], rates[0], transition_steps=80),
        rates[1],
        optax.exponential_decay(rates[2], transition_steps=1, decay_rate=0.97),
    ]


def problem(seed):
    params, grads = conformance_problem(seed, SHAPES, STEPS)
    rng = np.random.default_rng(seed + 100)
    # The last leaf is complex: torch updates it as view_as_real pairs.
    params[4] = (params[4] + 1j * rng.normal(size=3)).astype(np.complex64)
    grads[4] = (grads[4] + 1j * rng.normal(size=grads[4].shape)).astype(np.complex64)
    return params, grads


def new_torch(torch, params, groups=GROUPS, names=False):
    tensors = [torch.tensor(p) for p in params]
    members = [
        [(f"leaf{i}", t) if names else t for i, t in enumerate(tensors) if LABELS[i] == g]
        for g in range(len(groups))
    ]
    optimizer = torch.optim.RMSprop(
        [{"params": m, **group} for m, group in zip(members, groups, strict=True)], **DEFAULTS
    )
    return tensors, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, LAMBDAS)


def run_torch(torch, tensors, optimizer, scheduler, grads, steps):
    history = []
    for t in steps:
        for tensor, g in zip(tensors, grads, strict=True):
            tensor.grad = torch.tensor(g[t])
        optimizer.step()
        scheduler.step()
        history.append([x.detach().numpy().copy() for x in tensors])
    return [np.stack([h[i] for h in history]) for i in range(len(tensors))]


def ours(labels=LABELS):
    groups = [group | {"lr": lr} for group, lr in zip(GROUPS, schedules(), strict=True)]
    return rj.compat.torch_rmsprop_groups(groups, labels, **DEFAULTS)


@pytest.mark.conformance
@pytest.mark.parametrize("labels", ["tree", "function"])
def test_three_groups_with_their_own_options_and_schedules_follow_torch(torch, labels):
    params, grads = problem(seed=0)
    tensors, optimizer, scheduler = new_torch(torch, params)
    theirs = run_torch(torch, tensors, optimizer, scheduler, grads, range(STEPS))
    tx = ours(LABELS if labels == "tree" else lambda p: [LABELS[i] for i in range(len(p))])
    _, trajectory = run_trajectory(tx, params, grads)
    worst = max_error_relative_to_leaf_scale(trajectory, theirs)
    print(f"3 torch param groups, {STEPS} steps: worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE


@pytest.mark.conformance
@pytest.mark.parametrize("names", [True, False], ids=["by-name", "by-order"])
def test_multi_group_state_crosses_over_in_both_directions(torch, names):
    params, grads = problem(seed=1)
    tensors, optimizer, scheduler = new_torch(torch, params, names=names)
    full = run_torch(torch, tensors, optimizer, scheduler, grads, range(STEPS))
    full_state = optimizer.state_dict()

    tensors, optimizer, scheduler = new_torch(torch, params, names=names)
    run_torch(torch, tensors, optimizer, scheduler, grads, range(SPLIT))
    halfway = {f"leaf{i}": t.detach().numpy().copy() for i, t in enumerate(tensors)}
    # A dict tree sorts its keys, so leaf10 would precede leaf2; here there are five leaves.
    tx = ours({name: LABELS[i] for i, name in enumerate(halfway)})
    state = rj.compat.state_from_torch(optimizer.state_dict(), halfway, tx)

    rest = {f"leaf{i}": jnp.asarray(g[SPLIT:]) for i, g in enumerate(grads)}
    state, trajectory = run_trajectory(tx, halfway, rest, state=state)
    final = jax.tree.map(lambda h: h[-1], trajectory)
    worst = max_error_relative_to_leaf_scale(
        [trajectory[f"leaf{i}"] for i in range(5)], [h[SPLIT:] for h in full]
    )
    print(f"torch {SPLIT} steps in 3 groups, then here: worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE

    ported = rj.compat.state_to_torch(state, final, full_state["param_groups"])
    assert sorted(ported["state"]) == sorted(full_state["state"])
    for index, entry in full_state["state"].items():
        assert set(ported["state"][index]) == set(entry)
        for key, value in entry.items():
            np.testing.assert_allclose(
                ported["state"][index][key].numpy(), value.numpy(), rtol=1e-4, atol=1e-6
            )
    _, fresh, _ = new_torch(torch, params, names=names)
    fresh.load_state_dict(ported)


@pytest.mark.conformance
@pytest.mark.parametrize("names", [True, False], ids=["by-name", "by-order"])
def test_groups_that_do_not_match_torch_groups_are_refused(torch, names):
    params, grads = problem(seed=2)
    tensors, optimizer, scheduler = new_torch(torch, params, names=names)
    run_torch(torch, tensors, optimizer, scheduler, grads, range(2))
    tree = {f"leaf{i}": p for i, p in enumerate(params)}
    # leaf0 moves to group 1, so groups 0 and 1 hold 1 and 3 leaves where torch has 2 and 2.
    swapped = dict(zip(tree, [1, 1, 1, 0, 2], strict=True))
    message = "not exactly one torch group's" if names else r"param_groups\[0\] has 2 parameters"
    with pytest.raises(ValueError, match=message):
        rj.compat.state_from_torch(optimizer.state_dict(), tree, ours(swapped))
    with pytest.raises(ValueError, match="holds 2 `torch_rmsprop` groups but the torch"):
        rj.compat.state_from_torch(
            optimizer.state_dict(),
            tree,
            rj.compat.torch_rmsprop_groups([{}, {}], dict(zip(tree, [0, 0, 1, 1, 1], strict=True))),
        )


def test_group_options_fall_back_to_the_defaults_and_bad_ones_are_named():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    tx = rj.compat.torch_rmsprop_groups(
        {"decay": {"lr": 0.1}, "plain": {}}, {"w": "decay", "b": "plain"}
    )
    updates, _ = tx.update(params, tx.init(params), params)
    alone, _ = rj.compat.torch_rmsprop(0.1).update(
        params, rj.compat.torch_rmsprop(0.1).init(params), params
    )
    default, _ = rj.compat.torch_rmsprop().update(
        params, rj.compat.torch_rmsprop().init(params), params
    )
    np.testing.assert_array_equal(updates["w"], alone["w"])
    np.testing.assert_array_equal(updates["b"], default["b"])
    with pytest.raises(ValueError, match=r"param_groups\['plain'\] has options \['betas'\]"):
        rj.compat.torch_rmsprop_groups({"plain": {"betas": (0.9, 0.99)}}, {"w": "plain"})
    with pytest.raises(ValueError, match=r"param_groups\[1\]: `alpha`"):
        rj.compat.torch_rmsprop_groups([{}, {"alpha": 2.0}], [0, 1])
    with pytest.raises(ValueError, match="label 'other', which names no group"):
        rj.compat.torch_rmsprop_groups({"a": {}}, {"w": "a", "b": "other"}).init(params)
    with pytest.raises(ValueError, match="empty"):
        rj.compat.torch_rmsprop_groups([], [])
    # A label tree that is no prefix of the parameters: optax's pytree error named neither.
    with pytest.raises(ValueError, match=r"`param_labels` must have the structure of the param"):
        rj.compat.torch_rmsprop_groups([{}], {"w": 0}).init(params)
    labels_of = lambda p: {"w": 0, "b": {"x": 0}}  # noqa: E731
    with pytest.raises(ValueError, match=r"`param_labels` .* got PyTreeDef\(\{'b': \{'x'"):
        rj.compat.torch_rmsprop_groups([{}], labels_of).init(params)


def test_groups_work_inside_an_nnx_optimizer_under_nnx_jit():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))

    def labels(tree):  # kernels decay, biases do not
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "kernel" if "kernel" in jax.tree_util.keystr(path) else "bias", tree
        )

    tx = rj.compat.torch_rmsprop_groups(
        {"kernel": {"weight_decay": 0.1}, "bias": {"lr": 0.05}}, labels, momentum=0.9
    )
    start = nnx.state(model, nnx.Param)
    reference_params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(start))
    initial = [np.array(leaf) for leaf in jax.tree.leaves(reference_params)]
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)

    def loss(m):
        return jnp.sum(jnp.tanh(m(x)) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(loss)(model)
        optimizer.update(model, grads)

    reference = nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1))
    )
    graphdef = nnx.graphdef(reference)
    state = tx.init(reference_params)
    for _ in range(5):
        train_step(model, optimizer)
        ref_model = nnx.merge(graphdef, reference_params)
        grads = nnx.to_pure_dict(nnx.state(nnx.grad(loss)(ref_model), nnx.Param))
        updates, state = tx.update(grads, state, reference_params)
        reference_params = optax.apply_updates(reference_params, updates)
    ours_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(ours_params), jax.tree.leaves(reference_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    moved = [
        not np.allclose(a, b) for a, b in zip(jax.tree.leaves(ours_params), initial, strict=True)
    ]
    assert all(moved)


@pytest.mark.conformance
def test_the_param_groups_of_a_torch_state_dict_build_the_same_optimizer(torch):
    params, grads = problem(seed=3)
    tensors = [torch.tensor(p) for p in params]
    optimizer = torch.optim.RMSprop(
        [
            {"params": [(f"leaf{i}", tensors[i]) for i in (0, 3)], "weight_decay": 0.01},
            {"params": [(f"leaf{i}", tensors[i]) for i in (1, 2, 4)], "lr": 0.05, "alpha": 0.9},
        ],
        lr=0.01,
        momentum=0.9,
        centered=True,
    )
    # A scheduler records `initial_lr` in every group; a constant one leaves the rate alone.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
    groups = optimizer.state_dict()["param_groups"]
    assert "initial_lr" in groups[0] and "param_names" in groups[0]
    steps = 30
    theirs = run_torch(
        torch, tensors, optimizer, scheduler, [g[:steps] for g in grads], range(steps)
    )
    tx = rj.compat.torch_rmsprop_groups(groups, [0, 1, 1, 0, 1])
    _, ours = run_trajectory(tx, params, [g[:steps] for g in grads])
    assert max_error_relative_to_leaf_scale(ours, theirs) <= TOLERANCE
