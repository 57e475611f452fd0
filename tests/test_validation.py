"""Bad input fails loudly, naming the argument and the value; traced values are not checked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax as rj

BAD_RMSPROP_ARGUMENTS = [
    ("learning_rate", dict(learning_rate=-0.1), "-0.1"),
    ("learning_rate", dict(learning_rate=float("nan")), "nan"),
    ("decay", dict(decay=1.5), "1.5"),
    ("decay", dict(decay=-0.01), "-0.01"),
    ("eps", dict(eps=-1e-8), "-1e-08"),
    ("initial_scale", dict(initial_scale=-1.0), "-1.0"),
    ("momentum", dict(momentum=1.0), "1.0"),
    ("momentum", dict(momentum=-0.5), "-0.5"),
    ("weight_decay", dict(weight_decay=-1e-4), "-0.0001"),
    ("moment_storage", dict(moment_storage="float8"), "float8"),
    ("decay", dict(decay=jnp.asarray([0.9, 1.1])), "1.1"),
]


@pytest.mark.parametrize(("argument", "kwargs", "shown"), BAD_RMSPROP_ARGUMENTS)
def test_out_of_range_hyperparameters_raise_value_error_naming_argument_and_value(
    argument, kwargs, shown
):
    kwargs = {"learning_rate": 0.01, **kwargs}
    with pytest.raises(ValueError, match=argument) as error:
        rj.rmsprop(**kwargs)
    assert shown in str(error.value)


@pytest.mark.parametrize(
    ("argument", "kwargs"),
    [
        ("decay", dict(decay=2.0)),
        ("eps", dict(eps=-1.0)),
        ("initial_scale", dict(initial_scale=-2.0)),
    ],
)
def test_scale_by_rms_rejects_out_of_range_hyperparameters(argument, kwargs):
    with pytest.raises(ValueError, match=argument):
        rj.scale_by_rms(**kwargs)


def test_nesterov_without_momentum_is_rejected():
    with pytest.raises(ValueError, match="nesterov"):
        rj.rmsprop(0.01, nesterov=True)


def test_centered_with_bias_correction_is_rejected_as_degenerate():
    with pytest.raises(ValueError, match="degenerate"):
        rj.rmsprop(0.01, centered=True, bias_correction=True)
    with pytest.raises(ValueError, match="degenerate"):
        rj.scale_by_rms(centered=True, bias_correction=True)


def test_bias_correction_with_decay_one_is_rejected_instead_of_dividing_by_zero():
    with pytest.raises(ValueError, match="decay"):
        rj.rmsprop(0.01, decay=1.0, bias_correction=True)


def test_boundary_values_are_accepted():
    params = {"w": jnp.ones(3)}
    for kwargs in (
        dict(learning_rate=0.0),
        dict(learning_rate=0.1, decay=0.0),
        dict(learning_rate=0.1, decay=1.0),
        dict(learning_rate=0.1, eps=0.0),
        dict(learning_rate=0.1, momentum=0.0),
        dict(learning_rate=optax.constant_schedule(0.1)),
    ):
        tx = rj.rmsprop(**kwargs)
        updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
        assert np.all(np.isfinite(updates["w"]))


def test_traced_hyperparameters_are_not_checked_and_work_under_jit():
    params = {"w": jnp.ones(3)}

    @jax.jit
    def one_step(learning_rate, decay, eps, momentum, weight_decay):
        tx = rj.rmsprop(learning_rate, decay, eps, momentum=momentum, weight_decay=weight_decay)
        return tx.update({"w": jnp.full(3, 2.0)}, tx.init(params), params)[0]

    updates = one_step(0.1, 0.9, 1e-8, 0.9, 0.0)
    np.testing.assert_allclose(updates["w"], -0.1 / np.sqrt(0.1), rtol=1e-5)


SCALAR_HYPERPARAMETERS: list[tuple[Callable[..., Any], dict[str, Any], str]] = (
    [
        (rj.rmsprop, {"learning_rate": 0.1, "momentum": 0.9}, name)
        for name in ("learning_rate", "decay", "eps", "initial_scale", "momentum", "weight_decay")
    ]
    + [(rj.scale_by_rms, {}, name) for name in ("decay", "eps", "initial_scale")]
    + [
        (rj.add_decoupled_weight_decay, {"learning_rate": 0.1, "weight_decay": 0.1}, name)
        for name in ("learning_rate", "weight_decay")
    ]
    + [
        (rj.compat.torch_rmsprop, {}, name)
        for name in ("lr", "alpha", "eps", "weight_decay", "momentum")
    ]
    + [
        (rj.compat.keras_rmsprop, {}, name)
        for name in ("learning_rate", "rho", "momentum", "epsilon", "weight_decay")
    ]
    + [
        (rj.compat.tf1_rmsprop, {"learning_rate": 0.1}, name)
        for name in ("learning_rate", "decay", "momentum", "epsilon")
    ]
)


@pytest.mark.parametrize(("build", "kwargs", "name"), SCALAR_HYPERPARAMETERS)
def test_an_array_hyperparameter_is_refused_when_the_optimizer_runs(build, kwargs, name):
    # Built with a sweep's whole array (to range-check the grid), the optimizer refuses to run:
    # a (2,) rate would be broadcast against a (2,) parameter, silently one rate per element.
    tx = build(**{**kwargs, name: np.array([0.5, 0.25], np.float32)})
    params = {"b": jnp.ones(2), "w": jnp.ones((3, 2))}
    for run in (tx.init, jax.jit(tx.init)):
        with pytest.raises(ValueError, match=rf"`{name}` has shape \(2,\).*scalar.*jax.vmap"):
            run(params)
    state = build(**{**kwargs, name: 0.5}).init(params)
    with pytest.raises(ValueError, match=rf"`{name}` has shape \(2,\)"):
        tx.update(params, state, params)


def test_a_traced_array_hyperparameter_is_refused_by_its_shape():
    params = {"b": jnp.ones(2)}

    @jax.jit
    def one_step(learning_rate):
        tx = rj.rmsprop(learning_rate)
        return tx.update(params, tx.init(params), params)[0]

    with pytest.raises(ValueError, match=r"`learning_rate` has shape \(2,\)"):
        one_step(jnp.array([0.1, 0.2]))
    # Mapped by jax.vmap, each configuration sees a scalar.
    assert jax.vmap(one_step)(jnp.array([0.1, 0.2]))["b"].shape == (2, 2)


# Optimizers built from a learning-rate schedule, and the name of their argument.
SCHEDULED = [
    (rj.rmsprop, "learning_rate"),
    (
        lambda learning_rate: rj.rmsprop(
            learning_rate, weight_decay=0.1, decoupled_weight_decay=True
        ),
        "learning_rate",
    ),
    (lambda lr: rj.compat.torch_rmsprop(lr=lr), "lr"),
    (
        lambda learning_rate: rj.compat.keras_rmsprop(learning_rate=learning_rate),
        "learning_rate",
    ),
    (lambda learning_rate: rj.compat.tf1_rmsprop(learning_rate), "learning_rate"),
]


@pytest.mark.parametrize(("build", "name"), SCHEDULED)
def test_a_schedule_returning_an_array_is_refused_when_traced(build, name):
    # A (2,) rate per step would be broadcast against the (2,) parameter: one rate per element.
    params = {"b": jnp.ones(2), "w": jnp.ones((3, 2))}
    tx = build(lambda count: jnp.full(2, 0.1))
    state = tx.init(params)
    for update in (tx.update, jax.jit(tx.update)):
        with pytest.raises(
            ValueError, match=rf"`{name}` is a schedule that returned an array of shape \(2,\)"
        ):
            update(params, state, params)
    fine = build(lambda count: 0.1 / (1.0 + count))
    assert jax.jit(fine.update)(params, fine.init(params), params)[0]["b"].shape == (2,)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1])
@pytest.mark.parametrize(("build", "name"), SCHEDULED)
def test_a_schedule_value_that_is_no_rate_is_refused_in_an_eager_update(build, name, value):
    params = {"b": jnp.ones(2)}
    tx = build(lambda count: jnp.where(count < 2, 0.1, value))
    state = tx.init(params)
    for _ in range(2):
        _, state = tx.update(params, state, params)
    with pytest.raises(ValueError, match=rf"`{name}` must .* schedule `{name}` at step count 2"):
        tx.update(params, state, params)
    # Traced, the value cannot be inspected: a NaN rate gives NaN updates.
    updates, _ = jax.jit(tx.update)(params, state, params)
    assert np.isnan(value) == bool(np.all(np.isnan(updates["b"])))


def test_gradient_with_a_missing_leaf_names_the_leaf_it_lacks():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    tx = rj.rmsprop(0.01)
    state = tx.init(params)
    with pytest.raises(
        ValueError, match=r"\(1 leaf against 2 leaves\): it lacks \['dense'\]\['bias'\]\. "
    ):
        tx.update({"dense": {"kernel": jnp.ones((2, 2))}}, state, params)


def test_gradient_with_an_extra_leaf_names_it():
    params = {"a": jnp.ones(2)}
    tx = rj.scale_by_rms()
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"it has \['b'\], which the optimizer state lacks"):
        tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, state)


def test_gradient_with_a_renamed_leaf_names_both_sides_and_shortens_long_lists(maybe_jit):
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    tx = rj.rmsprop(0.01)
    state = tx.init(params)
    renamed = {"kernal": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    with pytest.raises(
        ValueError, match=r"it lacks \['kernel'\]; it has \['kernal'\], which the optimizer"
    ):
        maybe_jit(tx.update)(renamed, state)
    # Given the parameters, `update` compares the gradients with them first.
    with pytest.raises(
        ValueError, match=r"it lacks \['kernel'\]; it has \['kernal'\], which the parameter"
    ):
        maybe_jit(tx.update)(renamed, state, params)
    grads = {f"layer{i}": jnp.ones(2) for i in range(7)}
    with pytest.raises(ValueError, match=r"\['layer3'\] and 3 more, which the optimizer"):
        maybe_jit(tx.update)(grads, state)


def test_gradient_with_a_different_shape_names_the_path_and_both_shapes():
    params = {"layer": [jnp.ones((3, 4)), jnp.ones(4)]}
    tx = rj.rmsprop(0.01, momentum=0.9)
    state = tx.init(params)
    grads = {"layer": [jnp.ones((3, 5)), jnp.ones(4)]}
    with pytest.raises(ValueError, match=r"\['layer'\]\[0\].*\(3, 5\).*\(3, 4\)"):
        jax.jit(tx.update)(grads, state, params)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_integer_or_boolean_parameters_raise_type_error_naming_the_leaf(dtype):
    params = {"weights": jnp.ones(3), "step_counter": jnp.zeros((), dtype)}
    with pytest.raises(TypeError, match=r"\['step_counter'\].*" + jnp.dtype(dtype).name):
        rj.rmsprop(0.01).init(params)


@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        ({"w": True}, ValueError, "`weight_decay_mask` must have the tree structure"),
        (lambda p: {"x": True}, ValueError, "`weight_decay_mask` must have the tree structure"),
        ({"w": True, "b": [False]}, ValueError, "`weight_decay_mask` must have the tree structure"),
        # A string would be taken for True; an array is not one answer for its leaf.
        (
            {"w": True, "b": "no"},
            TypeError,
            r"`weight_decay_mask` at \['b'\] must be True or False, got 'no'",
        ),
        ({"w": np.ones((3, 2), bool), "b": False}, TypeError, r"at \['w'\] must be True or False"),
    ],
)
def test_a_weight_decay_mask_that_does_not_fit_is_named(mask, error, message):
    params = {"b": jnp.ones(2), "w": jnp.ones((3, 2))}
    tx = rj.rmsprop(0.1, weight_decay=0.01, weight_decay_mask=mask)
    with pytest.raises(error, match=message):
        tx.init(params)
    fine = rj.rmsprop(
        0.1, weight_decay=0.01, weight_decay_mask={"b": np.False_, "w": jnp.array(True)}
    )
    updates, _ = jax.jit(fine.update)(params, fine.init(params), params)
    expected = rj.rmsprop(
        0.1, weight_decay=0.01, weight_decay_mask=lambda p: {"b": False, "w": True}
    )
    np.testing.assert_array_equal(
        updates["w"], expected.update(params, expected.init(params), params)[0]["w"]
    )


# (optimizer, optimizer of another configuration, the stage that differs and its types).
OTHER_CONFIGURATIONS = [
    (rj.rmsprop(0.1, momentum=0.9), rj.rmsprop(0.1), "a TraceState at position 4.*an EmptyState"),
    (rj.rmsprop(0.1), rj.rmsprop(0.1, momentum=0.9), "an EmptyState at position 4.*a TraceState"),
    (
        rj.rmsprop(optax.linear_schedule(0.1, 0.0, 10)),
        rj.rmsprop(0.1),
        "a ScaleByScheduleState at position 3.*an EmptyState",
    ),
    (
        rj.rmsprop(0.1, weight_decay=0.1, weight_decay_mask={"w": True}),
        rj.rmsprop(0.1, weight_decay=0.1),
        "a MaskedState at position 1.*an EmptyState",
    ),
    (
        rj.compat.torch_rmsprop(0.1, momentum=0.9),
        rj.compat.torch_rmsprop(0.1),
        "a TraceState at position 3.*an EmptyState",
    ),
]


@pytest.mark.parametrize(("tx", "other", "message"), OTHER_CONFIGURATIONS)
def test_a_state_of_another_configuration_is_refused_naming_the_stage(tx, other, message):
    """Before, a missing stage state raised an AttributeError from inside optax (`'EmptyState'
    object has no attribute 'trace'`), and a momentum buffer given to an optimizer without
    momentum was carried along unused."""
    params = {"w": jnp.ones(3)}
    for update in (tx.update, jax.jit(tx.update)):
        with pytest.raises(ValueError, match=rf"state holds {message} there: a state made by"):
            update(params, other.init(params), params)
    updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
    assert updates["w"].shape == (3,)


def test_a_state_of_another_configuration_is_refused_with_a_mask_reading_values():
    """A mask function that reads the parameters' values cannot build the state from shapes:
    the stage types come from the eager update's own parameters (before, they went unchecked
    and a momentum buffer was carried along unused)."""
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}

    def nonzero(tree):
        return jax.tree.map(lambda leaf: bool(jnp.any(leaf != 0)), tree)

    tx = rj.rmsprop(0.1, weight_decay=0.1, weight_decay_mask=nonzero)
    other = rj.rmsprop(0.1, weight_decay=0.1, weight_decay_mask=nonzero, momentum=0.9)
    with pytest.raises(ValueError, match=r"an EmptyState at position 4.*a TraceState there"):
        tx.update(params, other.init(params), params)
    updates, state = tx.update(params, tx.init(params), params)
    expected = optax.chain(
        optax.masked(optax.add_decayed_weights(0.1), nonzero), optax.rmsprop(0.1)
    )
    np.testing.assert_allclose(
        updates["w"], expected.update(params, expected.init(params), params)[0]["w"], rtol=1e-6
    )
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))


@pytest.mark.parametrize("moment_storage", ["float32", "bfloat16", "int8", "factored"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"centered": True},
        {"weight_decay_mask": {"w": True}},
        {"decoupled_weight_decay": True},
        {"nesterov": True, "momentum": 0.9},
    ],
    ids=["plain", "centered", "masked", "decoupled", "nesterov"],
)
def test_weight_decay_without_params_is_refused_naming_it(moment_storage, options):
    params = {"w": jnp.ones((256, 256))}
    tx = rj.rmsprop(0.1, weight_decay=0.01, moment_storage=moment_storage, **options)
    with pytest.raises(ValueError, match=r"`weight_decay` .*tx.update\(grads, state, params\)"):
        tx.update(params, tx.init(params))


def test_the_pytorch_preset_with_weight_decay_without_params_is_refused_naming_it():
    params = {"w": jnp.ones(3)}
    tx = rj.compat.torch_rmsprop(0.1, weight_decay=0.01)
    with pytest.raises(ValueError, match=r"`weight_decay` adds weight_decay \* params"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"moment_storage": "int8", "first_moment_storage": "int4", "centered": True},
            r"`first_moment_storage` must be None or one of \('float32', 'bfloat16', 'int8'\) "
            r"with moment_storage='int8', got 'int4'",
        ),
        (
            {"moment_storage": "factored", "first_moment_storage": "int8", "centered": True},
            r"one of \('bfloat16',\) with moment_storage='factored', got 'int8'",
        ),
        (
            {"first_moment_storage": "bfloat16", "centered": True},
            r"one of \('float32',\) with moment_storage='float32', got 'bfloat16'",
        ),
        (
            {"moment_storage": "int8", "first_moment_storage": "int8"},
            r"`first_moment_storage` \('int8'\) .* without `centered=True` there is no μ",
        ),
    ],
)
def test_first_moment_storage_is_refused_naming_the_value_and_the_choices(options, message):
    with pytest.raises(ValueError, match=message):
        rj.rmsprop(0.1, **options)
    with pytest.raises(ValueError, match=message):
        rj.scale_by_rms(**options)


def test_a_state_with_another_first_moment_storage_is_refused_naming_the_option():
    params = {"w": jnp.ones((64, 128))}
    eight_bit = rj.rmsprop(0.1, centered=True, moment_storage="int8", first_moment_storage="int8")
    default = rj.rmsprop(0.1, centered=True, moment_storage="int8")
    message = r"`mu` is stored as 'int8', but this optimizer keeps it with first_moment_storage"
    for update in (default.update, jax.jit(default.update)):
        with pytest.raises(ValueError, match=message):
            update(params, eight_bit.init(params), params)
