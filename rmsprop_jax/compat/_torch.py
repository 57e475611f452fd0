"""`torch_rmsprop`: the trajectory of `torch.optim.RMSprop` as an optax transformation."""

from __future__ import annotations

from typing import NamedTuple

import chex
import optax

from rmsprop_jax import _placement, _precision, _recomputed_steps, _validation
from rmsprop_jax.compat import _common
from rmsprop_jax.transform import preconditioner


class TorchLayoutState(NamedTuple):
    """Marks a `torch_rmsprop` chain: its statistics and buffer hold torch RMSprop's numbers.

    It has no leaves. `rj.rmsprop(lr, momentum=...)` keeps a buffer of rate-scaled increments,
    which torch's `momentum_buffer` is not; the checkpoint conversion looks for this marker so
    that it never copies a buffer into, or out of, a state where it means something else.

    Examples:
      >>> state = rj.compat.torch_rmsprop(lr=0.01).init(jnp.zeros(2))
      >>> state[-1], len(jax.tree.leaves(state[-1]))
      (TorchLayoutState(), 0)
    """


def torch_layout() -> optax.GradientTransformation:
    """The identity transformation whose state is a :class:`TorchLayoutState`."""
    return optax.GradientTransformation(
        lambda params: TorchLayoutState(), lambda updates, state, params=None: (updates, state)
    )


