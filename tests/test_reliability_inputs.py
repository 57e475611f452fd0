"""Careless input gets a clear error naming the argument or leaf, never a silent wrong result."""

from __future__ import annotations

import warnings
from typing import Any, cast

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax as rj

FORMATS = ["float32", "bfloat16", "int8", "factored"]
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "centered": {"centered": True},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "bias_correction": {"bias_correction": True},
    "coupled_decay": {"weight_decay": 0.1},
    "decoupled_decay": {"weight_decay": 0.1, "decoupled_weight_decay": True},
    "maximize": {"maximize": True},
}
PRESETS = {
    "torch": lambda: rj.compat.torch_rmsprop(1e-2, momentum=0.9, centered=True),
    "keras": lambda: rj.compat.keras_rmsprop(1e-3, momentum=0.9, weight_decay=0.1),
    "tf1": lambda: rj.compat.tf1_rmsprop(1e-3, momentum=0.9, centered=True),
    "scale_by_rms": lambda: rj.scale_by_rms(centered=True),
    "decoupled": lambda: rj.add_decoupled_weight_decay(1e-3, 0.1),
}
ABSTRACT = {
    "w": jax.ShapeDtypeStruct((2, 4, 8), jnp.float32),
    "m": jax.ShapeDtypeStruct((128, 256), jnp.bfloat16),
}


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(np.shape(x)), jnp.result_type(x)), tree)


@pytest.mark.parametrize("moment_storage", FORMATS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_init_accepts_abstract_leaves_for_every_variant_and_format(variant, moment_storage):
    tx = rj.rmsprop(1.0, moment_storage=moment_storage, **VARIANTS[variant])
    concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ABSTRACT)
    assert _shapes(tx.init(ABSTRACT)) == _shapes(tx.init(concrete))
    assert _shapes(jax.eval_shape(tx.init, ABSTRACT)) == _shapes(tx.init(concrete))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_init_accepts_abstract_leaves_for_presets_and_transforms(preset):
    tx = PRESETS[preset]()
    concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ABSTRACT)
    assert _shapes(tx.init(ABSTRACT)) == _shapes(tx.init(concrete))


