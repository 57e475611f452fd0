"""Presets and state conversion for `jax.example_libraries.optimizers.rmsprop(_momentum)`."""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import conformance_problem, max_error_relative_to_leaf_scale, run_trajectory
from jax.example_libraries import optimizers

import rmsprop_jax as rj

STEPS, SPLIT = 100, 50
SHAPES = [(3, 4), (5,), ()]
TOLERANCE = 1e-6


def schedule(i):
    return 0.01 * jnp.exp(-0.02 * i)


CASES = {
    "rmsprop": (optimizers.rmsprop, rj.compat.example_libraries_rmsprop, dict(gamma=0.8)),
    "rmsprop_momentum": (
        optimizers.rmsprop_momentum,
        rj.compat.example_libraries_rmsprop_momentum,
        dict(gamma=0.85, eps=1e-6, momentum=0.7),
    ),
}


def theirs(make, params, grads, steps, state=None, **kwargs):
    init, update, get_params = make(schedule, **kwargs)
    state = init(params) if state is None else state
    step = jax.jit(update)
    history = []
    for i in steps:
        state = step(i, [g[i] for g in grads], state)
        history.append(get_params(state))
    return state, [np.stack([h[k] for h in history]) for k in range(len(params))]


def ours(tx, params, grads, steps, state):
    s, history = run_trajectory(tx, list(params), list(grads), steps, state)
    return [h[-1] for h in history], s, [np.asarray(h) for h in history]


