"""`tf1_rmsprop`: the trajectory of TF1's `tf.compat.v1.train.RMSPropOptimizer` in optax."""

from __future__ import annotations

import chex
import optax

from rmsprop_jax import _validation
from rmsprop_jax.alias import rmsprop
from rmsprop_jax.compat import _common


def tf1_rmsprop(
    learning_rate: optax.ScalarOrSchedule,
    decay: chex.Numeric = 0.9,
    momentum: chex.Numeric = 0.0,
    epsilon: chex.Numeric = 1e-10,
    use_locking: bool = False,
    centered: bool = False,
    name: str = "RMSProp",
) -> optax.GradientTransformationExtraArgs:
    r"""TF1's RMSPropOptimizer: same arguments, defaults and parameter trajectory.

    The `ApplyRMSProp` and `ApplyCenteredRMSProp` kernels compute

    .. math::

        ms_t = \rho \, ms_{t-1} + (1 - \rho) g_t^2

        mg_t = \rho \, mg_{t-1} + (1 - \rho) g_t

        mom_t = \mu \, mom_{t-1} + \eta_t g_t / \sqrt{ms_t - mg_t^2 + \epsilon}

        p_t = p_{t-1} - mom_t

    with ms₀ = 1, and mg = 0 unless `centered`. Three things set TF1 apart: the mean square
    starts at 1, not 0 (so the first steps are about η·g rather than η·sign(g)); `epsilon` sits
    inside the square root; and the learning rate multiplies each increment before it enters the
    momentum buffer. There is no weight decay. A schedule passed as `learning_rate` is an optax
    schedule of the number of updates applied so far (TF1's `global_step` when it is incremented
    once per update).

    Args:
      learning_rate: η ≥ 0, a number or an optax schedule of the step count.
      decay: ρ in [0, 1], the decay of the moving averages.
      momentum: μ in [0, 1).
      epsilon: ε ≥ 0, added inside the square root.
      use_locking: accepted for compatibility; it guards concurrent variable updates in TF1
        and does not change the arithmetic.
      centered: normalize by an estimate of the gradient's variance.
      name: accepted for compatibility; TF1 uses it to name slot variables.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`. Complex parameters raise
      `TypeError` at `init`.

    Examples:
      >>> tx = rj.compat.tf1_rmsprop(learning_rate=0.01)
      >>> state = tx.init(jnp.zeros(2))
      >>> state[2].nu  # the mean square starts at 1
      Array([1., 1.], dtype=float32)
      >>> tx.update(jnp.array([0.5, -0.5]), state)[0]
      Array([-0.00519875,  0.00519875], dtype=float32)

    References:
      TensorFlow, tf.compat.v1.train.RMSPropOptimizer.
      https://www.tensorflow.org/api_docs/python/tf/compat/v1/train/RMSPropOptimizer
      Tieleman and Hinton, Lecture 6.5 - RMSProp, 2012.
      https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf
      Graves, Generating Sequences With Recurrent Neural Networks, 2013.
      https://arxiv.org/abs/1308.0850
    """
    del name  # A label for TF1's slot variables.
    _validation.check_in_range("learning_rate", learning_rate, low=0.0, schedule=True)
    _validation.check_in_range("decay", decay, low=0.0, high=1.0)
    _validation.check_in_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    _validation.check_in_range("epsilon", epsilon, low=0.0)
    _validation.check_flag("use_locking", use_locking)
    _validation.check_flag("centered", centered)
    step = rmsprop(
        learning_rate,
        decay,
        epsilon,
        eps_in_sqrt=True,
        initial_scale=1.0,
        centered=centered,
        # TF1 always keeps a buffer; with momentum 0 it holds the last increment, a no-op.
        momentum=None if _validation.is_literal_zero(momentum) else momentum,
    )
    return _validation.scalar_hyperparameters(
        _common.reject_complex(step, "TF1"),
        learning_rate=learning_rate,
        decay=decay,
        momentum=momentum,
        epsilon=epsilon,
    )