def torch_rmsprop(
    lr: optax.ScalarOrSchedule = 0.01,
    alpha: chex.Numeric = 0.99,
    eps: chex.Numeric = 1e-8,
    weight_decay: chex.Numeric = 0,
    momentum: chex.Numeric = 0,
    centered: bool = False,
    capturable: bool = False,
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""PyTorch's RMSprop: same arguments, defaults and parameter trajectory.

    For a gradient g, parameter p and step t (g is first negated with `maximize`, and gets
    λ·p added with `weight_decay`, the L2 penalty):

    .. math::

        v_t = \alpha v_{t-1} + (1 - \alpha) g_t^2

        s_t = g_t / (\sqrt{v_t} + \epsilon)

        b_t = \mu b_{t-1} + s_t

        p_t = p_{t-1} - \gamma_t b_t

    When `centered`, the mean gradient ḡ (averaged as v is) is kept too and v - ḡ² replaces v
    under the root; b = s when `momentum` is 0. PyTorch applies the learning rate γ *after* the
    momentum buffer, so with a schedule a change of rate acts on the whole buffer at once; this
    preset does the same (`rmsprop_jax.rmsprop` applies it before the buffer, as Keras and TF1
    do). A schedule passed as `lr` sees the number of updates applied so far, as
    `torch.optim.lr_scheduler.LambdaLR` does when stepped once per optimizer step. A complex
    parameter is updated as `torch.view_as_real` of it: its real and imaginary parts have
    separate accumulators.

    The centered variance is clamped at 0 before the square root (PyTorch would return NaN
    for the slightly negative values rounding can produce); otherwise the arithmetic is
    PyTorch's, carried out in float32 or wider.

    Args:
      lr: γ ≥ 0, a number or an optax schedule of the step count.
      alpha: smoothing constant α in [0, 1].
      eps: ε ≥ 0, added to the root (outside the square root).
      weight_decay: L2 penalty λ ≥ 0, added to the gradient.
      momentum: μ in [0, 1); with a literal 0 there is no buffer, as in PyTorch.
      centered: normalize by an estimate of the gradient's variance.
      capturable: accepted for compatibility; it only decides where PyTorch keeps its step
        counters for CUDA-graph capture. Every optax transformation can be captured by
        `jax.jit`.
      foreach: accepted for compatibility; it chooses between PyTorch's per-tensor and
        multi-tensor kernels, which compute the same thing. XLA fuses the whole update.
      maximize: ascend the objective instead of descending it.
      differentiable: accepted for compatibility; PyTorch needs it to let autograd through the
        step, while a JAX transformation is always differentiable.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`. Its state is the tuple of the chained
      states: the :class:`rmsprop_jax.ScaleByRmsState` (or centered) statistics, an
      :class:`optax.TraceState` holding the momentum buffer when `momentum` is not a literal
      0, when `lr` is a schedule, its step count, and last an empty
      :class:`TorchLayoutState` marking the chain as PyTorch's. To port a PyTorch checkpoint, see
      :func:`rmsprop_jax.compat.state_from_torch`.

    Examples:
      >>> import torch
      >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
      >>> opt = torch.optim.RMSprop([w], lr=0.01, momentum=0.9)
      >>> w.grad = torch.tensor([0.5, -0.5]); opt.step()
      >>> tx = rj.compat.torch_rmsprop(lr=0.01, momentum=0.9)
      >>> updates, state = tx.update(jnp.array([0.5, -0.5]), tx.init(jnp.zeros(2)))
      >>> w.detach().numpy().round(4), (jnp.array([1.0, -2.0]) + updates).round(4)
      (array([ 0.9, -1.9], dtype=float32), Array([ 0.9, -1.9], dtype=float32))

    References:
      PyTorch, torch.optim.RMSprop.
      https://pytorch.org/docs/stable/generated/torch.optim.RMSprop.html
      Tieleman and Hinton, Lecture 6.5 - RMSProp, 2012.
      https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf
      Graves, Generating Sequences With Recurrent Neural Networks, 2013.
      https://arxiv.org/abs/1308.0850
    """
    _validation.check_in_range("lr", lr, low=0.0, schedule=True)
    _validation.check_in_range("alpha", alpha, low=0.0, high=1.0)
    _validation.check_in_range("eps", eps, low=0.0)
    _validation.check_in_range("weight_decay", weight_decay, low=0.0)
    _validation.check_in_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    for name, flag in (
        ("centered", centered),
        ("capturable", capturable),
        ("maximize", maximize),
        ("differentiable", differentiable),
    ):
        _validation.check_flag(name, flag)
    if foreach is not None:
        _validation.check_flag("foreach", foreach)

    head = [
        optax.scale(-1.0) if maximize else optax.identity(),
        optax.identity()
        if _validation.is_literal_zero(weight_decay)
        else _validation.params_required(
            "weight_decay",
            "adds weight_decay * params to the gradient",
            optax.add_decayed_weights(_precision.as_hyperparameter(weight_decay)),
        ),
    ]
    scale_by_rms, steps_from_state = preconditioner(alpha, eps, centered=centered)
    buffer_decay = (
        None if _validation.is_literal_zero(momentum) else _precision.as_hyperparameter(momentum)
    )
    tail = [
        # After the buffer: PyTorch scales the buffer, not each increment, by the current rate.
        optax.scale_by_learning_rate(
            _precision.as_hyperparameter(_validation.scalar_schedule("lr", lr))
        ),
        # Last, so the tuple positions of the stages above are those of earlier releases.
        torch_layout(),
    ]
    if _validation.is_literal_zero(weight_decay) or steps_from_state is None:
        trace = optax.identity() if buffer_decay is None else optax.trace(decay=buffer_decay)
        chain = optax.chain(*head, scale_by_rms, trace, *tail)
    else:
        # The decayed gradient g + λp is read by the new average and by the step: computed
        # again in each, it is not written whole (4 bytes per parameter).
        chain = _recomputed_steps.chain(
            head, scale_by_rms, steps_from_state, momentum=buffer_decay, tail=tail
        )
    return _validation.scalar_hyperparameters(
        _common.as_real_pairs(
            _placement.placed(
                _precision.with_compute_dtype(
                    # The head's stages, the preconditioner, the buffer and the tail's.
                    _validation.stage_states_checked(
                        "torch_rmsprop", chain, stages=len(head) + 2 + len(tail)
                    )
                )
            )
        ),
        lr=lr,
        alpha=alpha,
        eps=eps,
        weight_decay=weight_decay,
        momentum=momentum,
    )
