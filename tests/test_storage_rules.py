"""The numerics rules (README, Numerics) and the state contract of every `moment_storage`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import is_compressed, second_moment_field, stored_leaf
from jax.typing import DTypeLike

import rmsprop_jax as rj

FORMATS = ["bfloat16", "int8", "factored"]

# Variants in which a gradient that was always zero must give an exactly zero update.
ZERO_GRADIENT_VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "eps_in_sqrt": {"eps_in_sqrt": True},
    "initial_scale": {"initial_scale": 1.0},
    "centered": {"centered": True},
    "centered_momentum": {"centered": True, "momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "bias_correction": {"bias_correction": True},
    "maximize": {"maximize": True},
}


def _params(dtype: DTypeLike = jnp.float32) -> dict[str, jax.Array]:
    """A matrix that every format compresses, one too small for int8, one never updated."""
    rng = np.random.default_rng(0)
    return {
        "matrix": jnp.asarray(rng.normal(size=(128, 256)), dtype),
        "small": jnp.asarray(rng.normal(size=(4, 64)), dtype),
        "frozen": jnp.asarray(rng.normal(size=(128, 128)), dtype),
    }


def _zero_mask(params: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """Where the gradient is always zero: scattered entries, a whole row and column, a leaf."""
    rng = np.random.default_rng(1)
    mask = {name: rng.random(np.shape(p)) < 0.3 for name, p in params.items()}
    mask["matrix"][5, :] = True
    mask["matrix"][:, 7] = True
    mask["frozen"][:] = True
    return mask


def _gradients(
    params: dict[str, jax.Array], seed: int, steps: int = 3
) -> list[dict[str, jax.Array]]:
    """`steps` normal gradients of `params`, zero where `_zero_mask` says."""
    mask = _zero_mask(params)
    rng = np.random.default_rng(seed)
    return [
        {
            name: jnp.asarray(np.where(mask[name], 0.0, rng.normal(size=np.shape(p))), p.dtype)
            for name, p in params.items()
        }
        for _ in range(steps)
    ]


def _trajectory(
    tx: optax.GradientTransformation,
    update: Callable[..., Any],
    params: Any,
    grads: Sequence[Any],
) -> tuple[list[Any], list[Any]]:
    """The updates `update` (`tx.update`, or it jitted) gives for `grads` from `tx.init`, each
    applied, and the leaves of the last state."""
    state, steps = tx.init(params), []
    for g in grads:
        updates, state = update(g, state, params)
        steps.append(updates)
        params = optax.apply_updates(params, updates)
    return steps, jax.tree.leaves(state)


def _check_trajectory(
    tx: optax.GradientTransformation,
    params: Any,
    grads: Sequence[Any],
    expected: tuple[list[Any], list[Any]],
    *,
    jitted: bool,
) -> None:
    """`tx`'s eager trajectory is `expected` bit for bit, and (where `jitted`) its jitted one
    is to rounding: XLA fuses two programs of the same arithmetic differently."""
    eager = _trajectory(tx, tx.update, params, grads)
    jax.tree.map(np.testing.assert_array_equal, eager, expected)
    if jitted:
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            _trajectory(tx, jax.jit(tx.update), params, grads),
            eager,
        )


@pytest.mark.parametrize("eps", [0.0, 1e-8])
@pytest.mark.parametrize("variant", list(ZERO_GRADIENT_VARIANTS))
@pytest.mark.parametrize("moment_storage", FORMATS)
def test_gradient_zero_since_init_gives_exactly_zero_update(moment_storage, variant, eps):
    params = _params()
    mask = _zero_mask(params)
    tx = rj.rmsprop(0.1, eps=eps, moment_storage=moment_storage, **ZERO_GRADIENT_VARIANTS[variant])
    state = tx.init(params)
    rng = np.random.default_rng(2)
    for _ in range(4):
        grads = {
            name: jnp.asarray(np.where(mask[name], 0.0, rng.normal(size=np.shape(p))), p.dtype)
            for name, p in params.items()
        }
        updates, state = tx.update(grads, state, params)
        for name, update in updates.items():
            update = np.asarray(update)
            assert np.all(np.isfinite(update)), name
            assert np.all(update[mask[name]] == 0.0), name
            assert np.any(update[~mask[name]] != 0.0) or not np.any(~mask[name]), name
        params = optax.apply_updates(params, updates)


def _run_steps(tx, params, grad_fn, steps):
    """Runs `steps` updates under jit with lax.scan; returns the stacked updates."""

    def body(carry, _):
        params, state = carry
        updates, state = tx.update(grad_fn(params), state, params)
        return (optax.apply_updates(params, updates), state), updates

    run = jax.jit(lambda params: jax.lax.scan(body, (params, tx.init(params)), length=steps)[1])
    return run(params)


MAXIMIZE_VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "eps_0": {"eps": 0.0},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "bias_correction": {"bias_correction": True},
    "decoupled_weight_decay": {"weight_decay": 0.01, "decoupled_weight_decay": True},
    "schedule": {"learning_rate": optax.linear_schedule(0.1, 0.01, 3)},
    "centered": {"centered": True},
    "coupled_weight_decay": {"weight_decay": 0.01},
}


@pytest.mark.parametrize("variant", list(MAXIMIZE_VARIANTS))
@pytest.mark.parametrize("moment_storage", ["float32", *FORMATS])
def test_maximize_gives_the_state_and_updates_of_the_negated_gradient(moment_storage, variant):
    """`maximize` is descent on -g, whichever stage applies the sign (the learning rate's
    where the state holds no sign of g): bit for bit eagerly, so states saved before that
    choice resume the same; under jit, to rounding, as XLA fuses the two programs
    differently (it did so before the choice too, for the centered variants)."""
    options: dict[str, Any] = {"learning_rate": 0.1, **MAXIMIZE_VARIANTS[variant]}
    ascent = rj.rmsprop(maximize=True, moment_storage=moment_storage, **options)
    descent = rj.rmsprop(moment_storage=moment_storage, **options)
    params = _params()
    grads = _gradients(params, seed=3)
    negated = [jax.tree.map(jnp.negative, g) for g in grads]
    expected = _trajectory(descent, descent.update, params, negated)
    _check_trajectory(ascent, params, grads, expected, jitted=moment_storage == "float32")


# L2 weight decay masks: a tree (decaying the compressed leaves and not the small one), and a
# function of the parameters (decaying the others).
_DECAYED = {"matrix": True, "small": False, "frozen": True}


def _decayed_but_matrix(params):
    return {name: name != "matrix" for name in params}


# rmsprop's variants whose step is computed again from the new state (see
# rmsprop_jax._recomputed_steps), each beside the optax chain of the same stages.
RECOMPUTED_VARIANTS = {
    "nesterov": (
        {"momentum": 0.9, "nesterov": True},
        lambda rms: [rms, optax.scale_by_learning_rate(0.1), optax.trace(0.9, nesterov=True)],
    ),
    "nesterov_centered_eps_0": (
        {"momentum": 0.9, "nesterov": True, "centered": True, "eps": 0.0},
        lambda rms: [rms, optax.scale_by_learning_rate(0.1), optax.trace(0.9, nesterov=True)],
    ),
    "nesterov_schedule_decoupled_weight_decay": (
        {
            "learning_rate": optax.linear_schedule(0.1, 0.01, 3),
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 0.01,
            "decoupled_weight_decay": True,
        },
        lambda rms: [
            rms,
            optax.scale_by_learning_rate(optax.linear_schedule(0.1, 0.01, 3)),
            optax.trace(0.9, nesterov=True),
            rj.add_decoupled_weight_decay(optax.linear_schedule(0.1, 0.01, 3), 0.01),
        ],
    ),
    "coupled_weight_decay": (
        {"weight_decay": 0.01},
        lambda rms: [optax.add_decayed_weights(0.01), rms, optax.scale_by_learning_rate(0.1)],
    ),
    "coupled_weight_decay_momentum_bias_correction": (
        {"weight_decay": 0.01, "momentum": 0.5, "bias_correction": True},
        lambda rms: [
            optax.add_decayed_weights(0.01),
            rms,
            optax.scale_by_learning_rate(0.1),
            optax.trace(0.5),
        ],
    ),
    "coupled_weight_decay_maximize_centered_eps_in_sqrt": (
        {"weight_decay": 0.01, "maximize": True, "centered": True, "eps_in_sqrt": True},
        lambda rms: [
            optax.scale(-1.0),
            optax.add_decayed_weights(0.01),
            rms,
            optax.scale_by_learning_rate(0.1),
        ],
    ),
    "coupled_weight_decay_centered": (
        {"weight_decay": 0.01, "centered": True},
        lambda rms: [optax.add_decayed_weights(0.01), rms, optax.scale_by_learning_rate(0.1)],
    ),
    "coupled_weight_decay_masked_centered_maximize": (
        {
            "weight_decay": 0.01,
            "weight_decay_mask": _DECAYED,
            "centered": True,
            "maximize": True,
        },
        lambda rms: [
            optax.scale(-1.0),
            optax.masked(optax.add_decayed_weights(0.01), _DECAYED),
            rms,
            optax.scale_by_learning_rate(0.1),
        ],
    ),
    "coupled_weight_decay_mask_function_momentum": (
        {"weight_decay": 0.01, "weight_decay_mask": _decayed_but_matrix, "momentum": 0.5},
        lambda rms: [
            optax.masked(optax.add_decayed_weights(0.01), _decayed_but_matrix),
            rms,
            optax.scale_by_learning_rate(0.1),
            optax.trace(0.5),
        ],
    ),
}
_RMS_OPTIONS = ("eps", "centered", "bias_correction", "eps_in_sqrt")


@pytest.mark.parametrize("variant", list(RECOMPUTED_VARIANTS))
@pytest.mark.parametrize("moment_storage", ["float32", *FORMATS])
def test_steps_computed_again_from_the_new_state_are_the_chained_stages(moment_storage, variant):
    """Nesterov momentum and L2 weight decay compute the step again from the new state (to
    hold no temporaries): the updates and state are those of the optax chain of the same
    stages, bit for bit eagerly (so saved states resume the same) and to rounding under jit,
    where XLA fuses the two programs differently."""
    options, stages = RECOMPUTED_VARIANTS[variant]
    options = {"learning_rate": 0.1, **options}
    tx = rj.rmsprop(moment_storage=moment_storage, **options)
    rms = rj.scale_by_rms(
        moment_storage=moment_storage,
        **{name: options[name] for name in _RMS_OPTIONS if name in options},
    )
    chained = optax.chain(*stages(rms))
    params = _params()
    grads = _gradients(params, seed=4)
    expected = _trajectory(chained, chained.update, params, grads)
    _check_trajectory(tx, params, grads, expected, jitted=moment_storage == "float32")


@pytest.mark.parametrize(
    "tx",
    [
        rj.rmsprop(0.1),
        rj.rmsprop(0.1, momentum=0.9),
        rj.rmsprop(0.1, **RECOMPUTED_VARIANTS["nesterov"][0]),
        rj.rmsprop(0.1, **RECOMPUTED_VARIANTS["coupled_weight_decay"][0]),
        rj.rmsprop(0.1, weight_decay=0.01, centered=True, moment_storage="int8"),
        rj.compat.torch_rmsprop(0.1),
        rj.compat.torch_rmsprop(0.1, weight_decay=0.01),
    ],
    ids=["plain", "momentum", "nesterov", "l2", "l2-centered-int8", "torch", "torch-l2"],
)
def test_a_state_of_another_optimizer_is_refused_with_the_number_of_stages(tx):
    """A state of another length or kind (optax's chain said only that the numbers of
    updates and states differ, the recomputing chain raised StopIteration)."""
    params = {"w": jnp.ones(3)}
    own = tx.init(params)
    for other in (optax.adam(0.1).init(params), {"nu": params}, own[:-1], (*own, own[-1])):
        with pytest.raises(ValueError, match=r"a tuple of 6 stage states, .* another optimizer"):
            tx.update(params, other, params)
        with pytest.raises(ValueError, match=r"a tuple of 6 stage states"):
            jax.jit(tx.update)(params, other, params)


@pytest.mark.parametrize(
    "tx",
    [rj.rmsprop(0.1), rj.rmsprop(0.1, momentum=0.9), rj.compat.torch_rmsprop(0.1)],
    ids=["plain", "momentum", "torch"],
)
def test_a_list_of_stage_states_is_refused_with_how_to_restore_one(tx):
    """A state whose stages come as a list (as a restore without a target gives them) was
    updated, and the state handed back failed a pytree structure check of the list against
    the tuple the update returns."""
    params = {"w": jnp.ones(3)}
    listed = list(tx.init(params))
    for update in (tx.update, jax.jit(tx.update)):
        with pytest.raises(ValueError, match=r"given a list of them: a state restored without"):
            update(params, listed, params)


@pytest.mark.parametrize(
    "options",
    [{}, {"momentum": 0.9}, {"centered": True, "momentum": 0.5, "maximize": True}],
    ids=["plain", "momentum", "centered-momentum-maximize"],
)
def test_the_pytorch_preset_with_weight_decay_is_its_chained_stages(options):
    """`compat.torch_rmsprop` computes the step again from the new state with weight decay
    (as `rmsprop` does): bit for bit the chain of its stages, eagerly."""
    momentum, centered = options.get("momentum", 0.0), options.get("centered", False)
    tx = rj.compat.torch_rmsprop(0.01, alpha=0.9, eps=1e-6, weight_decay=0.1, **options)
    chained = optax.chain(
        optax.scale(-1.0) if options.get("maximize") else optax.identity(),
        optax.add_decayed_weights(0.1),
        rj.scale_by_rms(0.9, 1e-6, centered=centered),
        optax.trace(momentum) if momentum else optax.identity(),
        optax.scale_by_learning_rate(0.01),
    )
    params = _params()
    grads = _gradients(params, seed=5)
    jax.tree.map(
        np.testing.assert_array_equal,
        _trajectory(tx, tx.update, params, grads),
        _trajectory(chained, chained.update, params, grads),
    )


@pytest.mark.parametrize("moment_storage", FORMATS)
def test_centered_constant_gradient_of_10_for_1000_steps_stays_finite(moment_storage):
    params = {"matrix": jnp.zeros((128, 256)), "small": jnp.zeros(8)}
    tx = rj.rmsprop(1e-3, centered=True, moment_storage=moment_storage)
    updates = _run_steps(
        tx, params, lambda p: jax.tree.map(lambda x: jnp.full_like(x, 10.0), p), 1000
    )
    for update in jax.tree.leaves(updates):
        assert np.all(np.isfinite(np.asarray(update)))


@pytest.mark.parametrize(
    ("moment_storage", "lowest_median_ratio"),
    [("bfloat16", 0.8), ("int8", 0.15), ("factored", 0.7)],
)
def test_centered_steps_on_nearly_constant_gradients_never_blow_up(
    moment_storage, lowest_median_ratio
):
    """Gradients 100x larger than their noise: the variance is 1e-4 of nu.

    Storing nu and mu with relative errors of 0.4% (bfloat16) or 11% (int8) and subtracting
    would leave noise 40x larger than the variance, clamped to 0 half the time: steps of
    g / eps. Storing the variance itself keeps each step within a small factor of float32's;
    int8's 7-bit mu adds its rounding to g - mu, so its steps come out smaller (median).
    """
    rng = np.random.default_rng(4)
    mean = rng.uniform(0.5, 2.0, (128, 256))
    grads = [{"w": jnp.asarray(mean + 0.01 * rng.normal(size=mean.shape))} for _ in range(120)]

    def steps(storage):
        tx = rj.scale_by_rms(decay=0.9, centered=True, moment_storage=storage)
        update, state = jax.jit(tx.update), tx.init(grads[0])
        out = []
        for g in grads:
            u, state = update(g, state)
            out.append(np.asarray(u["w"]))
        return np.stack(out[40:])

    reference, compressed = steps("float32"), steps(moment_storage)
    assert np.all(np.isfinite(compressed))
    ratio = np.abs(compressed) / np.abs(reference)
    assert np.max(np.abs(compressed)) <= 2 * np.max(np.abs(reference))
    assert np.max(ratio) < 2.5
    assert lowest_median_ratio < np.median(ratio) < 1.2


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("moment_storage", FORMATS)
def test_float16_gradients_of_magnitude_1000_give_finite_updates(moment_storage, centered):
    params = jax.tree.map(lambda p: p.astype(jnp.float16), _params())
    tx = rj.rmsprop(1e-3, centered=centered, moment_storage=moment_storage)
    signs = jax.tree.map(lambda p: jnp.where(p >= 0, 1000.0, -1000.0).astype(jnp.float16), params)
    updates = _run_steps(tx, params, lambda p: signs, 20)
    for update in jax.tree.leaves(updates):
        assert update.dtype == jnp.float16
        assert np.all(np.isfinite(np.asarray(update)))
        assert np.any(np.asarray(update) != 0)


@pytest.mark.parametrize("moment_storage", FORMATS)
def test_state_structure_does_not_depend_on_bias_correction(moment_storage):
    params = _params()
    with_correction = rj.rmsprop(0.1, bias_correction=True, moment_storage=moment_storage).init(
        params
    )
    without = rj.rmsprop(0.1, moment_storage=moment_storage).init(params)
    assert jax.tree.structure(with_correction) == jax.tree.structure(without)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), with_correction) == jax.tree.map(
        lambda x: (x.shape, x.dtype), without
    )


@pytest.mark.parametrize(
    ("moment_storage", "container"),
    [("bfloat16", None), ("int8", rj.QuantizedMoment), ("factored", rj.FactoredMoment)],
)
def test_second_moment_field_is_found_by_tree_get(moment_storage, container):
    """`nu` (or, centered, `variance`): per part a tree shaped like the parameters."""
    params = _params()
    for centered, field in ((False, "nu"), (True, "variance")):
        state = rj.rmsprop(0.1, centered=centered, moment_storage=moment_storage).init(params)
        stored = optax.tree_utils.tree_get(state, field)
        trees = [stored] if container is None else list(stored)
        assert container is None or isinstance(stored, container)
        for tree in trees:
            assert jax.tree.structure(tree) == jax.tree.structure(params)
            assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(tree))
        assert is_compressed(stored_leaf(stored, "matrix"))
        assert jax.tree.structure(optax.tree_utils.tree_get(state, "count")) == jax.tree.structure(
            0
        )


@pytest.mark.parametrize(
    ("moment_storage", "first_moment_storage", "nu_dtype", "mu_dtype"),
    [
        ("bfloat16", None, jnp.bfloat16, jnp.bfloat16),
        ("bfloat16", "int8", jnp.bfloat16, jnp.int8),
        ("bfloat16", "float32", jnp.bfloat16, jnp.float32),
        ("int8", None, jnp.uint8, jnp.bfloat16),
        ("int8", "int8", jnp.uint8, jnp.int8),
        ("int8", "float32", jnp.uint8, jnp.float32),
        ("float32", "float32", jnp.float32, jnp.float32),
    ],
)
def test_compressed_leaves_have_the_format_dtypes(
    moment_storage, first_moment_storage, nu_dtype, mu_dtype
):
    state = rj.scale_by_rms(
        centered=True, moment_storage=moment_storage, first_moment_storage=first_moment_storage
    ).init(_params())
    stored_nu = state.variance if hasattr(state, "variance") else state.nu
    leaf: Callable[[Any], Any] = lambda stored: getattr(stored, "codes", stored)  # noqa: E731
    assert leaf(stored_leaf(stored_nu, "matrix")).dtype == nu_dtype
    assert leaf(stored_leaf(state.mu, "matrix")).dtype == mu_dtype


def test_complex_parameters_compress_nu_and_keep_mu_complex():
    """nu = EMA of |g|**2 is real and compressed; no complex bfloat16 or int8 exists for mu."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(128, 128)) + 1j * rng.normal(size=(128, 128))
    params = {"z": jnp.asarray(z, jnp.complex64)}
    for moment_storage, nu_type in zip(
        FORMATS, [jax.Array, rj.QuantizedMoment, rj.FactoredMoment], strict=True
    ):
        tx = rj.scale_by_rms(centered=True, moment_storage=moment_storage)
        state = tx.init(params)
        updates, state = tx.update(params, state)
        assert isinstance(stored_leaf(second_moment_field(state), "z"), nu_type)
        assert is_compressed(stored_leaf(second_moment_field(state), "z")) or nu_type is jax.Array
        mu = stored_leaf(state.mu, "z")
        assert getattr(mu, "dense", mu).dtype == jnp.complex64
        assert updates["z"].dtype == jnp.complex64
        assert np.all(np.isfinite(np.asarray(updates["z"])))