@pytest.mark.parametrize("moment_storage", FORMATS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_empty_parameter_tree_gives_empty_updates_as_optax_does(
    variant, moment_storage, maybe_jit
):
    # A model with nothing to train (everything frozen, say): optax.rmsprop returns {}.
    tx = rj.rmsprop(1e-3, moment_storage=moment_storage, **VARIANTS[variant])
    state = maybe_jit(tx.init)({})
    updates, state = maybe_jit(tx.update)({}, state, {})
    assert updates == optax.rmsprop(1e-3).update({}, optax.rmsprop(1e-3).init({}), {})[0]
    assert maybe_jit(tx.update)({}, state, {})[0] == {}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_an_empty_parameter_tree_gives_empty_updates_for_presets_and_packing(preset):
    for tx in (PRESETS[preset](), rj.pack_small_leaves(PRESETS[preset]())):
        assert tx.update({}, tx.init({}), {})[0] == {}


def _numpy_float64_steps(tx: optax.GradientTransformation) -> tuple[Any, Any, list[str]]:
    """Two steps of `tx` on NumPy float64 parameters and gradients, and of `tx` on the same
    values as JAX float32 arrays: both updates, and the warnings the first run raised."""
    params = {"w": np.linspace(-1.0, 1.0, 64 * 128).reshape(64, 128), "b": np.zeros(3)}
    grads = jax.tree.map(lambda p: np.cos(3.0 * p) + 0.5, params)

    def two_steps(params: Any, grads: Any) -> Any:
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        return tx.update(grads, state, optax.apply_updates(params, updates))[0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_numpy = two_steps(params, grads)
    as_float32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (params, grads))
    return from_numpy, two_steps(*as_float32), [str(w.message) for w in caught]


@pytest.mark.parametrize("moment_storage", FORMATS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_numpy_float64_parameters_train_as_float32_without_a_warning(variant, moment_storage):
    # Without jax_enable_x64, JAX computes NumPy float64 arrays in float32 (as optax does);
    # asking for float64 back raised JAX's "float64 ... is not available" warning every step.
    tx = rj.rmsprop(1e-3, moment_storage=moment_storage, **VARIANTS[variant])
    from_numpy, as_float32, caught = _numpy_float64_steps(tx)
    assert not [message for message in caught if "dtype" in message], caught
    assert jax.tree.map(lambda u: u.dtype, from_numpy) == {"w": jnp.float32, "b": jnp.float32}
    chex.assert_trees_all_equal(from_numpy, as_float32)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_numpy_float64_parameters_train_as_float32_without_a_warning_in_presets(preset):
    for tx in (PRESETS[preset](), rj.pack_small_leaves(PRESETS[preset]())):
        from_numpy, as_float32, caught = _numpy_float64_steps(tx)
        assert not [message for message in caught if "dtype" in message], caught
        chex.assert_trees_all_equal(from_numpy, as_float32)


STATE_MISMATCHES = [
    ({}, {"moment_storage": "int8"}, r"`nu` is stored as a plain tree.*moment_storage='int8'"),
    ({"moment_storage": "int8"}, {}, r"`nu` is stored as 'int8'.*moment_storage='float32'"),
    (
        {"moment_storage": "factored"},
        {"moment_storage": "int8"},
        r"`nu` is stored as 'factored'.*moment_storage='int8'",
    ),
    (
        {"moment_storage": "int8", "centered": True},
        {"moment_storage": "factored", "centered": True},
        r"`variance` is stored as 'int8'.*moment_storage='factored'",
    ),
    ({"centered": True}, {}, r"keeps a ScaleByRmsState, but was given a ScaleByCenteredRmsState"),
    (
        {},
        {"centered": True, "moment_storage": "int8"},
        r"keeps a ScaleByCenteredVarianceState, but was given a ScaleByRmsState",
    ),
]


@pytest.mark.parametrize(("made_by", "used_by", "message"), STATE_MISMATCHES)
def test_a_state_made_by_another_optimizer_is_refused_naming_what_differs(
    made_by, used_by, message, maybe_jit
):
    params = {"w": jnp.ones((256, 256)), "b": jnp.ones(4)}
    state = rj.rmsprop(1e-3, **made_by).init(params)
    with pytest.raises(ValueError, match=message):
        maybe_jit(rj.rmsprop(1e-3, **used_by).update)(params, state, params)


def _cast_floats(dtype):
    return lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x


@pytest.mark.parametrize("moment_storage", FORMATS)
@pytest.mark.parametrize("variant", ["plain", "centered"])
def test_a_state_cast_to_another_dtype_is_refused_naming_the_leaf(
    moment_storage, variant, maybe_jit
):
    # A state cast leaf by leaf (to "save memory", or by a mixed-precision helper) was taken as
    # it came and kept its new dtypes: a bfloat16 count stopped at 256 (freezing schedules and
    # bias correction), a float32 average rounded to nearest in bfloat16 lost small updates.
    params = {"w": jnp.ones((256, 256)), "b": jnp.ones(4)}
    tx = rj.rmsprop(1e-3, moment_storage=moment_storage, **VARIANTS[variant])
    state = tx.init(params)
    update = maybe_jit(tx.update)
    for dtype in (jnp.bfloat16, jnp.float32):
        with pytest.raises(
            ValueError, match=rf"`count` has dtype {jnp.dtype(dtype)}, but .* int32"
        ):
            update(params, jax.tree.map(lambda x, d=dtype: x.astype(d), state), params)
    if moment_storage == "bfloat16":  # Its averages are bfloat16 already; nothing else is cast.
        update(params, jax.tree.map(_cast_floats(jnp.bfloat16), state), params)
        return
    name = "variance" if variant == "centered" and moment_storage != "float32" else "nu"
    for dtype in (jnp.bfloat16, jnp.float16):
        with pytest.raises(
            ValueError,
            match=rf"`{name}` at .*\['(b|w)'\] has dtype {jnp.dtype(dtype)}, but "
            rf"moment_storage='{moment_storage}' keeps it in at least float32",
        ):
            update(params, jax.tree.map(_cast_floats(dtype), state), params)


def test_a_cast_decoupled_weight_decay_count_is_refused(maybe_jit):
    # Alone (beside optax.adam, say) with a schedule, its bfloat16 count froze the schedule.
    params = {"w": jnp.ones(3)}
    tx = rj.add_decoupled_weight_decay(optax.linear_schedule(1.0, 0.0, 1000), 0.1)
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tx.init(params))
    with pytest.raises(ValueError, match=r"`count` has dtype bfloat16, but .* int32"):
        maybe_jit(tx.update)(params, state, params)


def test_init_of_a_single_abstract_leaf_matches_optax():
    leaf = jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)
    ours = rj.rmsprop(1.0).init(leaf)
    assert _shapes(optax.tree_utils.tree_get(ours, "nu")) == _shapes(
        optax.tree_utils.tree_get(optax.rmsprop(1.0).init(leaf), "nu")
    )


