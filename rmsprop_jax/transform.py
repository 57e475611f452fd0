"""The RMSprop preconditioner and decoupled weight decay, as optax gradient transformations."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _nu_storage, _precision, _validation


class ScaleByRmsState(NamedTuple):
    """Step count and exponential moving average of squared gradients."""

    count: chex.Array  # shape=(), dtype=int32: the number of updates applied so far.
    # Per leaf: an array, or a `QuantizedArray` / `FactoredMoment` (see `nu_storage`).
    nu: optax.Updates


class ScaleByCenteredRmsState(NamedTuple):
    """Step count and moving averages of the gradients and of their squares."""

    count: chex.Array  # shape=(), dtype=int32: the number of updates applied so far.
    mu: optax.Updates
    # With a `nu_storage` other than "float32", the variance nu - |mu|**2 (see `nu_storage`).
    nu: optax.Updates


def _divide_by_rms(
    g: chex.Array, nu: chex.Array, eps: Any, eps_in_sqrt: bool, eps_is_positive: bool
) -> chex.Array:
    """`g / (sqrt(nu) + eps)` or `g / sqrt(nu + eps)`, defined as 0 where the denominator is 0.

    The denominator is 0 only when `eps == 0` and `nu == 0`, which (for `initial_scale == 0`)
    means every gradient so far was 0: the step is then 0, not 0/0 = NaN. When `eps` is known
    to be positive the guard cannot fire and is left out of the compiled step.
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
    return jnp.maximum(nu - jnp.real(mu * jnp.conj(mu)), 0)


def scale_by_rms(
    decay: chex.Numeric = 0.9,
    eps: chex.Numeric = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: chex.Numeric = 0.0,
    centered: bool = False,
    bias_correction: bool = False,
    nu_storage: str = "float32",
) -> optax.GradientTransformationExtraArgs:
    r"""Divides each gradient by the root of the moving average of its square.

    .. math::

        \nu_t &= \beta \nu_{t-1} + (1 - \beta) |g_t|^2 \\
        \mu_t &= \beta \mu_{t-1} + (1 - \beta) g_t \quad \text{(centered only)} \\
        v_t &= \hat\nu_t - |\hat\mu_t|^2 \ \text{(centered)}, \quad v_t = \hat\nu_t
              \ \text{(otherwise)} \\
        u_t &= g_t / (\sqrt{v_t} + \epsilon) \quad \text{or} \quad g_t / \sqrt{v_t + \epsilon}

    where :math:`\hat x = x / (1 - \beta^t)` with `bias_correction` and :math:`\hat x = x`
    without. The centered variance is clamped at 0 and a zero denominator gives a zero update,
    so the result is never NaN. Arithmetic runs in float32 (or the parameter's wider dtype);
    the update has the gradient's dtype. This is the preconditioner alone: no learning rate and
    no sign flip (see :func:`rmsprop_jax.rmsprop`).

    Args:
      decay: :math:`\beta`, the decay of the moving averages, in [0, 1].
      eps: :math:`\epsilon >= 0`, added to the denominator for numerical stability.
      eps_in_sqrt: add `eps` inside the square root (optax, TF1, Keras) instead of outside
        (PyTorch, the course).
      initial_scale: starting value of :math:`\nu` (0 in PyTorch, optax and Keras; 1 in TF1).
      centered: divide by the root of the variance :math:`\nu - |\mu|^2` instead of the
        second moment (Graves, 2013).
      bias_correction: divide the moving averages by :math:`1 - \beta^t` as Adam does. Not
        allowed with `centered`, whose debiased variance is exactly 0 after the first step.
      nu_storage: how the moving averages are stored between steps; the arithmetic is float32
        (or wider) in every format.

        - `"float32"` (default): 4 bytes per parameter.
        - `"bfloat16"`: 2 bytes, rounded stochastically (unbiased) with bits derived from the
          step count, so increments far below bfloat16's resolution still accumulate.
        - `"int8"`: about 1.02 bytes: blocks of up to 256 along the last axis, one float32
          scale per block, logarithmic codes over 12 orders of magnitude (signed for `mu`),
          stochastic rounding, exact zeros kept; leaves under 4096 elements stay float32.
        - `"factored"`: for leaves whose last two axes are both >= 128, only the moving
          averages of row and column means (Adafactor's rank-one estimate); other leaves stay
          float32. `mu` (centered) has no such structure and is stored as in `"bfloat16"`.

        With any format but `"float32"`, a centered state's `nu` holds the variance
        :math:`\nu - |\mu|^2`, updated without cancellation, instead of :math:`\nu`; see
        :mod:`rmsprop_jax._nu_storage`. `rj.state_bytes` reports the memory taken.

    Returns:
      An optax transformation whose state is :class:`ScaleByRmsState`, or
      :class:`ScaleByCenteredRmsState` when `centered`. The state's tree does not depend on
      `bias_correction`, so a checkpoint restores whichever way it is set.

    References:
      Tieleman and Hinton, Lecture 6.5 - RMSProp, 2012.
      https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf
      Graves, Generating Sequences With Recurrent Neural Networks, 2013.
      https://arxiv.org/abs/1308.0850
    """
    return _precision.with_compute_dtype(
        _scale_by_rms_in_compute_dtype(
            decay,
            eps,
            eps_in_sqrt=eps_in_sqrt,
            initial_scale=initial_scale,
            centered=centered,
            bias_correction=bias_correction,
            nu_storage=nu_storage,
        )
    )