def test_unknown_storage_format_is_rejected_with_its_name():
    with pytest.raises(ValueError, match="int4"):
        rj.rmsprop(0.1, moment_storage="int4")
    with pytest.raises(ValueError, match="moment_storage"):
        rj.scale_by_rms(moment_storage=cast(Any, None))  # not a `str`: rejected


@pytest.mark.parametrize("moment_storage", FORMATS)
def test_gradient_of_the_wrong_shape_is_rejected_with_its_path(moment_storage):
    params = _params()
    tx = rj.rmsprop(0.1, moment_storage=moment_storage)
    state = tx.init(params)
    grads = dict(params, matrix=jnp.zeros((128, 255)))
    with pytest.raises(ValueError, match=r"matrix.*\(128, 255\).*\(128, 256\)"):
        tx.update(grads, state, params)


@pytest.mark.parametrize("moment_storage", FORMATS)
def test_vmap_over_decay_matches_separate_runs(moment_storage):
    params = {"matrix": _params()["matrix"][:, :128], "small": _params()["small"]}
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p), params)

    def run(decay):
        tx = rj.rmsprop(
            0.01, decay=decay, centered=True, momentum=0.5, moment_storage=moment_storage
        )

        def step(carry, _):
            current, state = carry
            updates, state = tx.update(grads, state, current)
            return (optax.apply_updates(current, updates), state), None

        return jax.lax.scan(step, (params, tx.init(params)), length=3)[0][0]

    decays = jnp.asarray([0.5, 0.9, 0.99])
    swept = jax.jit(jax.vmap(run))(decays)
    single_run = jax.jit(run)
    for index, decay in enumerate(decays):
        single = single_run(decay)
        for name in params:
            # A rounding decision flipped by one ulp would move a step by one code (< 12%).
            np.testing.assert_allclose(swept[name][index], single[name], atol=0.01 * 0.12)
    assert not np.allclose(swept["matrix"][0], swept["matrix"][2])