@pytest.mark.parametrize("value", [1, True, np.int32(3)])
def test_integer_python_or_numpy_parameters_are_refused_naming_the_leaf(value):
    with pytest.raises(TypeError, match=r"\['w'\]"):
        rj.rmsprop(0.1).init({"w": value, "b": jnp.ones(2)})


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_or_boolean_gradients_are_refused_naming_the_leaf(dtype, maybe_jit):
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    tx = rj.rmsprop(0.1)
    state = tx.init(params)
    grads = {"w": jnp.ones(3), "b": jnp.ones(2, dtype)}
    with pytest.raises(TypeError, match=r"Gradient at \['b'\]"):
        maybe_jit(tx.update)(grads, state, params)


@pytest.mark.parametrize(
    "build",
    [
        lambda v: rj.rmsprop(v),
        lambda v: rj.rmsprop(0.1, eps=v),
        lambda v: rj.rmsprop(0.1, weight_decay=v),
        lambda v: rj.rmsprop(0.1, initial_scale=v),
        lambda v: rj.compat.torch_rmsprop(lr=v),
        lambda v: rj.compat.keras_rmsprop(learning_rate=v),
        lambda v: rj.compat.tf1_rmsprop(v),
        lambda v: rj.add_decoupled_weight_decay(v, 0.1),
    ],
)
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_hyperparameters_are_refused(build, value):
    with pytest.raises(ValueError, match="must be finite"):
        build(value)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda v: rj.rmsprop(v), "learning_rate"),
        (lambda v: rj.rmsprop(0.1, eps=v), "eps"),
        (lambda v: rj.rmsprop(0.1, weight_decay=v), "weight_decay"),
        (lambda v: rj.rmsprop(0.1, initial_scale=v), "initial_scale"),
        (lambda v: rj.compat.torch_rmsprop(lr=v), "lr"),
        (lambda v: rj.compat.keras_rmsprop(0.1, clipnorm=v), "clipnorm"),
        (lambda v: rj.compat.tf1_rmsprop(0.1, epsilon=v), "epsilon"),
        (lambda v: rj.add_decoupled_weight_decay(0.1, np.float64(v)), "weight_decay"),
        (lambda v: rj.compat.torch_exponential_lr(v, gamma=0.9), "lr"),
        (lambda v: rj.compat.torch_cosine_annealing_lr(0.1, T_max=5, eta_min=v), "eta_min"),
        (lambda v: rj.compat.torch_one_cycle_lr(v, total_steps=10), "max_lr"),
        (lambda v: rj.compat.torch_reduce_lr_on_plateau(0.1, min_lr=v), "min_lr"),
    ],
)
def test_hyperparameters_past_float32s_range_are_refused(build, name):
    """1e40 is finite as a Python float and infinite in the optimizer's float32 arithmetic: a
    learning rate gave -inf updates, a coupled weight decay NaN ones, `eps` or `initial_scale`
    updates of 0, a cosine schedule's `eta_min` NaN rates."""
    build(3.4e38)  # float32's largest number is about 3.4028e38.
    with pytest.raises(ValueError, match=rf"`{name}` must be at most 3.4028235e\+38, float32"):
        build(1e40)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda v: rj.rmsprop(v), "learning_rate"),
        (lambda v: rj.compat.keras_rmsprop(0.1, clipnorm=v), "clipnorm"),
        (lambda v: rj.compat.torch_exponential_lr(v, gamma=0.9), "lr"),
        (lambda v: rj.compat.torch_step_lr(0.1, step_size=2, gamma=v), "gamma"),
        (lambda v: rj.compat.torch_cosine_annealing_lr(0.1, T_max=5, eta_min=v), "eta_min"),
        (lambda v: rj.compat.torch_one_cycle_lr(v, total_steps=10), "max_lr"),
        (lambda v: rj.compat.torch_reduce_lr_on_plateau(0.1, min_lr=v), "min_lr"),
    ],
)
@pytest.mark.parametrize("sign", [1, -1])
def test_integers_past_float64s_range_are_refused_naming_them(build, name, sign):
    # The torch schedules raised Python's "int too large to convert to float" naming nothing.
    with pytest.raises(ValueError, match=rf"`{name}` must be"):
        build(sign * 10**400)


