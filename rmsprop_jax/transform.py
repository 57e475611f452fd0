"""The RMSprop preconditioner and decoupled weight decay, as optax gradient transformations."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import (
    _jax_compat,
    _large_leaves,
    _placement,
    _precision,
    _validation,
    storage,
)
from rmsprop_jax.storage import _rounding
from rmsprop_jax.storage._format import abs_sq


class ScaleByRmsState(NamedTuple):
    """Step count and exponential moving average of squared gradients.

    Examples:
      >>> state = rj.scale_by_rms().init({"w": jnp.ones((2, 3))})
      >>> type(state).__name__, state.count, state.nu["w"].shape
      ('ScaleByRmsState', Array(0, dtype=int32), (2, 3))
    """

    count: chex.Array  # shape=(), dtype=int32: the number of updates applied so far.
    # A tree of arrays, or a `QuantizedMoment` / `FactoredMoment` of trees (`moment_storage`).
    nu: optax.Updates


class ScaleByCenteredRmsState(NamedTuple):
    """Step count and moving averages of the gradients and of their squares (float32).

    Examples:
      >>> state = rj.scale_by_rms(centered=True).init({"w": jnp.ones((2, 3))})
      >>> type(state).__name__, state._fields
      ('ScaleByCenteredRmsState', ('count', 'mu', 'nu'))
    """

    count: chex.Array  # shape=(), dtype=int32: the number of updates applied so far.
    mu: optax.Updates
    nu: optax.Updates


class ScaleByCenteredVarianceState(NamedTuple):
    """Step count, moving average of the gradients, and the variance `ν - |μ|²`.

    The state of a centered :func:`scale_by_rms` whose `moment_storage` compresses: storing
    ν and μ with rounding errors and subtracting would lose every significant digit of a
    small variance, so the variance itself is kept (see :func:`scale_by_rms`).

    Examples:
      >>> tx = rj.scale_by_rms(centered=True, moment_storage="bfloat16")
      >>> state = tx.init({"w": jnp.ones((2, 3))})
      >>> type(state).__name__, state._fields, state.variance["w"].dtype
      ('ScaleByCenteredVarianceState', ('count', 'mu', 'variance'), dtype(bfloat16))
    """

    count: chex.Array  # shape=(), dtype=int32: the number of updates applied so far.
    mu: optax.Updates
    variance: optax.Updates


# The first JAX release whose XLA compiles the per-leaf calls of `scale_by_rms` correctly when a
# gradient is a constant it folds (one computed in the traced function from captured arrays).
# Before it, XLA folded a transposed gradient passed to a call in the wrong layout, so updates
# and their derivatives came out wrong (measured with JAX 0.5.3, 0.6.2, 0.7.2 and 0.8.0; correct
# with 0.8.2, 0.9.2 and 0.10.2): those releases trace every leaf in place.
PER_LEAF_JIT_FROM = (0, 8, 2)


def _bias_correction(decay: Any, count: chex.Array) -> chex.Array:
    """1 - decay**count, as -expm1(count log decay), with `log decay` of a Python float taken in
    float64.

    The moving averages add (1 - decay) g², which a Python float gives exactly: computed as
    `1 - decay**count` in float32 the correction instead starts from `decay` rounded to float32,
    which moves 1 - decay by up to 3e-8. The update was 0.66% too large at decay = 0.999999
    and 0 at decay = 0.99999999 (rounded to 1, the correction was 0). A count of 0 (no update
    yet) gives 0, as 1 - decay**0 does, whatever the decay.
    """
    log_decay: Any
    if isinstance(decay, int | float):
        log_decay = math.log(decay) if decay > 0 else -math.inf
    else:
        log_decay = jnp.log(decay)
    return -jnp.expm1(jnp.where(count > 0, count * log_decay, 0.0))


def _divide_by_rms(
    g: chex.Array, nu: chex.Array, eps: Any, eps_in_sqrt: bool, eps_is_positive: bool
) -> chex.Array:
    """`g / (sqrt(nu) + eps)` or `g / sqrt(nu + eps)`, defined as 0 where the denominator is 0.

    The denominator is 0 only when `eps` is 0 in float32 (0, or a positive number below its
    smallest normal, which XLA:CPU flushes to 0) and `nu == 0`, which (for `initial_scale == 0`)
    means every gradient so far was 0: the step is then 0, not 0/0 = NaN. When `eps` is known
    to be a normal positive number the guard cannot fire and is left out of the compiled step.
    """
    denominator = jnp.sqrt(nu + eps) if eps_in_sqrt else jnp.sqrt(nu) + eps
    if eps_is_positive:
        return g / denominator
    # Test for == 0 rather than > 0, so that a NaN gradient still yields a NaN update (which
    # optax.apply_if_finite can see) instead of silently freezing the coordinate. lax.select
    # rather than jnp.where: no nested jit per leaf, which matters to compile time at 1000s of
    # leaves.
    zero = denominator == 0
    safe = jax.lax.select(zero, jnp.ones_like(denominator), denominator)
    quotient = g / safe
    return jax.lax.select(zero, jnp.zeros_like(quotient), quotient)


def _centered_variance(nu: chex.Array, mu: chex.Array) -> chex.Array:
    # nu - |mu|**2 is a variance, >= 0 in exact arithmetic, but rounding makes it slightly
    # negative under near-constant gradients; sqrt of that would be NaN (Graves 2013, eq. 40).
    # |mu|**2 <= nu, so |mu|**2 overflows only with nu: capping it keeps inf - inf from
    # turning an overflowed (infinite) nu into NaN.
    return jnp.maximum(nu - jnp.minimum(abs_sq(mu), jnp.finfo(nu.dtype).max), 0)


def _check_state_type(state: Any, expected: type, *, centered: bool, moment_storage: str) -> None:
    """Raises `ValueError` unless `state` is an `expected` (a state of this kind of optimizer)."""
    if not isinstance(state, expected):
        raise ValueError(
            f"scale_by_rms(centered={centered}, moment_storage={moment_storage!r}) keeps a "
            f"{expected.__name__}, but was given a {type(state).__name__}: the state was made "
            "by another optimizer's init. Start from this optimizer's init(params), or restore "
            "a checkpoint into a target built by it."
        )


def scale_by_rms(
    decay: chex.Numeric = 0.9,
    eps: chex.Numeric = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: chex.Numeric = 0.0,
    centered: bool = False,
    bias_correction: bool = False,
    moment_storage: str = "float32",
    first_moment_storage: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Divides each gradient by the root of the moving average of its square.

    For a gradient g at step t:

    .. math::

        \nu_t = \beta \nu_{t-1} + (1 - \beta) |g_t|^2

        \mu_t = \beta \mu_{t-1} + (1 - \beta) g_t

        u_t = g_t / (\sqrt{v_t} + \epsilon)

    where μ (the mean gradient) is kept only when `centered`, the variance estimate v is
    `ν - |μ|²` when centered and ν otherwise, each average divided by 1 - βᵗ first with
    `bias_correction`, and the denominator is √(v + ε) with `eps_in_sqrt`. The centered
    variance is clamped at 0 and a zero denominator gives a zero update, so the result is
    never NaN. Arithmetic runs in float32 (or the parameter's wider dtype); the update has the
    gradient's dtype. This is the preconditioner alone: no learning rate and no sign flip (see
    :func:`rmsprop_jax.rmsprop`).

    Args:
      decay: β, the decay of the moving averages, in [0, 1].
      eps: ε ≥ 0, added to the denominator for numerical stability.
      eps_in_sqrt: add `eps` inside the square root (optax, TF1, Keras) instead of outside
        (PyTorch, the course).
      initial_scale: starting value of ν (0 in PyTorch, optax and Keras; 1 in TF1).
      centered: divide by the root of the variance `ν - |μ|²` instead of the second moment
        (Graves, 2013).
      bias_correction: divide the moving averages by 1 - βᵗ as Adam does. Not allowed with
        `centered`, whose debiased variance is exactly 0 after the first step.
      moment_storage: how the moving averages (ν, and μ when centered) are stored between
        steps; the arithmetic is float32 (or wider) in every format.

        - `"float32"` (default): 4 bytes per parameter and average, the compute dtype.
        - `"bfloat16"`: 2 bytes, rounded stochastically (unbiased) with bits derived from the
          step count, so increments far below bfloat16's resolution still accumulate.
        - `"int8"`: about 1.02 bytes: blocks of up to 256 along the last axis, one float32
          scale per block, 8 levels per octave over 9.5 orders of magnitude (signed for `mu`,
          4.7 orders), stochastic rounding, exact zeros kept; leaves under 4096 elements stay
          dense. A block never spans two rows: a last axis of n < 256 elements takes
          1 + 4/n bytes per element (5 for a column of shape (N, 1)).
        - `"factored"`: for leaves whose last two axes are both ≥ 128, only the moving
          averages of row and column means (Adafactor's rank-one estimate); other leaves stay
          dense.

        With a compressed format, a centered state is a :class:`ScaleByCenteredVarianceState`
        whose `variance` field holds `ν - |μ|²`, updated without cancellation, instead of ν;
        see ``rmsprop_jax.storage``. Every format keeps a non-finite value of one element to
        that element. `rj.state_bytes` reports the memory.
      first_moment_storage: how μ (centered only) is stored, where ν is compressed and the
        state keeps the variance: `"float32"`, `"bfloat16"` or `"int8"` with `"bfloat16"` and
        `"int8"`, `"bfloat16"` with `"factored"`. None (default): as `moment_storage` says,
        but `"bfloat16"` for `"int8"` (1 byte per parameter more than 8-bit μ, for a step
        15-18% shorter, centered with momentum, in `benchmarks/memory.py`'s record) and
        `"factored"` (μ is signed and has no rank-one structure). A float32 state keeps μ
        in float32: its `ν - |μ|²` would cancel with a rounded μ. States with 8-bit μ (what
        `"int8"` kept in release 0.1.0) restore with `first_moment_storage="int8"`.

    Returns:
      An optax transformation whose state is :class:`ScaleByRmsState`, or
      :class:`ScaleByCenteredRmsState` (:class:`ScaleByCenteredVarianceState` for compressed
      formats) when `centered`. The state's tree does not depend on
      `bias_correction`, so a checkpoint restores whichever way it is set.

    Examples:
      >>> params = {"w": jnp.array([1.0, -2.0, 3.0])}
      >>> tx = rj.scale_by_rms(decay=0.9)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -0.5, 0.0])}, tx.init(params))
      >>> updates["w"]
      Array([ 3.1622775, -3.1622775,  0.       ], dtype=float32)
      >>> state.nu["w"]
      Array([0.025, 0.025, 0.   ], dtype=float32)

    References:
      Tieleman and Hinton, Lecture 6.5 - RMSProp, 2012.
      https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf
      Graves, Generating Sequences With Recurrent Neural Networks, 2013.
      https://arxiv.org/abs/1308.0850
    """
    return preconditioner(
        decay,
        eps,
        eps_in_sqrt=eps_in_sqrt,
        initial_scale=initial_scale,
        centered=centered,
        bias_correction=bias_correction,
        moment_storage=moment_storage,
        first_moment_storage=first_moment_storage,
    )[0]