def _scale_by_rms_in_compute_dtype(
    decay: chex.Numeric,
    eps: chex.Numeric,
    *,
    eps_in_sqrt: bool,
    initial_scale: chex.Numeric,
    centered: bool,
    bias_correction: bool,
    nu_storage: str,
) -> optax.GradientTransformation:
    """:func:`scale_by_rms` for gradients and parameters already in their compute dtype.

    For composing inside a transformation that does the casting once (as `rmsprop` does).
    """
    _validation.check_in_range("decay", decay, low=0.0, high=1.0)
    _validation.check_in_range("eps", eps, low=0.0)
    _validation.check_in_range("initial_scale", initial_scale, low=0.0)
    _validation.check_nu_storage(nu_storage)
    if centered and bias_correction:
        raise ValueError(
            "`centered=True` with `bias_correction=True` is degenerate: after one step the "
            "debiased variance nu/(1-decay) - (mu/(1-decay))**2 is exactly 0, so the update "
            "would be g / eps. Use one or the other."
        )
    if bias_correction:
        _validation.check_in_range("decay", decay, low=0.0, high=1.0, high_inclusive=False)
    eps_is_positive = _validation.is_concrete_and_positive(eps)
    decay, eps, initial_scale = map(_precision.as_hyperparameter, (decay, eps, initial_scale))

    def init_fn(params):
        count = jnp.zeros([], jnp.int32)
        if nu_storage != "float32":
            mu, nu = _nu_storage.init(nu_storage, params, initial_scale, centered)
            if centered:
                return ScaleByCenteredRmsState(count=count, mu=mu, nu=nu)
            return ScaleByRmsState(count=count, nu=nu)
        nu = jax.tree.map(
            lambda p: jnp.full_like(p, initial_scale, _precision.real_dtype(p.dtype)), params
        )
        if centered:
            return ScaleByCenteredRmsState(count=count, mu=optax.tree.zeros_like(params), nu=nu)
        return ScaleByRmsState(count=count, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        _validation.check_same_tree(updates, _nu_storage.logical_shapes(state.nu))
        count = optax.safe_increment(state.count)
        if nu_storage != "float32":
            mu = state.mu if centered else None
            mu, nu, variance = _nu_storage.update(updates, mu, state.nu, decay, count)
            # `variance` is nu itself unless centered, and centered excludes bias correction.
            if bias_correction:
                variance = optax.tree.bias_correction(variance, decay, count)
        else:
            nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, decay, 2)
            nu_hat = optax.tree.bias_correction(nu, decay, count) if bias_correction else nu
            if centered:
                mu = optax.tree.update_moment(updates, state.mu, decay, 1)
                variance = jax.tree.map(_centered_variance, nu_hat, mu)
            else:
                variance = nu_hat
        updates = jax.tree.map(
            lambda g, v: (
                None if g is None else _divide_by_rms(g, v, eps, eps_in_sqrt, eps_is_positive)
            ),
            updates,
            variance,
            is_leaf=lambda x: x is None,
        )
        if centered:
            return updates, ScaleByCenteredRmsState(count=count, mu=mu, nu=nu)
        return updates, ScaleByRmsState(count=count, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class DecoupledWeightDecayState(NamedTuple):
    """Step count, for evaluating a learning-rate schedule."""

    count: chex.Array  # shape=(), dtype=int32.


def add_decoupled_weight_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: chex.Numeric,
) -> optax.GradientTransformationExtraArgs:
    r"""Adds :math:`-\eta_t \lambda p` to the update: weight decay applied to the parameter.

    .. math::

        u_t \leftarrow u_t - \eta_t \lambda p_{t-1}

    Unlike L2 regularization (:func:`optax.add_decayed_weights` before the preconditioner), the
    decay is neither divided by the RMS nor fed through a momentum buffer.

    Args:
      learning_rate: :math:`\eta_t`, a number or an optax schedule of the step count.
      weight_decay: :math:`\lambda >= 0`.

    Returns:
      An optax transformation; it needs `params` in `update`.

    References:
      Loshchilov and Hutter, Decoupled Weight Decay Regularization, 2019.
      https://arxiv.org/abs/1711.05101
    """
    return _precision.with_compute_dtype(
        _add_decoupled_weight_decay_in_compute_dtype(learning_rate, weight_decay)
    )


def _add_decoupled_weight_decay_in_compute_dtype(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: chex.Numeric,
) -> optax.GradientTransformation:
    """:func:`add_decoupled_weight_decay` for updates and parameters in their compute dtype."""
    _validation.check_in_range("learning_rate", learning_rate, low=0.0)
    _validation.check_in_range("weight_decay", weight_decay, low=0.0)
    learning_rate, weight_decay = map(_precision.as_hyperparameter, (learning_rate, weight_decay))

    def init_fn(params):
        del params
        return DecoupledWeightDecayState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        rate = learning_rate(state.count) if callable(learning_rate) else learning_rate
        rate = _precision.as_hyperparameter(rate)
        updates = jax.tree.map(
            lambda u, p: None if u is None else u - rate * weight_decay * p,
            updates,
            params,
            is_leaf=lambda x: x is None,
        )
        return updates, DecoupledWeightDecayState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