@pytest.mark.parametrize("eps_in_sqrt", [False, True])
@pytest.mark.parametrize("moment_storage", FORMATS)
@pytest.mark.parametrize("eps", [1e-38, 1e-45, 1e-50])
def test_an_eps_flushed_to_zero_in_float32_still_gives_zero_steps_for_zero_gradients(
    eps, moment_storage, eps_in_sqrt, maybe_jit
):
    """Such an `eps` is positive, so the guard for `eps == 0` was left out of the step; XLA:CPU
    flushes it (subnormal in float32, or 0) to 0, and a gradient that had been 0 since `init`
    gave 0 / 0 = NaN where `eps=0` gives 0."""
    params = {"w": jnp.ones((4, 6)), "b": jnp.ones(3)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for centered in (False, True):
        tx = rj.rmsprop(
            0.1, eps=eps, eps_in_sqrt=eps_in_sqrt, centered=centered, moment_storage=moment_storage
        )
        updates, _ = maybe_jit(tx.update)(zeros, tx.init(params), params)
        for leaf in jax.tree.leaves(updates):
            np.testing.assert_array_equal(leaf, 0.0)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: rj.compat.torch_step_lr(0.1, step_size=2**31),
            r"`step_size` must be a positive integer \(at most 2\*\*31 - 1: update counts are "
            r"int32\), got 2147483648",
        ),
        (
            lambda: rj.compat.torch_linear_lr(0.1, total_iters=10**20),
            r"`total_iters` must be a positive integer \(at most 2\*\*31 - 1",
        ),
        (
            lambda: rj.compat.torch_one_cycle_lr(0.1, epochs=2**16, steps_per_epoch=2**16),
            r"`epochs` \* `steps_per_epoch` must be at most 2\*\*31 - 1 = 2147483647 \(update "
            r"counts are int32\), got 65536 \* 65536 = 4294967296",
        ),
        (
            lambda: rj.compat.torch_reduce_lr_on_plateau(0.1, patience=2**40),
            r"`patience` must be an integer >= 0 \(at most 2\*\*31 - 1",
        ),
        (
            lambda: rj.compat.torch_multi_step_lr(0.1, milestones=cast(Any, jnp.array(2.0))),
            r"`milestones` must be a sequence of epochs",
        ),
    ],
)
def test_torch_schedule_counts_past_int32_and_0d_milestones_are_refused_naming_them(build, message):
    """Each raised an error from deep inside JAX that named no argument: an OverflowError
    converting the count to int32 when first evaluated, or iteration over a 0-d array."""
    with pytest.raises((ValueError, TypeError), match=message):
        build()
    rj.compat.torch_step_lr(0.1, step_size=2**31 - 1)(jnp.int32(5))
    plateau = rj.compat.torch_reduce_lr_on_plateau(0.1, patience=2**31 - 1, cooldown=2**31 - 1)
    params = {"w": jnp.ones(2)}
    updates, _ = plateau.update(params, plateau.init(params), params, value=jnp.float32(1.0))
    np.testing.assert_allclose(updates["w"], 0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"use_ema": True, "ema_overwrite_frequency": 2**31},
            r"`ema_overwrite_frequency` must be a positive integer \(at most 2\*\*31 - 1",
        ),
        (
            {"gradient_accumulation_steps": 10**20},
            r"`gradient_accumulation_steps` must be an integer >= 2 \(at most 2\*\*31 - 1",
        ),
        (
            {"loss_scale_factor": 1e-46},
            r"`loss_scale_factor` must be positive \(or None\), at least float32's smallest",
        ),
        ({"loss_scale_factor": 0.0}, r"`loss_scale_factor` must be positive \(or None\)"),
        ({"clipnorm": 1e-40}, r"`clipnorm` must be 0 or None \(no clipping\) or at least"),
        ({"global_clipnorm": 1e-46}, r"`global_clipnorm` must be 0 or None \(no clipping\)"),
    ],
)
def test_keras_counts_past_int32_and_a_scale_flushed_to_zero_are_refused(kwargs, message):
    """The counts raised an OverflowError naming no argument when first updated; a
    `loss_scale_factor` of 1e-46 (0 in float32) divided every gradient by 0, NaN updates, and
    a clipping norm of 1e-40 gave a zero gradient 0 / 0."""
    with pytest.raises(ValueError, match=message):
        rj.compat.keras_rmsprop(0.1, **kwargs)
    params = {"w": jnp.ones(3)}
    tx = rj.compat.keras_rmsprop(
        0.1, loss_scale_factor=2e-38, gradient_accumulation_steps=2**31 - 1
    )
    updates, _ = tx.update(params, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"]))


@pytest.mark.parametrize(
    "build",
    [
        lambda n: rj.compat.keras_rmsprop(0.1, gradient_accumulation_steps=n),
        lambda n: rj.compat.keras_rmsprop(0.1, use_ema=True, ema_overwrite_frequency=n),
        lambda n: rj.compat.torch_reduce_lr_on_plateau(0.1, patience=n, cooldown=n),
    ],
    ids=["accumulation", "ema-overwrite", "plateau"],
)
def test_numpy_integer_counts_are_taken_as_python_ones(build):
    # Refused before ("must be a positive integer ..., got np.int64(2)"), where the torch
    # schedules took them: a count read from a NumPy config or array is an np.integer.
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, -0.5])}
    results = []
    for count in (2, np.int64(2), np.int32(2)):
        tx = build(count)
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update(grads, state, params, value=jnp.float32(1.0))
        results.append(np.asarray(updates["w"]))
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