# (gradients, new state, parameters) -> the step (see `preconditioner`).
StepsFromState = Callable[[optax.Updates, Any, Any], optax.Updates]
# (gradient, parameter, *scalars) -> the gradient the averages take in, for one leaf; and the
# scalars (see `preconditioner`).
GradientOf = tuple[Callable[..., chex.Array], tuple[Any, ...]]


def preconditioner(
    decay: chex.Numeric = 0.9,
    eps: chex.Numeric = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: chex.Numeric = 0.0,
    centered: bool = False,
    bias_correction: bool = False,
    moment_storage: str = "float32",
    first_moment_storage: str | None = None,
    gradient_of: GradientOf | None = None,
) -> tuple[optax.GradientTransformationExtraArgs, StepsFromState | None]:
    """:func:`scale_by_rms` (same arguments), and its step computed from its new state.

    Every format computes the step from the averages it has just stored, so the step is a
    function of the gradient and the new state alone: the second function maps
    `(gradients, new_state, params)` to the updates that `update` returned with `new_state`,
    the same arithmetic on the same values. It is None where the step needs more than the new state
    (centered, the factored format keeps the non-finite entries of what was averaged in only
    while the step is computed). Its inputs are in the compute dtype (float32 for narrower
    parameters), as inside :func:`rmsprop_jax.rmsprop`, which uses it (see
    ``rmsprop_jax._recomputed_steps``).

    With `gradient_of = (function, scalars)`, each leaf's gradient is first
    `function(g, p, *scalars)` (p None where no parameters are given for the leaf): what
    stages before the preconditioner would compute (`-g`, `g + λp`), computed inside it, in
    each of its readers rather than written whole (4 bytes per parameter): the factored
    format's two statistics read g, p and the scalars through their optimization barriers
    (a scalar closed over would be one broadcast common to both, written whole), and a
    compressed centered state's `mu` update reads them behind the barrier that orders it
    after the variance's; the step then reads them once `mu` is written.

    Examples:
      >>> from rmsprop_jax.transform import preconditioner
      >>> tx, steps_from_state = preconditioner(decay=0.9, moment_storage="int8")
      >>> grads = {"w": jnp.linspace(-1.0, 1.0, 8192)}
      >>> updates, state = tx.update(grads, tx.init(grads))
      >>> bool(jnp.all(steps_from_state(grads, state, grads)["w"] == updates["w"]))
      True
    """
    for name, flag in (
        ("eps_in_sqrt", eps_in_sqrt),
        ("centered", centered),
        ("bias_correction", bias_correction),
    ):
        _validation.check_flag(name, flag)
    _validation.check_in_range("decay", decay, low=0.0, high=1.0)
    _validation.check_in_range("eps", eps, low=0.0)
    _validation.check_in_range("initial_scale", initial_scale, low=0.0)
    fmt = storage.get(moment_storage)
    mu_fmt = storage.first_moment_format(fmt, first_moment_storage)
    if first_moment_storage is not None and not centered:
        raise ValueError(
            f"`first_moment_storage` ({first_moment_storage!r}) says how the mean gradient μ of "
            "centered RMSprop is stored; without `centered=True` there is no μ. Leave it None."
        )
    if centered and bias_correction:
        raise ValueError(
            "`centered=True` with `bias_correction=True` is degenerate: after one step the "
            "debiased variance nu/(1-decay) - (mu/(1-decay))**2 is exactly 0, so the update "
            "would be g / eps. Use one or the other."
        )
    if bias_correction:
        _validation.check_in_range("decay", decay, low=0.0, high=1.0, high_inclusive=False)
    eps_is_positive = _validation.is_concrete_and_positive_in_float32(eps)
    decay, eps, initial_scale = map(_precision.as_hyperparameter, (decay, eps, initial_scale))
    keeps_variance = centered and fmt.stores_centered_variance

    def init_fn(params):
        count = jnp.zeros([], jnp.int32)
        nu = fmt.init(params, initial_scale, signed=False, dtype_of=_precision.squared_dtype)
        if not centered:
            return ScaleByRmsState(count=count, nu=nu)
        mu = mu_fmt.init(params, 0.0, signed=True, dtype_of=jnp.result_type)
        if keeps_variance:  # nu - |mu|**2 starts at initial_scale - 0.
            return ScaleByCenteredVarianceState(count=count, mu=mu, variance=nu)
        return ScaleByCenteredRmsState(count=count, mu=mu, nu=nu)

    state_type = (
        ScaleByCenteredVarianceState
        if keeps_variance
        else ScaleByCenteredRmsState
        if centered
        else ScaleByRmsState
    )

    def sources_of(g, p):
        """Where `gradient_of` computes a leaf's gradient, that computation and the arrays it
        reads; else None (the gradient is `g`)."""
        if gradient_of is None:
            return None
        function, scalars = gradient_of
        return function, (g, p, *scalars)

    def gradient(g, sources):
        return g if sources is None else sources[0](*sources[1])

    def leaf_update(g, p, nu, mu, nu_seed, mu_seed, correction):
        """A leaf's step, new nu and new mu; `correction` = 1 - decay**t (None without bias
        correction)."""
        sources = sources_of(g, p)
        g = gradient(g, sources)

        def first_moment(g, mu, *earlier, block_maxima=None, sources=None):
            """The new mu and its value, written once the arrays `earlier` are.

            Given the `sources` of `g` (a whole leaf's), `g` is computed again here from
            those arrays read once `earlier` is written: XLA cannot then share it with the
            variance's update, and does not write it whole (4 bytes per parameter).
            """
            if sources is not None and earlier:
                function, arrays = sources
                mu, arrays = storage.after((mu, arrays), *earlier)
                g = gradient(g, (function, arrays))
            else:
                mu = storage.after(mu, *earlier)
            # mu_t = decay * mu_{t-1} + (1 - decay) * g_t
            return mu_fmt.leaf_update(
                mu,
                g,
                decay,
                mu_seed,
                signed=True,
                block_maxima=block_maxima,
            )

        def moments(g, nu, mu, sources=None):
            """The new nu and mu, the variance estimate and what was averaged into nu
            (`sources`: see `first_moment`)."""
            if not centered:
                # nu_t = decay * nu_{t-1} + (1 - decay) * |g_t|**2
                folded = abs_sq(g)
                nu, variance = fmt.leaf_update(nu, folded, decay, nu_seed, signed=False)
            elif keeps_variance:
                # nu_t - |mu_t|**2 = decay * (nu_{t-1} - |mu_{t-1}|**2)
                #                    + (1 - decay) * decay * |g_t - mu_{t-1}|**2
                # (no cancellation). mu_{t-1} is read before mu is overwritten in place.
                folded = decay * _large_leaves.squared_distance(g, mu, mu_fmt)
                nu_maxima, mu_maxima = storage.shared_block_maxima(
                    (fmt, nu, folded, False), (mu_fmt, mu, g, True)
                )
                nu, variance = fmt.leaf_update(
                    nu, folded, decay, nu_seed, signed=False, block_maxima=nu_maxima
                )
                mu, _ = first_moment(g, mu, nu, block_maxima=mu_maxima, sources=sources)
            else:
                folded = abs_sq(g)
                nu, second_moment = fmt.leaf_update(nu, folded, decay, nu_seed, signed=False)
                mu, mean = first_moment(g, mu)
                variance = _centered_variance(second_moment, mean)
            return nu, mu, variance, folded

        if storage.updates_by_rows(fmt, g):
            nu, mu, variance = _large_leaves.moments_by_rows(
                moments,
                first_moment,
                fmt,
                mu_fmt,
                g,
                nu,
                mu,
                decay=decay,
                centered=centered,
                sources=sources,
            )
        else:
            nu, mu, variance, _ = moments(g, nu, mu, sources)
        return step(g, variance, correction), nu, mu

    def step(g, variance, correction):
        if bias_correction:
            variance = variance / correction.astype(variance.dtype)
        # u_t = g_t / (sqrt(nu_t) + eps)
        return _divide_by_rms(g, variance, eps, eps_in_sqrt, eps_is_positive)

    def leaf_step(g, p, nu, mu, correction):
        """A leaf's step from its new stored averages, as `leaf_update` computes it."""
        sources = sources_of(g, p)
        if keeps_variance and sources is not None:
            # mu's update reads the parameters after the variance's (`first_moment`): read
            # here once mu is written, they are not overwritten (by the update this step
            # gives) before it, and need no copy (4 bytes per parameter).
            function, arrays = sources
            sources = function, storage.after(arrays, mu)
        g = gradient(g, sources)
        squared = abs_sq(g)
        if centered and not keeps_variance:
            second_moment = fmt.leaf_decode(nu, squared, signed=False)
            variance = _centered_variance(second_moment, mu_fmt.leaf_decode(mu, g, signed=True))
        else:  # The format's new average, as its update gives it.
            folded = None if fmt.stores_non_finite else squared
            variance = fmt.leaf_average_after_rows(nu, squared, folded)
        return step(g, variance, correction)

    # Under a trace, each kind of leaf (shape, dtype, stored layout) is traced once rather than
    # once per leaf: jit caches the trace (for the life of this transformation), and a model
    # repeats a few shapes many times. XLA inlines the calls again, so the compiled step is the
    # one the leaves traced one by one would give; the hyperparameters stay closed over, as
    # constants where they are constants. Eager updates run op by op: through jit, each kind
    # of leaf would first be compiled. JAX releases before PER_LEAF_JIT_FROM trace every leaf.
    per_leaf_jit = _jax_compat.JAX_VERSION >= PER_LEAF_JIT_FROM
    traced_leaf_update = jax.jit(leaf_update) if per_leaf_jit else leaf_update
    traced_leaf_step = jax.jit(leaf_step) if per_leaf_jit else leaf_step

    def stored_averages(updates, state):
        """The gradients' leaves and tree, and each leaf's stored nu and mu (None if not
        centered), after checking that `state` is this transformation's, for `updates`."""
        _check_state_type(state, state_type, centered=centered, moment_storage=fmt.name)
        stored_nu = state.variance if keeps_variance else state.nu
        _validation.check_update_count(state.count)
        storage.check_stored(fmt, stored_nu, name="variance" if keeps_variance else "nu")
        storage.check_precision(fmt, stored_nu, name="variance" if keeps_variance else "nu")
        if centered:
            storage.check_stored(mu_fmt, state.mu, name="mu", option="first_moment_storage")
        _validation.check_same_tree(updates, storage.logical_shapes(fmt, stored_nu))
        grads, treedef = jax.tree.flatten(updates, is_leaf=lambda x: x is None)
        nus = fmt.split(stored_nu, treedef)
        mus = mu_fmt.split(state.mu, treedef) if centered else [None] * len(grads)
        return grads, treedef, nus, mus

    def parameters(params, treedef):
        """Each leaf's parameter, where `gradient_of` reads them; else None."""
        if gradient_of is None or params is None:
            return [None] * treedef.num_leaves
        return treedef.flatten_up_to(params)

    def steps_from_state(updates, state, params=None):
        grads, treedef, nus, mus = stored_averages(updates, state)
        correction = _bias_correction(decay, state.count) if bias_correction else None
        traced = any(isinstance(g, jax.core.Tracer) for g in grads)
        run = traced_leaf_step if traced else leaf_step
        return treedef.unflatten(
            [
                None if g is None else run(g, p, nu, mu, correction)
                for g, p, nu, mu in zip(grads, parameters(params, treedef), nus, mus, strict=True)
            ]
        )

    def update_fn(updates, state, params=None):
        grads, treedef, nus, mus = stored_averages(updates, state)
        count = optax.safe_increment(state.count)
        correction = _bias_correction(decay, count) if bias_correction else None
        seeds = [(None, None)] * len(grads)
        if fmt.rounds or (centered and mu_fmt.rounds):
            seeds = _rounding.step_seeds(count, len(grads))

        traced = any(isinstance(g, jax.core.Tracer) for g in grads)
        run = traced_leaf_update if traced else leaf_update
        steps: list[Any] = []
        new_nus: list[Any] = []
        new_mus: list[Any] = []
        leaves = zip(grads, parameters(params, treedef), nus, mus, strict=True)
        for index, (g, p, nu, mu) in enumerate(leaves):
            if g is None:
                steps.append(None)
                new_nus.append(None)
                new_mus.append(None)
                continue
            step, nu, mu = run(g, p, nu, mu, *seeds[index], correction)
            steps.append(step)
            new_nus.append(nu)
            new_mus.append(mu)
        updates = treedef.unflatten(steps)
        nu = fmt.join(new_nus, treedef)
        if not centered:
            return updates, ScaleByRmsState(count=count, nu=nu)
        mu = mu_fmt.join(new_mus, treedef)
        if keeps_variance:
            return updates, ScaleByCenteredVarianceState(count=count, mu=mu, variance=nu)
        return updates, ScaleByCenteredRmsState(count=count, mu=mu, nu=nu)

    transformation = _validation.scalar_hyperparameters(
        _placement.placed(
            _precision.with_compute_dtype(optax.GradientTransformation(init_fn, update_fn))
        ),
        decay=decay,
        eps=eps,
        initial_scale=initial_scale,
    )
    recomputable = fmt.stores_non_finite or not centered
    return transformation, steps_from_state if recomputable else None