@pytest.mark.conformance
@pytest.mark.parametrize("name", list(CASES))
def test_preset_and_state_conversion_follow_the_example_library(name):
    make, preset, kwargs = CASES[name]
    params, grads = conformance_problem(11, SHAPES, STEPS)
    params = [jnp.asarray(p) for p in params]
    _, full = theirs(make, params, grads, range(STEPS), **kwargs)

    tx = preset(schedule, **kwargs)
    _, _, trajectory = ours(tx, params, grads, slice(0, STEPS), tx.init(params))
    worst = max_error_relative_to_leaf_scale(trajectory, full)
    print(f"{name} preset, {STEPS} steps: worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE

    # Theirs for SPLIT steps, then ours from the converted state.
    state, _ = theirs(make, params, grads, range(SPLIT), **kwargs)
    halfway, opt_state = rj.compat.state_from_example_libraries(state, tx, step=SPLIT)
    _, _, rest = ours(tx, halfway, grads, slice(SPLIT, STEPS), opt_state)
    worst_from = max_error_relative_to_leaf_scale(rest, [h[SPLIT:] for h in full])
    # Ours for SPLIT steps, then theirs from the converted state.
    p, s, _ = ours(tx, params, grads, slice(0, SPLIT), tx.init(params))
    back = rj.compat.state_to_example_libraries(s, p)
    _, rest = theirs(make, params, grads, range(SPLIT, STEPS), state=back, **kwargs)
    worst_to = max_error_relative_to_leaf_scale(rest, [h[SPLIT:] for h in full])
    print(f"{name} converted at {SPLIT}: {worst_from:.2e} (to optax), {worst_to:.2e} (back)")
    assert max(worst_from, worst_to) <= TOLERANCE


def test_a_state_of_the_other_variant_is_refused():
    params = [jnp.ones(3)]
    init, _, _ = optimizers.rmsprop_momentum(0.1)
    with pytest.raises(ValueError, match="Use `example_libraries_rmsprop_momentum`"):
        rj.compat.state_from_example_libraries(
            init(params), rj.compat.example_libraries_rmsprop(0.1)
        )
    with pytest.raises(ValueError, match=r"must be a jax\.example_libraries"):
        rj.compat.state_from_example_libraries((params,), rj.compat.example_libraries_rmsprop(0.1))


def test_careless_arguments_are_named():
    params = [jnp.ones(3), jnp.ones((2, 2))]
    init, _, _ = optimizers.rmsprop(0.1)
    tx = rj.compat.example_libraries_rmsprop(0.1)
    with pytest.raises(TypeError, match=r"`optimizer` must be an optax\.GradientTransformation"):
        rj.compat.state_from_example_libraries(init(params), rj.compat.example_libraries_rmsprop)
    # A negative or fractional step became the step count as it was.
    with pytest.raises(ValueError, match="`step` must be >= 0, got -1"):
        rj.compat.state_from_example_libraries(init(params), tx, step=-1)
    for step in (2.5, True, "3"):
        with pytest.raises(TypeError, match=r"`step` must be an integer, got " + repr(step)):
            # Mistyped on purpose.
            rj.compat.state_from_example_libraries(init(params), tx, step=cast(Any, step))
    _, state = rj.compat.state_from_example_libraries(init(params), tx, step=jnp.int32(3))
    assert int(state[2].count) == 3
    # Past int32, the count raised an OverflowError naming no argument.
    for step in (2**31, np.int64(2**40)):
        with pytest.raises(ValueError, match=r"`step` must be one whole number from 0 to 2\*\*31"):
            rj.compat.state_from_example_libraries(init(params), tx, step=step)
    # Parameters of other shapes: zip's "argument 2 is longer than argument 1" before, and
    # with as many leaves as the state, a state of mismatched arrays.
    for other in ([jnp.ones(3)], [jnp.ones(2), jnp.ones((3, 3))]):
        with pytest.raises(ValueError, match=r"`params` has leaves of shapes .* keeps statistics"):
            rj.compat.state_to_example_libraries(tx.init(params), other)


@pytest.mark.parametrize(
    ("position", "value", "message"),
    [
        (1, np.nan, r"example-library avg_sq_grad of leaf 1 holds 1 NaN entries of 4"),
        (1, -0.5, r"avg_sq_grad of leaf 1 holds 1 negative entries of 4 \(the first -0\.5\)"),
        (2, np.nan, r"example-library mom of leaf 1 holds 1 NaN entries"),
    ],
    ids=["nan-square", "negative-square", "nan-buffer"],
)
def test_a_diverged_or_edited_state_is_refused_naming_the_leaf(position, value, message):
    # Imported as it was, each made every later update of the leaf NaN.
    params = [jnp.ones(3), jnp.ones((2, 2))]
    init, update, _ = optimizers.rmsprop_momentum(0.1, momentum=0.9)
    state = update(0, [jnp.full(3, 0.5), jnp.full((2, 2), -0.5)], init(params))
    packed = [list(leaf) for leaf in state.packed_state]
    packed[1][position] = packed[1][position].at[1, 0].set(value)
    edited = optimizers.OptimizerState(
        [tuple(leaf) for leaf in packed], state.tree_def, state.subtree_defs
    )
    tx = rj.compat.example_libraries_rmsprop_momentum(0.1, momentum=0.9)
    with pytest.raises(ValueError, match=message):
        rj.compat.state_from_example_libraries(edited, tx, step=1)


@pytest.mark.parametrize("name", list(CASES))
def test_complex_parameters_are_refused_as_the_library_squares_them_as_g_times_g(name):
    # The library's "mean square" of a complex gradient is the complex g * g, so the presets
    # (|g|**2) followed no trajectory of it, and its imported state lost the imaginary parts.
    make, preset, kwargs = CASES[name]
    params = [jnp.ones(3), jnp.array([1 + 1j, 2 - 1j], jnp.complex64)]
    tx = preset(0.1, **kwargs)
    message = r"Parameter at \[1\] is complex .* jax\.example_libraries\.optimizers squares"
    with pytest.raises(TypeError, match=message):
        tx.init(params)
    init, update, _ = make(0.1, **kwargs)
    grads = [jnp.ones(3), jnp.array([0.5 + 0.5j, -0.5j], jnp.complex64)]
    with pytest.raises(TypeError, match=message):
        rj.compat.state_from_example_libraries(update(0, grads, init(params)), tx, step=1)