@pytest.mark.parametrize(
    "build",
    [
        lambda: rj.rmsprop(0.1, weight_decay=0.1),
        lambda: rj.rmsprop(0.1, weight_decay=0.1, decoupled_weight_decay=True),
        lambda: rj.rmsprop(0.1, weight_decay=0.1, moment_storage="int8"),
        lambda: rj.rmsprop(0.1, weight_decay=0.1, moment_storage="factored", centered=True),
        lambda: rj.compat.torch_rmsprop(0.1, weight_decay=0.1),
        lambda: rj.compat.keras_rmsprop(0.1, weight_decay=0.1),
        lambda: rj.add_decoupled_weight_decay(0.1, 0.1),
    ],
    ids=["coupled", "decoupled", "int8", "factored-centered", "torch", "keras", "add-decoupled"],
)
@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        ({"w": jnp.ones((8, 4, 4))}, r"\(4, 4\) but the parameter there has shape \(8, 4"),
        ({"w": jnp.ones((1, 4))}, r"\(4, 4\) but the parameter there has shape \(1, 4"),
        ({"v": jnp.ones((4, 4))}, r"Gradient tree differs from the parameter tree .* \['v'\]"),
    ],
    ids=["batched", "broadcastable", "other-tree"],
)
def test_parameters_unlike_the_gradients_are_refused_naming_the_leaf(
    build, wrong, message, maybe_jit
):
    # Weight decay broadcast such parameters against the gradients: updates of the shape
    # (8, 4, 4) for (4, 4) parameters, or from a (1, 4) row repeated, without an error; a
    # tree of other names raised JAX's tree-structure error.
    params = {"w": jnp.ones((4, 4))}
    tx = build()
    with pytest.raises(ValueError, match=message):
        maybe_jit(tx.update)(params, tx.init(params), wrong)


def test_range_message_for_an_unbounded_range_says_at_least():
    with pytest.raises(ValueError, match=r"`learning_rate` must be >= 0.0, got -1"):
        rj.rmsprop(-1.0)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: rj.rmsprop(None), "learning_rate"),
        (lambda: rj.compat.torch_rmsprop(lr=None), "lr"),
        (lambda: rj.compat.tf1_rmsprop(None), "learning_rate"),
        (lambda: rj.add_decoupled_weight_decay(None, 0.1), "learning_rate"),
        (lambda: rj.scale_by_rms(decay=None), "decay"),
    ],
)
def test_none_hyperparameter_names_the_argument(build, name):
    with pytest.raises(ValueError, match=f"`{name}` must be a number"):
        build()


