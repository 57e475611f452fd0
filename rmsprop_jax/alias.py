"""`rmsprop`: the full optimizer, a chain of small transformations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _placement, _precision, _recomputed_steps, _validation, storage
from rmsprop_jax.transform import StepsFromState, preconditioner
from rmsprop_jax.weight_decay import add_decoupled_weight_decay

WeightDecayMask = Any | Callable[[optax.Params], Any] | None
_L2_DECAYS = "(coupled, L2) adds weight_decay * params to the gradient"
_DECOUPLED_DECAYS = "(decoupled) subtracts learning_rate * weight_decay * params"


def rmsprop(
    learning_rate: optax.ScalarOrSchedule,
    decay: chex.Numeric = 0.9,
    eps: chex.Numeric = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: chex.Numeric = 0.0,
    centered: bool = False,
    momentum: chex.Numeric | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    weight_decay: chex.Numeric = 0.0,
    decoupled_weight_decay: bool = False,
    weight_decay_mask: WeightDecayMask = None,
    maximize: bool = False,
    moment_storage: str = "float32",
    first_moment_storage: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""RMSprop with every variant the major frameworks implement.

    For a gradient g, parameter p and step t (g is first negated with `maximize`, and gets
    λ·p added with coupled weight decay):

    .. math::

        \nu_t = \beta \nu_{t-1} + (1 - \beta) g_t^2

        s_t = \eta_t g_t / (\sqrt{\nu_t} + \epsilon)

        b_t = m b_{t-1} + s_t

        p_t = p_{t-1} - b_t - \eta_t \lambda p_{t-1}

    Without `momentum`, b = s; with `nesterov`, the step is m·b + s; the last term is there only
    with decoupled weight decay. The preconditioner (ν, centering, bias correction, `eps`
    placement) is :func:`rmsprop_jax.scale_by_rms`. The learning rate is applied before the
    momentum buffer, as in optax, Keras and TF1; with a schedule, PyTorch's order (rate after
    the buffer) is in :func:`rmsprop_jax.compat.torch_rmsprop`. Arithmetic runs in float32 or
    wider whatever the parameter dtype, and the update has the gradient's dtype.

    The numeric hyperparameters are scalars: concrete, or traced (to sweep them, build the
    optimizer inside a function mapped by `jax.vmap`, see :mod:`rmsprop_jax.sweep`). Built with
    an array that has axes (a sweep grid, to range-check it), the optimizer refuses to run.

    Args:
      learning_rate: the step size η ≥ 0, a number or an optax schedule of the step count.
      decay: β in [0, 1], the decay of the moving average of squared gradients.
      eps: ε ≥ 0, added to the denominator for numerical stability.
      eps_in_sqrt: divide by √(ν + ε) instead of √ν + ε.
      initial_scale: starting value of ν (≥ 0).
      centered: normalize by the variance of the gradient instead of its second moment.
      momentum: m in [0, 1) for a heavy-ball buffer, or None for none.
      nesterov: use Nesterov momentum (needs `momentum`).
      bias_correction: debias the moving averages by dividing them by 1 - βᵗ.
      weight_decay: λ ≥ 0.
      decoupled_weight_decay: apply the decay to the parameter directly (AdamW, Keras 3)
        instead of adding λ·p to the gradient (L2, PyTorch).
      weight_decay_mask: a tree of booleans with the structure of the parameters (or a function
        of the parameters returning one) selecting the leaves that are decayed.
      maximize: ascend the objective instead of descending it.
      moment_storage: how ν (and μ, the mean gradient, when centered) are stored between
        steps: `"float32"`, `"bfloat16"`, `"int8"` or `"factored"` (see
        :func:`rmsprop_jax.scale_by_rms`).
      first_moment_storage: how μ is stored when centered; None: as `moment_storage` picks
        (see :func:`rmsprop_jax.scale_by_rms`).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; its state is the tuple of the states
      of the chained transformations.

    Examples:
      >>> params = {"w": jnp.array([1.0, -2.0, 3.0])}
      >>> tx = rj.rmsprop(learning_rate=0.1, momentum=0.9)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -0.5, 0.0])}, state, params)
      >>> optax.apply_updates(params, updates)["w"]
      Array([ 0.6837722, -1.6837722,  3.       ], dtype=float32)

    References:
      Tieleman and Hinton, Lecture 6.5 - RMSProp, 2012.
      https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf
    """
    for name, flag in (
        ("nesterov", nesterov),
        ("decoupled_weight_decay", decoupled_weight_decay),
        ("maximize", maximize),
    ):
        _validation.check_flag(name, flag)
    _validation.check_in_range("learning_rate", learning_rate, low=0.0, schedule=True)
    _validation.check_in_range("weight_decay", weight_decay, low=0.0)
    if momentum is not None:
        _validation.check_in_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    elif nesterov:
        raise ValueError(
            "`nesterov=True` needs a momentum buffer, but `momentum` is None. "
            "Pass `momentum=0.9` (for example) or `nesterov=False`."
        )
    learning_rate = _precision.as_hyperparameter(
        _validation.scalar_schedule("learning_rate", learning_rate)
    )

    def masked(transform: optax.GradientTransformation) -> optax.GradientTransformation:
        return (
            transform
            if weight_decay_mask is None
            else optax.masked(
                transform, _validation.checked_mask("weight_decay_mask", weight_decay_mask)
            )
        )

    decays_weights = not _validation.is_literal_zero(weight_decay)
    couples_weight_decay = decays_weights and not decoupled_weight_decay
    # The step is odd in g wherever the state holds no sign of it (ν and the factored
    # statistics hold g², and -(g/d) == (-g)/d exactly): there the learning-rate stage takes
    # `maximize`'s sign, giving the same updates and state, and the preconditioner reads the
    # gradient itself (a negated copy read by the factored format's two statistics would be
    # written whole, 4 bytes per parameter). Centered μ and L2 decay (-g + λp) need -g.
    negates_gradient = maximize and (centered or couples_weight_decay)
    ascends_by_rate = maximize and not negates_gradient
    head = [
        optax.scale(-1.0) if negates_gradient else optax.identity(),
        _validation.params_required(
            "weight_decay",
            _L2_DECAYS,
            masked(optax.add_decayed_weights(_precision.as_hyperparameter(weight_decay))),
        )
        if couples_weight_decay
        else optax.identity(),
    ]
    head, scale_by_rms, steps_from_state = _preconditioner_after(
        head,
        negates_gradient=negates_gradient,
        l2_decay=weight_decay if couples_weight_decay else None,
        weight_decay_mask=weight_decay_mask,
        decay=decay,
        eps=eps,
        eps_in_sqrt=eps_in_sqrt,
        initial_scale=initial_scale,
        centered=centered,
        bias_correction=bias_correction,
        moment_storage=moment_storage,
        first_moment_storage=first_moment_storage,
    )
    scale_by_rate = optax.scale_by_learning_rate(learning_rate, flip_sign=not ascends_by_rate)
    buffer_decay = None if momentum is None else _precision.as_hyperparameter(momentum)
    tail = (
        _validation.params_required(
            "weight_decay",
            _DECOUPLED_DECAYS,
            masked(add_decoupled_weight_decay(learning_rate, weight_decay)),
        )
        if decays_weights and decoupled_weight_decay
        else optax.identity()
    )
    if (nesterov or couples_weight_decay) and steps_from_state is not None:
        # The step is read by two kernels there: computed again in each, it is not kept.
        chain = _recomputed_steps.chain(
            head,
            scale_by_rms,
            steps_from_state,
            scale=[scale_by_rate],
            momentum=buffer_decay,
            nesterov=nesterov,
            tail=[tail],
        )
    else:
        trace = (
            optax.identity()
            if buffer_decay is None
            else optax.trace(decay=buffer_decay, nesterov=nesterov)
        )
        chain = optax.chain(*head, scale_by_rms, scale_by_rate, trace, tail)
    # The head's stages, the preconditioner, the learning rate, the buffer and the tail.
    stages = len(head) + 4
    return _validation.scalar_hyperparameters(
        _placement.placed(
            _precision.with_compute_dtype(
                _validation.stage_states_checked("rmsprop", chain, stages=stages)
            )
        ),
        # decay, eps and initial_scale: scale_by_rms checks them, under the same names.
        learning_rate=learning_rate,
        momentum=momentum,
        weight_decay=weight_decay,
    )


