"""`keras_rmsprop`: the trajectory of Keras 3's `keras.optimizers.RMSprop` in optax."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _placement, _precision, _validation
from rmsprop_jax.alias import rmsprop
from rmsprop_jax.compat import _common, _keras_ema


def _clip_each_by_norm(clipnorm: float) -> optax.GradientTransformation:
    """Keras `clipnorm`: each leaf scaled by `clipnorm / max(||g||, clipnorm)`."""
    return optax.stateless_with_tree_map(
        lambda g, _: g * clipnorm / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(g))), clipnorm)
    )


def _clip_by_global_norm(clipnorm: float) -> optax.GradientTransformation:
    """Keras `global_clipnorm`: all leaves scaled by `clipnorm * min(1 / norm, 1 / clipnorm)`.

    Keras's own formula rather than `optax.clip_by_global_norm`, which computes the same
    scale differently: it rounds differently, and for a non-finite norm it keeps the finite
    entries where Keras makes the whole gradient NaN.
    """

    def clip(updates, params):
        del params
        norm = optax.tree.norm(updates)
        scale = clipnorm * jnp.minimum(1.0 / norm, 1.0 / clipnorm) + (norm - norm)
        return jax.tree.map(lambda g: g * scale, updates)

    return optax.stateless(clip)


def _gradient_clipping(
    clipnorm: float | None, clipvalue: float | None, global_clipnorm: float | None
) -> optax.GradientTransformation:
    for name, value in (
        ("clipnorm", clipnorm),
        ("clipvalue", clipvalue),
        ("global_clipnorm", global_clipnorm),
    ):
        _validation.check_in_range(name, value, low=0.0, optional=True)
    for name, value in (("clipnorm", clipnorm), ("global_clipnorm", global_clipnorm)):
        # A norm is divided by max(norm, value): flushed to 0 in float32, a zero gradient
        # would give 0 / 0. Keras treats 0 (as None) as no clipping.
        if value and not (
            isinstance(value, jax.core.Tracer)
            or _validation.is_concrete_and_positive_in_float32(value)
        ):
            raise ValueError(
                f"`{name}` must be 0 or None (no clipping) or at least float32's smallest "
                f"normal number {_validation.FLOAT32_SMALLEST_NORMAL:.8g} (a smaller one is "
                f"flushed to 0), got {value!r}."
            )
    given = [v is not None for v in (clipnorm, clipvalue, global_clipnorm)]
    if sum(given) > 1:
        raise ValueError(
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set, got "
            f"clipnorm={clipnorm}, clipvalue={clipvalue}, global_clipnorm={global_clipnorm}."
        )
    # Keras treats 0 like None: no clipping.
    if clipnorm:
        return _clip_each_by_norm(clipnorm)
    if global_clipnorm:
        return _clip_by_global_norm(global_clipnorm)
    if clipvalue:
        return optax.clip(clipvalue)
    return optax.identity()


def _check_keras_only_arguments(
    loss_scale_factor: float | None,
    gradient_accumulation_steps: int | None,
) -> int | None:
    """Checks the two; returns `gradient_accumulation_steps` as a Python int (optax.MultiSteps
    takes anything else for a schedule), or None where accumulation is off."""
    if loss_scale_factor is not None:
        _validation.check_in_range("loss_scale_factor", loss_scale_factor, low=0.0)
        traced = isinstance(loss_scale_factor, jax.core.Tracer)
        if not (traced or _validation.is_concrete_and_positive_in_float32(loss_scale_factor)):
            # The gradients are divided by it: flushed to 0 in float32, they would be NaN.
            raise ValueError(
                "`loss_scale_factor` must be positive (or None), at least float32's smallest "
                f"normal number {_validation.FLOAT32_SMALLEST_NORMAL:.8g} (a smaller one is "
                f"flushed to 0), got {loss_scale_factor!r}."
            )
    if not gradient_accumulation_steps:  # Keras takes 0 as None, as it tests the truth of it.
        return None
    return _validation.check_count(
        "gradient_accumulation_steps", gradient_accumulation_steps, low=2, or_none=True
    )


def keras_rmsprop(
    learning_rate: optax.ScalarOrSchedule = 0.001,
    rho: chex.Numeric = 0.9,
    momentum: chex.Numeric = 0.0,
    epsilon: chex.Numeric = 1e-7,
    centered: bool = False,
    weight_decay: chex.Numeric | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Keras 3's RMSprop: same arguments, defaults and parameter trajectory.

    For a gradient g (first divided by `loss_scale_factor`, then clipped), parameter p and
    step t:

    .. math::

        v_t = \rho v_{t-1} + (1 - \rho) g_t^2

        s_t = \eta_t g_t / \sqrt{v_t + \epsilon}

        b_t = \mu b_{t-1} + s_t

        p_t = p_{t-1} - \eta_t \lambda p_{t-1} - b_t

    When `centered`, the mean gradient ḡ (averaged as v is) is kept too and v - ḡ² replaces v
    under the root; b = s when `momentum` is 0. `epsilon` sits inside the square root and the
    learning rate is applied before the momentum buffer. Weight decay is decoupled: Keras
    subtracts η·λ·p from the variable before the step, so the decay is neither divided by the
    RMS nor fed through the buffer. A schedule passed as `learning_rate` must be an optax
    schedule of the step count (Keras calls its schedules with `optimizer.iterations`, the
    number of `apply` calls so far, which is the same count; `optax.exponential_decay` is
    `keras.optimizers.schedules.ExponentialDecay`).

    Args:
      learning_rate: η ≥ 0, a number or an optax schedule of the step count.
      rho: ρ in [0, 1], the decay of the moving averages.
      momentum: μ in [0, 1); 0 means no buffer.
      epsilon: ε ≥ 0, added inside the square root.
      centered: normalize by an estimate of the gradient's variance.
      weight_decay: decoupled decay λ ≥ 0, or None for none.
      clipnorm: clip each gradient leaf to this L2 norm (`g * c / max(||g||, c)`).
      clipvalue: clip each gradient element to [-clipvalue, clipvalue].
      global_clipnorm: scale all gradients together so their joint L2 norm is at most this.
        At most one of the three clipping arguments may be set; 0 means no clipping.
      use_ema: keep Keras's moving average of the weights in the state (see
        ``rmsprop_jax.compat._keras_ema``); read it with
        :func:`rmsprop_jax.compat.keras_ema_weights`. `update` then needs `params`.
      ema_momentum: the average's momentum (ignored when `use_ema` is False, as in Keras).
      ema_overwrite_frequency: replace the weights by their average every this many
        updates; None never does (ignored when `use_ema` is False).
      loss_scale_factor: divide incoming gradients by this (they are gradients of a loss
        multiplied by it).
      gradient_accumulation_steps: average this many successive gradients and update once
        per that many calls (zero updates in between), through :class:`optax.MultiSteps`. As
        in Keras, a schedule still sees the number of calls, not of updates.
      name: accepted for compatibility; Keras uses it to name variables.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; `update` needs `params` when
      `weight_decay` is set. Complex parameters raise `TypeError` at `init`.

    Examples:
      >>> import keras
      >>> v = keras.Variable(np.array([1.0, -2.0], np.float32))
      >>> keras.optimizers.RMSprop(learning_rate=0.01).apply([np.array([0.5, -0.5])], [v])
      >>> tx = rj.compat.keras_rmsprop(learning_rate=0.01)
      >>> updates, _ = tx.update(jnp.array([0.5, -0.5]), tx.init(jnp.zeros(2)))
      >>> np.asarray(v.value).round(4), (jnp.array([1.0, -2.0]) + updates).round(4)
      (array([ 0.9684, -1.9684], dtype=float32), Array([ 0.9684, -1.9684], dtype=float32))

    References:
      Keras, keras.optimizers.RMSprop.
      https://keras.io/api/optimizers/rmsprop/
      Tieleman and Hinton, Lecture 6.5 - RMSProp, 2012.
      https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf
    """
    del name  # A label for Keras's variables.
    _validation.check_in_range("learning_rate", learning_rate, low=0.0, schedule=True)
    _validation.check_in_range("rho", rho, low=0.0, high=1.0)
    _validation.check_in_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    _validation.check_in_range("epsilon", epsilon, low=0.0)
    _validation.check_in_range("weight_decay", weight_decay, low=0.0, optional=True)
    _validation.check_flag("centered", centered)
    _validation.check_flag("use_ema", use_ema)
    gradient_accumulation_steps = _check_keras_only_arguments(
        loss_scale_factor, gradient_accumulation_steps
    )
    clipping = _gradient_clipping(clipnorm, clipvalue, global_clipnorm)

    rate = learning_rate
    if gradient_accumulation_steps and callable(learning_rate):
        every = gradient_accumulation_steps

        # Update number k happens on call k * every + every - 1, the count Keras passes on.
        def rate(count: Any) -> Any:
            return learning_rate(count * every + every - 1)

    step = optax.chain(
        clipping,
        rmsprop(
            rate,
            rho,
            epsilon,
            eps_in_sqrt=True,
            centered=centered,
            momentum=None if _validation.is_literal_zero(momentum) else momentum,
            weight_decay=0.0 if weight_decay is None else weight_decay,
            decoupled_weight_decay=True,
        ),
    )
    if gradient_accumulation_steps:
        step = optax.MultiSteps(step, every_k_schedule=gradient_accumulation_steps)
        step = step.gradient_transformation()
    if loss_scale_factor is not None:
        step = optax.chain(optax.stateless_with_tree_map(lambda g, _: g / loss_scale_factor), step)
    tx = _common.reject_complex(_placement.placed(_precision.with_compute_dtype(step)), "Keras")
    if use_ema:
        tx = _keras_ema.with_keras_ema(
            tx, ema_momentum, ema_overwrite_frequency, gradient_accumulation_steps
        )
    return _validation.scalar_hyperparameters(
        tx,
        learning_rate=learning_rate,
        rho=rho,
        momentum=momentum,
        epsilon=epsilon,
        weight_decay=weight_decay,
        loss_scale_factor=loss_scale_factor,
    )