SCHEDULE = optax.linear_schedule(0.9, 0.5, 10)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda s: rj.rmsprop(0.1, decay=s), "decay"),
        (lambda s: rj.rmsprop(0.1, eps=s), "eps"),
        (lambda s: rj.rmsprop(0.1, momentum=s), "momentum"),
        (lambda s: rj.rmsprop(0.1, weight_decay=s, decoupled_weight_decay=True), "weight_decay"),
        (lambda s: rj.rmsprop(0.1, weight_decay=s, moment_storage="factored"), "weight_decay"),
        (lambda s: rj.rmsprop(0.1, initial_scale=s), "initial_scale"),
        (lambda s: rj.scale_by_rms(decay=s), "decay"),
        (lambda s: rj.add_decoupled_weight_decay(0.1, s), "weight_decay"),
        (lambda s: rj.compat.torch_rmsprop(0.1, alpha=s), "alpha"),
        (lambda s: rj.compat.torch_rmsprop(0.1, momentum=s), "momentum"),
        (lambda s: rj.compat.torch_rmsprop_groups([{"momentum": s}], [0]), "momentum"),
        (lambda s: rj.compat.keras_rmsprop(0.1, rho=s), "rho"),
        (lambda s: rj.compat.keras_rmsprop(0.1, epsilon=s), "epsilon"),
        (lambda s: rj.compat.keras_rmsprop(0.1, weight_decay=s), "weight_decay"),
        (lambda s: rj.compat.keras_rmsprop(0.1, clipnorm=s), "clipnorm"),
        (lambda s: rj.compat.tf1_rmsprop(0.1, decay=s), "decay"),
        (lambda s: rj.compat.tf1_rmsprop(0.1, momentum=s), "momentum"),
        (lambda s: rj.compat.example_libraries_rmsprop(0.1, gamma=s), "gamma"),
        (lambda s: rj.compat.example_libraries_rmsprop_momentum(0.1, momentum=s), "momentum"),
    ],
)
def test_a_schedule_where_only_a_number_is_taken_is_refused_naming_the_argument(build, name):
    """It used to be accepted and fail when traced, as an operand error (`function * Array`),
    or (a factored or centered int8 L2 decay) as an invalid JAX array type."""
    with pytest.raises(TypeError, match=rf"`{name}` must be a number or an array, got the ca"):
        build(SCHEDULE)


def test_inject_hyperparams_schedules_what_the_error_says_to():
    params = {"w": jnp.ones(3)}
    tx = optax.inject_hyperparams(rj.rmsprop)(learning_rate=0.1, momentum=SCHEDULE)
    state = tx.init(params)
    for _ in range(3):
        _, state = jax.jit(tx.update)(params, state, params)
    assert float(state.hyperparams["momentum"]) == pytest.approx(float(SCHEDULE(2)))


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda v: rj.compat.example_libraries_rmsprop(0.1, gamma=v), "gamma"),
        (lambda v: rj.compat.example_libraries_rmsprop_momentum(0.1, gamma=v), "gamma"),
        (lambda v: rj.compat.example_libraries_rmsprop(v), "step_size"),
    ],
)
def test_example_library_presets_name_their_own_arguments(build, name):
    """They were checked as `rj.rmsprop`'s, naming `decay` and `learning_rate`."""
    with pytest.raises(ValueError, match=rf"`{name}` must"):
        build(-0.5)


def test_the_example_library_momentum_preset_refuses_no_momentum():
    """`rj.rmsprop` reads `momentum=None` as no buffer: it built RMSprop without momentum."""
    with pytest.raises(ValueError, match=r"`momentum` must be a number or an array, got None"):
        rj.compat.example_libraries_rmsprop_momentum(0.1, momentum=None)


@pytest.mark.parametrize(
    "flag",
    [
        "centered",
        "eps_in_sqrt",
        "bias_correction",
        "nesterov",
        "maximize",
        "decoupled_weight_decay",
    ],
)
@pytest.mark.parametrize("value", ["False", 0, 1, None])
def test_structural_flags_must_be_bools_in_rmsprop(flag, value):
    with pytest.raises(TypeError, match=f"`{flag}` must be True or False"):
        rj.rmsprop(0.1, momentum=0.9, **{flag: value})


@pytest.mark.parametrize("flag", ["centered", "eps_in_sqrt", "bias_correction"])
def test_structural_flags_must_be_bools_in_scale_by_rms(flag):
    with pytest.raises(TypeError, match=f"`{flag}` must be True or False"):
        rj.scale_by_rms(**{flag: cast(Any, "False")})  # not a `bool`


def test_unknown_moment_storage_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"`moment_storage` must be one of .*'int4'"):
        rj.rmsprop(0.1, moment_storage="int4")