def _preconditioner_after(
    head: list[optax.GradientTransformation],
    *,
    negates_gradient: bool,
    l2_decay: Any,
    weight_decay_mask: WeightDecayMask,
    centered: bool,
    moment_storage: str,
    **options: Any,
) -> tuple[list[optax.GradientTransformation], Any, StepsFromState | None]:
    """The stages before the preconditioner, the preconditioner (`scale_by_rms` of `centered`,
    `moment_storage` and `options`) and its step from its new state (see
    :func:`rmsprop_jax.transform.preconditioner`).

    `head` negates the gradient (`negates_gradient`), then adds `l2_decay` * p to it (on the
    leaves `weight_decay_mask` selects; None: no L2 decay). The factored statistics read their
    inputs through optimization barriers, and a compressed centered state updates μ after
    the variance, behind one: such a gradient, computed before them, would be written whole
    (4 bytes per parameter). There the preconditioner computes it, leaf by leaf, in each
    reader, as `head` would (`optax.scale(-1.0)`, then `optax.add_decayed_weights`, p = None
    on the leaves not decayed), and the head keeps only its stages' states.
    """
    fmt = storage.get(moment_storage)
    folds = (negates_gradient or l2_decay is not None) and (
        fmt.updates_from_sums or (centered and fmt.stores_centered_variance)
    )
    if not folds:
        tx, steps = preconditioner(centered=centered, moment_storage=moment_storage, **options)
        return head, tx, steps
    factors = (-1.0,) * negates_gradient + (
        () if l2_decay is None else (_precision.as_hyperparameter(l2_decay),)
    )

    def before_preconditioner(g, p, *factors):
        if negates_gradient:
            g = factors[0] * g
        if l2_decay is None or p is None:  # p is None where the mask leaves a leaf out.
            return g
        return g + factors[-1] * p

    tx, steps = preconditioner(
        centered=centered,
        moment_storage=moment_storage,
        gradient_of=(before_preconditioner, tuple(map(jnp.asarray, factors))),
        **options,
    )
    head = [_state_only(stage) for stage in head]
    if l2_decay is None:
        return head, tx, steps
    decayed = _decayed_parameters(weight_decay_mask)
    tx = _with_parameters(tx, decayed)
    if steps is None:
        return head, tx, None

    def steps_given_decayed(updates: Any, state: Any, params: Any) -> Any:
        return steps(updates, state, decayed(updates, params))

    return head, tx, steps_given_decayed


