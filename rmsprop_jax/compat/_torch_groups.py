"""`torch_rmsprop_groups`: a `torch.optim.RMSprop` with several parameter groups, in optax."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import chex
import jax
import optax

from rmsprop_jax.compat._torch import torch_rmsprop

# The per-group options of `torch.optim.RMSprop`, as `torch_rmsprop` names them.
OPTIONS = (
    "lr",
    "alpha",
    "eps",
    "weight_decay",
    "momentum",
    "centered",
    "capturable",
    "foreach",
    "maximize",
    "differentiable",
)
# Keys of a torch group that say which parameters it holds (the labels say that here), and
# the base rate a scheduler records (a schedule given as `lr` says that here).
MEMBERSHIP = ("params", "param_names", "initial_lr")


def _groups(param_groups: Any) -> tuple[list[Hashable], list[Mapping[str, Any]]]:
    if isinstance(param_groups, Mapping):
        return list(param_groups), list(param_groups.values())
    if isinstance(param_groups, Sequence) and not isinstance(param_groups, (str, bytes)):
        return list(range(len(param_groups))), list(param_groups)
    raise TypeError(
        "`param_groups` must be a list of option dicts (labels are their positions) or a dict "
        f"from label to option dict, got a {type(param_groups).__name__}."
    )


def torch_rmsprop_groups(
    param_groups: Sequence[Mapping[str, Any]] | Mapping[Hashable, Mapping[str, Any]],
    param_labels: Any | Callable[[Any], Any],
    *,
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
    """`torch.optim.RMSprop([{"params": ..., **options}, ...], **defaults)` as one transformation.

    Each group is a :func:`~rmsprop_jax.compat.torch_rmsprop` built from the keyword defaults
    overridden by the group's own options, as torch fills unset group options from the
    optimizer's defaults. The groups are combined with :func:`optax.partition`: a leaf labelled
    `k` is updated by group `k` only, with its own statistics, buffer, step count and schedule.

    Args:
      param_groups: the groups' options (any of `lr` (a number or an optax schedule),
        `alpha`, `eps`, `weight_decay`, `momentum`, `centered`, `maximize` and the accepted
        no-ops `capturable`, `foreach`, `differentiable`), as a list (labels are positions, the
        torch group order) or a dict from label to options (its order is the torch group
        order). `params`, `param_names` and `initial_lr` keys are ignored, so the
        `param_groups` of a torch `state_dict()` can be passed as they are.
      param_labels: a tree of labels with the structure of the parameters (or a prefix of
        it), or a function from the parameters to such a tree, as for :func:`optax.partition`.
      lr: the default of every group, as in `torch.optim.RMSprop`.
      alpha: the default of every group, as in `torch.optim.RMSprop`.
      eps: the default of every group, as in `torch.optim.RMSprop`.
      weight_decay: the default of every group, as in `torch.optim.RMSprop`.
      momentum: the default of every group, as in `torch.optim.RMSprop`.
      centered: the default of every group, as in `torch.optim.RMSprop`.
      capturable: the default of every group, as in `torch.optim.RMSprop`.
      foreach: the default of every group, as in `torch.optim.RMSprop`.
      maximize: the default of every group, as in `torch.optim.RMSprop`.
      differentiable: the default of every group, as in `torch.optim.RMSprop`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is an
      :class:`optax.PartitionState` holding one `torch_rmsprop` state per group (keyed by the
      group's position). :func:`rmsprop_jax.compat.state_from_torch` and
      :func:`~rmsprop_jax.compat.state_to_torch` convert it to and from a torch state_dict.

    Raises:
      ValueError: on an empty `param_groups`, an unknown option (naming the group), a value
        `torch_rmsprop` refuses (naming the group), or, at `init`, a label that names no group
        or labels whose tree is not a prefix of the parameters'.

    Examples:
      >>> params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
      >>> tx = rj.compat.torch_rmsprop_groups(
      ...     [{"weight_decay": 1e-2}, {"lr": 1e-3}], {"w": 0, "b": 1}, lr=1e-2, momentum=0.9
      ... )
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> updates["w"][0], updates["b"]  # each group at its own rate
      (Array([-0.09999999, -0.09999999], dtype=float32), Array([-0.01, -0.01], dtype=float32))
    """
    labels, groups = _groups(param_groups)
    if not groups:
        raise ValueError("`param_groups` is empty; pass at least one group.")
    defaults = dict(
        lr=lr,
        alpha=alpha,
        eps=eps,
        weight_decay=weight_decay,
        momentum=momentum,
        centered=centered,
        capturable=capturable,
        foreach=foreach,
        maximize=maximize,
        differentiable=differentiable,
    )
    transforms = {}
    for index, (label, group) in enumerate(zip(labels, groups, strict=True)):
        if not isinstance(group, Mapping):
            raise ValueError(f"param_groups[{label!r}] must be a dict of options, got {group!r}.")
        unknown = sorted(str(k) for k in group if k not in OPTIONS and k not in MEMBERSHIP)
        if unknown:
            raise ValueError(
                f"param_groups[{label!r}] has options {unknown} that torch.optim.RMSprop does "
                f"not have; its options are {list(OPTIONS)}."
            )
        options = defaults | {k: v for k, v in group.items() if k in OPTIONS}
        try:
            transforms[index] = torch_rmsprop(**options)
        except (TypeError, ValueError) as error:
            raise type(error)(f"param_groups[{label!r}]: {error}") from error

    position = {label: index for index, label in enumerate(labels)}

    def to_position(label: Any) -> int:
        if label not in position:
            raise ValueError(
                f"`param_labels` holds the label {label!r}, which names no group; the group "
                f"labels are {labels}."
            )
        return position[label]

    def positions(params: Any) -> Any:
        tree = param_labels(params) if callable(param_labels) else param_labels
        try:  # optax.partition reads the labels as a prefix of the parameters' tree.
            jax.tree.map(lambda label, _: label, tree, params)
        except ValueError as error:
            raise ValueError(
                "`param_labels` must have the structure of the parameters, or of a prefix of "
                f"it; got {jax.tree.structure(tree)} for parameters "
                f"{jax.tree.structure(params)}."
            ) from error
        return jax.tree.map(to_position, tree)

    # Positions as partition keys: the partition state then lists the groups in torch order.
    return optax.partition(transforms, positions)
