"""Sweeps: every hyperparameter vmaps, one compilation serves many grids, float32 throughout."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, cast

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax as rj

STEPS = 12
# A quadratic bowl far from the start, plus fixed per-step gradient noise (as from minibatches):
# gradients stay large and varied, so the one-ulp differences between vectorized and scalar
# code are not amplified by cancellation (as they are near the optimum, or in the centered
# variance of constant gradients) and results can be compared to 1e-6.
TARGET = {"w": jnp.linspace(50.0, 100.0, 7), "b": jnp.array([-60.0, 70.0, 80.0])}
CURVATURE = {"w": jnp.linspace(0.5, 1.5, 7), "b": jnp.array([1.0, 0.7, 1.3])}
NOISE = {
    "w": 80 * jax.random.normal(jax.random.key(0), (STEPS, 7)),
    "b": 80 * jax.random.normal(jax.random.key(1), (STEPS, 3)),
}


def loss_fn(params, noise):
    # Elementwise, so the gradient has no reduction whose order could differ under vmap.
    terms = jax.tree.map(
        lambda p, t, c, n: c * (p - t) ** 2 + n * p, params, TARGET, CURVATURE, noise
    )
    return sum(jnp.sum(x) for x in jax.tree.leaves(terms))


def initial_params(dtype=jnp.float32):
    return {"w": jnp.zeros(7, dtype), "b": jnp.linspace(-1.0, 1.0, 3).astype(dtype)}


def make_train(optimizer_factory, dtype=jnp.float32):
    """`train(**hyperparameters)`: STEPS optimizer steps; returns final params and state."""

    def train(**hyperparameters):
        optimizer = optimizer_factory(**hyperparameters)
        params = initial_params(dtype)

        def step(carry, noise):
            params, state = carry
            grads = jax.grad(loss_fn)(params, noise)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(step, (params, optimizer.init(params)), NOISE)
        return {"params": params, "state": state}

    return train


def assert_close(actual, desired, rtol=1e-6):
    """Equal within `rtol` relative to the largest magnitude in the array.

    Relative to each element would fail on elements that cancellation brought near zero,
    where one ulp of a larger intermediate is a large relative error.
    """
    # In float64: NumPy 1.x cannot promote bfloat16 in `isclose`, and float64 holds every
    # lower-precision value exactly.
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    atol = rtol * float(np.max(np.abs(desired), initial=0.0))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol)


VALUES = {
    "learning_rate": [1e-3, 3e-2, 1e-1, 0.3],
    "decay": [0.5, 0.8, 0.95, 0.999],
    "eps": [0.0, 1e-2, 1.0, 30.0],
    "initial_scale": [0.0, 1e2, 1e4, 1e5],
    "momentum": [0.0, 0.3, 0.6, 0.9],
    "weight_decay": [0.0, 1e-3, 0.1, 1.0],
}
# The framework presets' names for the same quantities.
VALUES.update(lr=VALUES["learning_rate"], alpha=VALUES["decay"], rho=VALUES["decay"])
VALUES.update(epsilon=VALUES["eps"])

CASES = {
    "learning_rate": lambda learning_rate: rj.rmsprop(learning_rate),
    "learning_rate_in_schedule": lambda learning_rate: rj.rmsprop(
        optax.exponential_decay(learning_rate, transition_steps=3, decay_rate=0.5)
    ),
    "decay": lambda decay: rj.rmsprop(0.05, decay),
    "eps": lambda eps: rj.rmsprop(0.05, eps=eps),
    "eps_in_sqrt": lambda eps: rj.rmsprop(0.05, eps=eps, eps_in_sqrt=True),
    "initial_scale": lambda initial_scale: rj.rmsprop(0.05, initial_scale=initial_scale),
    "momentum": lambda momentum: rj.rmsprop(0.05, momentum=momentum),
    "nesterov": lambda momentum: rj.rmsprop(0.05, momentum=momentum, nesterov=True),
    "coupled_weight_decay": lambda weight_decay: rj.rmsprop(0.05, weight_decay=weight_decay),
    "decoupled_weight_decay": lambda weight_decay: rj.rmsprop(
        0.05, weight_decay=weight_decay, decoupled_weight_decay=True
    ),
    "centered_with_momentum": lambda decay, eps, momentum: rj.rmsprop(
        0.05, decay, eps, centered=True, momentum=momentum
    ),
    "bias_correction_with_momentum": lambda learning_rate, decay, momentum: rj.rmsprop(
        learning_rate, decay, bias_correction=True, momentum=momentum, nesterov=True
    ),
    "all_at_once": lambda learning_rate, decay, eps, initial_scale, momentum, weight_decay: (
        rj.rmsprop(
            learning_rate,
            decay,
            eps,
            initial_scale=initial_scale,
            centered=True,
            momentum=momentum,
            weight_decay=weight_decay,
            decoupled_weight_decay=True,
        )
    ),
    "scale_by_rms": lambda decay, eps, initial_scale: optax.chain(
        rj.scale_by_rms(decay, eps, initial_scale=initial_scale, bias_correction=True),
        optax.scale(-0.05),
    ),
    "scale_by_rms_centered": lambda decay, eps: optax.chain(
        rj.scale_by_rms(decay, eps, centered=True), optax.scale(-0.05)
    ),
    "torch": lambda lr, alpha, eps, weight_decay, momentum: rj.compat.torch_rmsprop(
        lr, alpha, eps, weight_decay, momentum
    ),
    "torch_centered": lambda lr, alpha, momentum: rj.compat.torch_rmsprop(
        lr, alpha, momentum=momentum, centered=True
    ),
    "keras": lambda learning_rate, rho, momentum, epsilon, weight_decay: rj.compat.keras_rmsprop(
        learning_rate, rho, momentum, epsilon, weight_decay=weight_decay
    ),
    "keras_centered": lambda learning_rate, rho, epsilon: rj.compat.keras_rmsprop(
        learning_rate, rho, epsilon=epsilon, centered=True
    ),
    "tf1": lambda learning_rate, decay, momentum, epsilon: rj.compat.tf1_rmsprop(
        learning_rate, decay, momentum, epsilon, centered=True
    ),
}


def case_grid(factory):
    names = factory.__code__.co_varnames[: factory.__code__.co_argcount]
    # Zipped, with the lists rotated so that no two names vary in lockstep.
    lists = {name: np.roll(VALUES[name], i) for i, name in enumerate(names)}
    # bias correction needs decay < 1 and the schedule's log-spacing keeps lr > 0 anyway.
    return rj.sweep.grid(product=False, **lists)


@pytest.mark.parametrize("case", list(CASES))
def test_vmapped_sweep_equals_each_configuration_run_alone(case, maybe_jit):
    train = make_train(CASES[case])
    hyperparameters = case_grid(CASES[case])
    swept = rj.sweep.run(train, hyperparameters)
    if maybe_jit is not jax.jit:  # plain `jax.vmap`, outside any jit, gives the same
        jax.tree.map(assert_close, jax.vmap(train)(**hyperparameters), swept.results)
    train_alone = maybe_jit(train)
    for i in range(swept.size):
        alone = train_alone(**{k: v[i] for k, v in hyperparameters.items()})
        mine = jax.tree.map(lambda x, i=i: x[i], swept.results)
        # The configurations differ, so equal results also show each got its own values.
        jax.tree.map(assert_close, mine, alone)
    finals = np.asarray(swept.results["params"]["w"])
    assert len({row.tobytes() for row in finals}) == swept.size


def numpy_centered_momentum_rmsprop(
    learning_rate, decay, eps, initial_scale, momentum, weight_decay
):
    """Float64 reference of the `all_at_once` case, written from the equations."""
    final = {}
    for name, p in initial_params().items():
        p = np.asarray(p, np.float64)
        target, curvature = (np.asarray(x[name], np.float64) for x in (TARGET, CURVATURE))
        nu, mu, buf = np.full_like(p, initial_scale), np.zeros_like(p), np.zeros_like(p)
        for noise in np.asarray(NOISE[name], np.float64):
            g = 2 * curvature * (p - target) + noise
            nu = decay * nu + (1 - decay) * g**2
            mu = decay * mu + (1 - decay) * g
            buf = momentum * buf + learning_rate * g / (np.sqrt(np.maximum(nu - mu**2, 0)) + eps)
            p = p - buf - learning_rate * weight_decay * p
        final[name] = p
    return final


def test_vmapped_sweep_matches_float64_reference_for_every_configuration():
    hyperparameters = rj.sweep.grid(
        learning_rate=[1e-2, 1e-1], decay=[0.9, 0.99], eps=[0.0, 1.0], initial_scale=[0.0, 1e3],
        momentum=[0.0, 0.9], weight_decay=[0.0, 0.1],
    )  # fmt: skip
    swept = rj.sweep.run(make_train(CASES["all_at_once"]), hyperparameters)
    assert swept.size == 64
    for i in range(swept.size):
        c = swept.config(i)
        expected = numpy_centered_momentum_rmsprop(**c)
        for name, p in expected.items():
            assert_close(swept.results["params"][name][i], p, rtol=1e-5)


def test_second_sweep_with_new_values_of_same_shape_does_not_retrace():
    traces = []

    def train(learning_rate, decay):
        traces.append(1)  # runs once per trace, never at execution
        return make_train(lambda learning_rate, decay: rj.rmsprop(learning_rate, decay))(
            learning_rate=learning_rate, decay=decay
        )["params"]

    first = rj.sweep.run(train, rj.sweep.grid(learning_rate=[0.01, 0.1], decay=[0.9, 0.99]))
    second = rj.sweep.run(train, rj.sweep.grid(learning_rate=[0.02, 0.2], decay=[0.5, 0.8]))
    assert len(traces) == 1
    assert not np.allclose(first.results["w"], second.results["w"])
    rj.sweep.run(train, rj.sweep.grid(learning_rate=[0.01, 0.1, 0.3], decay=[0.9]))
    assert len(traces) == 2  # a new grid size is a new program, so the counter does count


def test_training_in_chunks_compiles_once_and_equals_one_long_run():
    traces = []

    def train_chunk(carry, learning_rate, momentum):
        traces.append(1)
        optimizer = rj.rmsprop(learning_rate, momentum=momentum)
        params, state = carry if carry is not None else (initial_params(), None)
        state = optimizer.init(params) if state is None else state

        def step(carry, noise):
            params, state = carry
            updates, state = optimizer.update(jax.grad(loss_fn)(params, noise), state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), jax.tree.map(lambda n: n[:4], NOISE))[0]

    hyperparameters = rj.sweep.grid(learning_rate=[0.01, 0.1], momentum=[0.0, 0.5])
    # The first chunk builds the state, so later chunks all have one shape.
    carry = rj.sweep.run(lambda **hp: train_chunk(None, **hp), hyperparameters).results
    for _ in range(3):
        carry = rj.sweep.run(train_chunk, hyperparameters, carry, in_axes=0).results
    assert len(traces) == 2

    def whole(learning_rate, momentum):
        carry = train_chunk(None, learning_rate, momentum)
        for _ in range(3):
            carry = train_chunk(carry, learning_rate, momentum)
        return carry

    expected = rj.sweep.run(whole, hyperparameters).results
    jax.tree.map(assert_close, carry, expected)


def _hyperparameter_only_dtypes(jaxpr, tainted, constant=()):
    """Dtypes of every value computed from the hyperparameters alone, sub-programs included."""
    tainted, constant, dtypes = set(tainted), set(constant), []
    literal = jax.extend.core.Literal
    for eqn in jaxpr.eqns:
        ins = [v for v in eqn.invars if not isinstance(v, literal) and v not in constant]
        if ins and all(v in tainted for v in ins):
            tainted.update(eqn.outvars)
            dtypes += [v.aval.dtype for v in eqn.outvars]
        for sub in (p for p in eqn.params.values() if isinstance(p, jax.extend.core.ClosedJaxpr)):
            pairs = list(zip(sub.jaxpr.invars, eqn.invars, strict=False))
            inner_tainted = {i for i, o in pairs if not isinstance(o, literal) and o in tainted}
            inner_constant = {i for i, o in pairs if isinstance(o, literal) or o in constant}
            dtypes += _hyperparameter_only_dtypes(sub.jaxpr, inner_tainted, inner_constant)
    return dtypes


def test_bf16_params_never_round_a_hyperparameter_to_bf16():
    def update(learning_rate, decay, eps, momentum, weight_decay, params):
        optimizer = rj.rmsprop(
            learning_rate, decay, eps, centered=True, momentum=momentum, weight_decay=weight_decay
        )
        return optimizer.update(params, optimizer.init(params), params)

    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), TARGET)
    hyperparameters = [jnp.full(4, 0.1, jnp.float32)] * 5
    closed = jax.make_jaxpr(jax.vmap(update, in_axes=(0, 0, 0, 0, 0, None)))(
        *hyperparameters, params
    )
    dtypes = _hyperparameter_only_dtypes(closed.jaxpr, closed.jaxpr.invars[:5])
    assert dtypes and all(dtype == jnp.float32 for dtype in dtypes), set(dtypes)


def test_bf16_params_sweep_equals_explicit_float32_hyperparameter_computation():
    # Fixed bfloat16 gradients: under jit XLA may keep bfloat16 intermediates of a gradient
    # computation in float32, which would blur the comparison with an eager reference.
    grads = jax.tree.map(lambda n: (n + 30).astype(jnp.bfloat16), NOISE)

    def train(learning_rate, decay):
        optimizer = rj.rmsprop(learning_rate, decay, momentum=0.5)
        params = initial_params(jnp.bfloat16)

        def step(carry, g):
            params, state = carry
            updates, state = optimizer.update(g, state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, optimizer.init(params)), grads)[0]

    # Neither value is a bfloat16 number: rounding them would change nu by ~17% (decay) or
    # the momentum buffer by 0.05% (learning rate).
    hyperparameters = rj.sweep.grid(product=False, learning_rate=[1e-3, 0.03], decay=[0.99, 0.9])
    params, (_, _, rms, _, trace, _) = rj.sweep.run(train, hyperparameters).results
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((rms.nu, trace.trace)))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    for i in range(2):
        lr, decay = (np.float32(v[i]) for v in hyperparameters.values())
        for name, p in initial_params(jnp.bfloat16).items():
            nu = buf = np.zeros(p.shape, np.float32)
            for g in np.asarray(grads[name], np.float32):
                nu = (1 - decay) * (g * g) + decay * nu
                buf = -lr * (g / (np.sqrt(nu) + np.float32(1e-8))) + np.float32(0.5) * buf
                p = p + buf.astype(jnp.bfloat16)
            assert_close(rms.nu[name][i], nu)
            assert_close(trace.trace[name][i], buf)
            np.testing.assert_array_equal(params[name][i], p)


def test_inject_hyperparams_stores_bf16_hyperparameters_for_bf16_params_unless_told_float32():
    params = {"w": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.bfloat16)}
    grads = {"w": jnp.linspace(0.5, 3.0, 5, dtype=jnp.bfloat16)}

    def one_update(optimizer):
        state = optimizer.init(params)
        updates, state = optimizer.update(grads, state, params)
        updates, state = optimizer.update(grads, state, params)
        return updates["w"], state

    exact = rj.rmsprop(np.float32(1e-3), np.float32(0.99), momentum=np.float32(0.5))
    expected, _ = one_update(exact)
    # optax casts stored hyperparameters to the parameter dtype (here: rounds them) ...
    default = optax.inject_hyperparams(rj.rmsprop)(learning_rate=1e-3, decay=0.99, momentum=0.5)
    updates, state = one_update(default)
    assert state.hyperparams["learning_rate"].dtype == jnp.bfloat16
    assert state.hyperparams["learning_rate"] != np.float32(1e-3)
    # ... but the optimizer widens them again, so the arithmetic and the state stay float32.
    assert state.inner_state[2].nu["w"].dtype == jnp.float32
    rounded = [np.float32(jnp.bfloat16(v)) for v in (1e-3, 0.99, 0.5)]
    from_rounded, _ = one_update(rj.rmsprop(rounded[0], rounded[1], momentum=rounded[2]))
    np.testing.assert_array_equal(updates, from_rounded)
    # hyperparam_dtype=float32 keeps the values exact.
    float32 = optax.inject_hyperparams(rj.rmsprop, hyperparam_dtype=jnp.float32)
    updates, state = one_update(float32(learning_rate=1e-3, decay=0.99, momentum=0.5))
    assert state.hyperparams["decay"].dtype == jnp.float32
    np.testing.assert_array_equal(updates, expected)


def test_inject_hyperparams_in_a_sweep_equals_plain_rmsprop():
    hyperparameters = rj.sweep.grid(learning_rate=[1e-3, 0.03], decay=[0.99, 0.9])
    injected = optax.inject_hyperparams(rj.rmsprop, hyperparam_dtype=jnp.float32)
    swept = rj.sweep.run(make_train(injected, jnp.bfloat16), hyperparameters)
    plain = rj.sweep.run(make_train(rj.rmsprop, jnp.bfloat16), hyperparameters)
    assert swept.results["state"].hyperparams["learning_rate"].dtype == jnp.float32
    jax.tree.map(assert_close, swept.results["params"], plain.results["params"])
    jax.tree.map(assert_close, swept.results["state"].inner_state, plain.results["state"])


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("moment_storage", ["float32", "bfloat16", "int8", "factored"])
def test_every_moment_storage_format_sweeps_like_configurations_run_alone(moment_storage, centered):
    noise = jax.random.normal(jax.random.key(2), (6, 128, 128))  # large enough to be compressed

    def train(learning_rate, decay, eps, initial_scale, momentum):
        optimizer = rj.rmsprop(
            learning_rate, decay, eps, initial_scale=initial_scale, centered=centered,
            momentum=momentum, moment_storage=moment_storage,
        )  # fmt: skip

        def step(carry, n):
            params, state = carry
            updates, state = optimizer.update(2 * (params - 50.0) + 80 * n, state, params)
            return (params + updates, state), None

        params = jnp.zeros((128, 128))
        return jax.lax.scan(step, (params, optimizer.init(params)), noise)[0][0]

    hyperparameters = rj.sweep.grid(
        product=False, learning_rate=[0.01, 0.1, 0.03], decay=[0.9, 0.99, 0.5],
        eps=[1e-8, 1.0, 0.1], initial_scale=[0.0, 1.0, 100.0], momentum=[0.0, 0.5, 0.9],
    )  # fmt: skip
    swept = rj.sweep.run(train, hyperparameters)
    train_alone = jax.jit(train)
    for i in range(swept.size):
        alone = train_alone(**{k: v[i] for k, v in hyperparameters.items()})
        # Factored storage rebuilds nu from row and column sums, which adds a few ulps.
        assert_close(swept.results[i], alone, rtol=1e-5 if moment_storage == "factored" else 1e-6)


def test_grid_product_takes_every_combination_with_the_first_name_slowest():
    g = rj.sweep.grid(learning_rate=[0.1, 0.2, 0.3], decay=[0.9, 0.99])
    assert all(v.dtype == jnp.float32 and v.shape == (6,) for v in g.values())
    pairs = list(zip(g["learning_rate"].tolist(), g["decay"].tolist(), strict=True))
    expected = [(np.float32(a), np.float32(b)) for a in (0.1, 0.2, 0.3) for b in (0.9, 0.99)]
    assert pairs == expected


def test_grid_zipped_pairs_values_by_position_and_keeps_integer_seeds_integer():
    g = rj.sweep.grid(product=False, learning_rate=[0.1, 0.2], seed=[3, 4])
    assert g["learning_rate"].tolist() == [np.float32(0.1), np.float32(0.2)]
    assert g["seed"].dtype == jnp.int32 and g["seed"].tolist() == [3, 4]
    with pytest.raises(ValueError, match=r"same length.*'learning_rate': 2, 'decay': 3"):
        rj.sweep.grid(product=False, learning_rate=[0.1, 0.2], decay=[0.9, 0.99, 0.999])


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [
        (0.9, ValueError, "`decay` must be a non-empty 1-D sequence"),
        ([], ValueError, "`decay` must be a non-empty 1-D sequence"),
        ([[0.9]], ValueError, "`decay` must be a non-empty 1-D sequence"),
        ([0.9, float("nan")], ValueError, "`decay` must be finite"),
        ([True, False], TypeError, "`decay` must be real numbers.*booleans are refused"),
        ([0.9, True], TypeError, r"`decay` must be real numbers, got \[0.9, True\]: booleans"),
        ([1, np.True_], TypeError, "`decay` must be real numbers.*booleans are refused"),
        (np.array([True]), TypeError, "`decay` must be real numbers.*booleans are refused"),
        ([1j], TypeError, "`decay` must be real numbers"),
        ("0.9", ValueError, "`decay` must be a non-empty 1-D sequence"),
        (
            [0.9, [0.99]],
            ValueError,
            r"`decay` must be a flat list of numbers, got \[0.9, \[0.99\]\]",
        ),
        ([[0.9], [0.9, 0.99]], ValueError, "`decay` must be a flat list of numbers"),
        ([1, 2**31], ValueError, r"`decay` are integers.*2147483648 lies outside \[-2147483648, "),
        ([-(2**31) - 1], ValueError, r"`decay` are integers.*-2147483649 lies outside"),
        ([2**70], ValueError, r"`decay` are integers.*outside.*got \[1180591620717411303424\]"),
        (np.array([2**40], np.int64), ValueError, r"`decay` are integers.*1099511627776"),
        ([0.5, 1e39], ValueError, r"`decay` must fit in float32.*1e\+39 does not"),
        ([-1e39], ValueError, r"`decay` must fit in float32.*-1e\+39 does not"),
        ([0.5, 1e-50], ValueError, r"`decay` must be representable in float32, but 1e-50 rounds"),
        # Subnormal in float32, so flushed to 0 by XLA: accepted before.
        ([0.5, 1e-40], ValueError, r"`decay` must be representable in float32, but 1e-40 rounds"),
    ],
)
def test_grid_rejects_values_that_are_not_a_list_of_finite_numbers(values, error, message):
    with pytest.raises(error, match=message):
        rj.sweep.grid(decay=values)


def test_grid_keeps_the_extremes_of_int32_and_float32_exactly():
    smallest_normal = float(np.finfo(np.float32).smallest_normal)  # Below it, XLA reads 0.
    g = rj.sweep.grid(product=False, seed=[-(2**31), 2**31 - 1], scale=[3.4e38, smallest_normal])
    assert g["seed"].dtype == jnp.int32 and g["seed"].tolist() == [-(2**31), 2**31 - 1]
    assert g["scale"].dtype == jnp.float32
    assert g["scale"].tolist() == [np.float32(3.4e38), np.float32(smallest_normal)]
    assert rj.sweep.grid(decay=(0.0, 0.5))["decay"].tolist() == [0.0, 0.5]


def test_building_the_optimizer_from_the_whole_grid_checks_every_value():
    # Inside `train` the values are traced and cannot be checked, so check them up front.
    with pytest.raises(ValueError, match="`decay` must lie in"):
        rj.rmsprop(**cast(dict[str, Any], rj.sweep.grid(learning_rate=[0.1], decay=[0.9, 1.5])))


def quadratic_train(learning_rate, decay):
    return make_train(rj.rmsprop)(learning_rate=learning_rate, decay=decay)


def test_best_picks_the_lowest_or_highest_metric_and_skips_diverged_runs():
    result = rj.sweep.SweepResult(
        {"learning_rate": jnp.array([0.5, 0.25, 0.125]), "seed": jnp.array([1, 2, 3])},
        {"loss": jnp.array([2.0, jnp.nan, 1.0]), "curve": jnp.array([[3.0, 0], [1, 2], [4, 5]])},
    )
    best = result.best("loss")
    assert (best.index, best.value, best.hyperparameters) == (
        2, 1.0, {"learning_rate": 0.125, "seed": 3},
    )  # fmt: skip
    assert best.results["curve"].tolist() == [4.0, 5.0]
    assert result.best("loss", mode="max").index == 0
    assert result.best(lambda r: r["curve"][:, 0], mode="min").index == 1
    with pytest.raises(ValueError, match=r"shape \(3, 2\).*one number per configuration"):
        result.best("curve")
    with pytest.raises(KeyError, match="no entry 'accuracy'"):
        result.best("accuracy")
    with pytest.raises(ValueError, match="`mode` must be 'min' or 'max', got 'lowest'"):
        result.best("loss", mode="lowest")
    with pytest.raises(ValueError, match=r"No configuration is eligible.*every value is NaN"):
        result.best(lambda r: r["loss"] * jnp.nan)


@pytest.mark.parametrize(
    ("loss", "mode", "index"),
    [
        ([jnp.nan, jnp.inf, 2.0], "min", 2),
        ([jnp.nan, jnp.inf], "min", None),
        ([jnp.inf, jnp.nan, 5.0, -jnp.inf], "max", 0),  # +inf is a top score, not a divergence
        ([jnp.nan, -jnp.inf, 3.0, 7.0], "max", 3),
        ([-jnp.inf, jnp.nan], "max", None),
        ([jnp.nan, -jnp.inf, 1.0], "min", 1),  # -inf is the lowest a minimized metric can go
        ([4.0, jnp.nan, 1.0, 1.0], "min", 2),  # ties go to the first
    ],
)
def test_best_is_never_nan_nor_infinite_in_the_optimized_direction(loss, mode, index):
    result = rj.sweep.SweepResult(
        {"lr": jnp.arange(len(loss), dtype=jnp.float32)}, {"loss": jnp.array(loss)}
    )
    if index is None:
        with pytest.raises(ValueError, match=r"No configuration is eligible.*'loss'.*mode='"):
            result.best("loss", mode=mode)
        return
    best = result.best("loss", mode=mode)
    assert best.index == index
    assert best.value == loss[index] and best.hyperparameters == {"lr": float(index)}


def test_config_refuses_an_index_outside_the_sweep_instead_of_clamping():
    result = rj.sweep.SweepResult({"lr": jnp.array([0.5, 0.25, 0.125])}, {})
    assert result.config(-1) == {"lr": 0.125} and result.config(np.int64(1)) == {"lr": 0.25}
    for index in (3, -4, 100):
        with pytest.raises(IndexError, match=f"`index` {index} is out of range .* 3 config"):
            result.config(index)
    for index in cast(tuple[Any, ...], (1.0, True, "0")):  # mistyped on purpose
        with pytest.raises(TypeError, match=f"`index` must be an integer, got {index!r}"):
            result.config(index)


def test_run_checks_hyperparameters_given_as_lists_or_numpy_arrays_like_grid():
    def train(lr):
        return {"y": lr * 2}

    with pytest.raises(ValueError, match=r"`lr` are integers.*1099511627776 lies outside"):
        rj.sweep.run(train, {"lr": np.array([2**40, 1])})
    with pytest.raises(ValueError, match=r"`lr` must fit in float32.*1e\+39"):
        rj.sweep.run(train, {"lr": [0.1, 1e39]})
    result = rj.sweep.run(train, {"lr": [0.25, 0.5]})
    assert result.hyperparameters["lr"].dtype == jnp.float32
    assert result.results["y"].tolist() == [0.5, 1.0]


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf], ids=["nan", "inf", "-inf"])
def test_run_refuses_values_given_as_a_jax_array_that_are_not_finite(bad):
    # A JAX array skips the conversion of lists; a NaN rate gave a NaN result without a word.
    def train(lr):
        return {"y": 2.0 * lr}

    with pytest.raises(ValueError, match=r"The values of `lr` must be finite, got Array"):
        rj.sweep.run(train, {"lr": jnp.array([0.1, bad])})
    integers = rj.sweep.run(train, {"lr": jnp.array([1, 2])})  # nothing to check in integers
    assert integers.results["y"].tolist() == [2.0, 4.0]


@pytest.mark.parametrize("train", [None, "train", 3])
def test_run_refuses_a_train_that_is_not_a_function(train):
    # Python's "'str' object is not callable", from inside the traced sweep, before.
    with pytest.raises(TypeError, match=r"`train` must be a function .* got " + repr(train)):
        rj.sweep.run(train, {"lr": [0.1, 0.2]})


@pytest.mark.parametrize("hyperparameters", [[0.1, 0.2], (0.1,), None, np.array([0.1, 0.2])])
def test_run_refuses_hyperparameters_that_are_not_a_mapping_of_names(hyperparameters):
    with pytest.raises(TypeError, match=r"`hyperparameters` must be a mapping.*rj.sweep.grid"):
        rj.sweep.run(lambda lr: {"y": lr}, hyperparameters)


def test_flags_of_grid_and_run_must_be_bools_and_devices_not_empty():
    with pytest.raises(TypeError, match="`product` must be True or False, got 'no'"):
        rj.sweep.grid(product=cast(Any, "no"), a=[1.0, 2.0], b=[3.0, 4.0])  # not a `bool`
    grid = rj.sweep.grid(lr=[1.0, 2.0])
    with pytest.raises(TypeError, match="`shard` must be True or False, got 'False'"):
        rj.sweep.run(lambda lr: {"y": lr}, grid, shard=cast(Any, "False"))  # not a `bool`
    with pytest.raises(ValueError, match="`devices` is empty"):
        rj.sweep.run(lambda lr: {"y": lr}, grid, shard=True, devices=[])


@pytest.mark.parametrize("in_axes", [False, True, (0, False)])
def test_run_refuses_boolean_in_axes(in_axes):
    # False == 0 would map the argument over the sweep, the opposite of what False suggests.
    with pytest.raises(ValueError, match=re.escape(f"got {in_axes!r}")):
        rj.sweep.run(lambda x, y, lr: {"y": lr}, {"lr": jnp.ones(2)}, jnp.ones(2), jnp.ones(2),
                     in_axes=in_axes)  # fmt: skip


def test_best_reads_named_tuple_results_by_attribute():
    swept = rj.sweep.run(
        lambda learning_rate, decay: quadratic_train(learning_rate, decay)["state"][2],
        rj.sweep.grid(learning_rate=[0.01, 0.1], decay=[0.9]),
    )
    assert isinstance(swept.results, rj.ScaleByRmsState)
    assert swept.best("count").index == 0 and swept.best("count").value == STEPS


def test_run_names_the_argument_whose_shape_does_not_fit_the_grid():
    grid = rj.sweep.grid(learning_rate=[0.01, 0.1], decay=[0.9])
    with pytest.raises(ValueError, match=r"Argument 0 .* leading size 2, got shape \(3,\)"):
        rj.sweep.run(lambda x, **hp: x, grid, jnp.ones(3), in_axes=0)
    with pytest.raises(ValueError, match="`in_axes` must be 0, None"):
        rj.sweep.run(lambda x, **hp: x, grid, jnp.ones(3), in_axes=(1,))
    with pytest.raises(ValueError, match="1-D arrays of one length"):
        rj.sweep.run(quadratic_train, {"learning_rate": jnp.ones(2), "decay": jnp.ones(3)})
    with pytest.raises(ValueError, match="`hyperparameters` is empty"):
        rj.sweep.run(quadratic_train, {})


def test_shared_arguments_reach_every_configuration_unbatched():
    def train(data, scale):
        return {"scaled": scale * data}

    data = jnp.arange(5.0)
    swept = rj.sweep.run(train, rj.sweep.grid(scale=[1.0, 2.0, 3.0]), data)
    np.testing.assert_array_equal(swept.results["scaled"], np.outer([1, 2, 3], data))


def test_sharding_over_the_available_devices_gives_the_unsharded_results():
    # 8 configurations: a multiple of the device count with 1, 2, 4 or 8 devices.
    grid = rj.sweep.grid(learning_rate=[0.01, 0.03, 0.1, 0.3], decay=[0.9, 0.99])
    sharded = rj.sweep.run(quadratic_train, grid, shard=True)
    plain = rj.sweep.run(quadratic_train, grid)
    leaf = sharded.results["params"]["w"]
    assert isinstance(leaf.sharding, jax.sharding.NamedSharding)
    assert leaf.sharding.spec == jax.sharding.PartitionSpec(rj.sweep.SWEEP_AXIS)
    # Two programs (one per device count) may fuse differently: equal to float32 rounding.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        sharded.results,
        plain.results,
    )


@pytest.mark.slow  # trains the example's 64 configurations
def test_digits_sweep_example_writes_heatmap_and_names_the_best_configuration(
    tmp_path, capsys, monkeypatch
):
    pytest.importorskip("matplotlib")
    path = Path(__file__).resolve().parents[1] / "examples" / "sweep_digits.py"
    monkeypatch.syspath_prepend(str(path.parent))  # the examples import their shared modules
    spec = importlib.util.spec_from_file_location("sweep_digits_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(["--out", str(tmp_path), "--epochs", "2", "--epochs-per-chunk", "1"])
    assert summary["configurations"] == 64
    assert np.asarray(summary["train_loss_per_epoch"]).shape == (64, 2)
    assert (tmp_path / "heatmap.png").stat().st_size > 20_000
    saved = json.loads((tmp_path / "sweep.json").read_text())
    best = int(np.nanargmin(saved["val_loss"]))
    assert summary["best"]["learning_rate"] == saved["learning_rate"][best]
    assert summary["best"]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert "Best by validation loss" in capsys.readouterr().out