@pytest.mark.parametrize("moment_storage", FORMATS)
def test_vmap_over_initial_scale_reaches_the_stored_state(moment_storage):
    params = _params()
    scales = jnp.asarray([0.0, 0.5, 2.0])
    states = jax.vmap(
        lambda s: rj.scale_by_rms(initial_scale=s, moment_storage=moment_storage).init(params)
    )(scales)
    for index, scale in enumerate([0.0, 0.5, 2.0]):
        single = rj.scale_by_rms(initial_scale=scale, moment_storage=moment_storage).init(params)
        for swept_leaf, single_leaf in zip(
            jax.tree.leaves(states), jax.tree.leaves(single), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(swept_leaf[index]), np.asarray(single_leaf))


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("moment_storage", FORMATS)
def test_orbax_round_trip_is_bit_for_bit_and_keeps_types(tmp_path, moment_storage, centered):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = _params()
    tx = rj.rmsprop(0.01, centered=centered, momentum=0.9, moment_storage=moment_storage)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    for _ in range(2):
        _, state = tx.update(grads, state, params)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    target = jax.eval_shape(tx.init, params)
    restored = checkpointer.restore(tmp_path / "state", target)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for saved, loaded in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert loaded.dtype == saved.dtype
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(saved))
    after_saved = tx.update(grads, state, params)
    after_restored = tx.update(grads, restored, params)
    for a, b in zip(jax.tree.leaves(after_saved), jax.tree.leaves(after_restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