def _state_only(stage: optax.GradientTransformation) -> optax.GradientTransformation:
    """`stage`'s state, its updates unchanged: a stage whose work another one does."""
    return optax.GradientTransformation(stage.init, optax.identity().update)


def _decayed_parameters(mask: WeightDecayMask) -> Callable[[Any, Any], Any]:
    """(gradients, params) -> the parameters of the leaves that L2 weight decay decays
    (`mask` selects them, of the gradients as `optax.masked` resolves it), None elsewhere;
    `ValueError` where params are None."""
    resolved = None if mask is None else _validation.checked_mask("weight_decay_mask", mask)

    def decayed(updates: Any, params: Any) -> Any:
        if params is None:  # As the head's stage would.
            raise ValueError(_validation.params_required_message("weight_decay", _L2_DECAYS))
        if resolved is None:
            return params
        return jax.tree.map(
            lambda selected, subtree: (
                subtree if selected else jax.tree.map(lambda _: None, subtree)
            ),
            resolved(updates),
            params,
        )

    return decayed


def _with_parameters(
    transformation: optax.GradientTransformation,
    parameters_of: Callable[[Any, Any], Any],
) -> optax.GradientTransformationExtraArgs:
    """`transformation`, given `parameters_of(updates, params)` as its params."""
    transformation = optax.with_extra_args_support(transformation)

    def update_fn(updates, state, params=None, **extra_args):
        return transformation.update(updates, state, parameters_of(updates, params), **extra_args)

    return optax.GradientTransformationExtraArgs(transformation.init, update_fn)
