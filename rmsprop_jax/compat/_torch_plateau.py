r"""`torch.optim.lr_scheduler.ReduceLROnPlateau` as an optax transformation.

The rate depends on a metric, not on the step count, so it cannot be an optax schedule. The
transformation multiplies the updates by the current rate and keeps torch's bookkeeping in its
state; chain it after :func:`~rmsprop_jax.compat.torch_rmsprop` built with `lr=1.0`. PyTorch
multiplies its momentum buffer by the rate after the buffer, so scaling the preset's output
is the same update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _validation
from rmsprop_jax._numpy_rules import standard_numpy_rules
from rmsprop_jax.compat._torch_schedulers import _finite


class TorchPlateauState(NamedTuple):
    """The rate in use and `ReduceLROnPlateau`'s `best`, `num_bad_epochs`, `cooldown_counter`.

    Examples:
      >>> rj.compat.torch_reduce_lr_on_plateau(0.1).init(jnp.zeros(2))
      TorchPlateauState(lr=Array(0.1, dtype=float32), best=Array(inf, dtype=float32),
      num_bad_epochs=Array(0, dtype=int32), cooldown_counter=Array(0, dtype=int32))
    """

    lr: chex.Array
    best: chex.Array
    num_bad_epochs: chex.Array
    cooldown_counter: chex.Array


def _metric(value: Any) -> jax.Array:
    """The metric as a float32 scalar. Torch takes `float(metrics)`: one real number, which
    may be a one-element array; an array of several would make the rate an array."""
    try:
        metric = jnp.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"`value` must be a real number (the metric), got {value!r}.") from error
    if metric.size != 1 or jnp.issubdtype(metric.dtype, jnp.complexfloating):
        raise ValueError(
            "`value` must be one real number (the metric, e.g. the epoch's validation loss), "
            f"got an array of shape {metric.shape} and dtype {metric.dtype}."
        )
    return metric.reshape(()).astype(jnp.float32)


def torch_reduce_lr_on_plateau(
    lr: float,
    mode: str = "min",
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_lr: float = 0.0,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """Torch's `ReduceLROnPlateau`: multiply the updates by a rate cut when a metric stalls.

    `update(updates, state, params, value=metric)` scales `updates` by the current rate and
    then does what `scheduler.step(metric)` does: a metric better than the best so far (for
    `mode="min"` and `"rel"`, below `best * (1 - threshold)`; `"abs"`: below
    `best - threshold`; mirrored for `"max"`) resets the count of bad epochs; after more than
    `patience` bad epochs the rate becomes `max(lr * factor, min_lr)` (if it drops by more
    than `eps`) and `cooldown` epochs are ignored. Without `value` (or with
    `value=None`) only the scaling happens: pass the metric once per epoch, with the last
    update of the epoch, as torch calls `scheduler.step(val_loss)` after the epoch's last
    `optimizer.step()`.

    Args:
      lr: the initial rate (the torch group's `lr`).
      mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps: as in torch.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with :class:`TorchPlateauState`; read
      the current rate from `state.lr`.

    Raises:
      ValueError: on a `mode` or `threshold_mode` torch does not know, `factor` not in [0, 1),
        or a negative number; at `update`, on a `value` that is not one real number (torch's
        `float(metrics)`: a one-element array is read as its element).

    Examples:
      >>> tx = rj.compat.torch_reduce_lr_on_plateau(0.1, patience=1)
      >>> state, rates = tx.init(jnp.zeros(2)), []
      >>> for val_loss in [1.0, 0.5, 0.5, 0.5, 0.5]:  # one update per epoch, for brevity
      ...     updates, state = tx.update(jnp.ones(2), state, value=val_loss)
      ...     rates.append(round(float(state.lr), 4))
      >>> rates
      [0.1, 0.1, 0.1, 0.01, 0.01]

      Chained after :func:`torch_rmsprop` built with `lr=1.0`, it gives torch's RMSprop with
      the scheduler: `optax.chain(rj.compat.torch_rmsprop(lr=1.0), tx)`.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}.")
    if threshold_mode not in ("rel", "abs"):
        raise ValueError(f"`threshold_mode` must be 'rel' or 'abs', got {threshold_mode!r}.")
    for name, value in (("lr", lr), ("threshold", threshold), ("min_lr", min_lr), ("eps", eps)):
        _finite(name, value)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor < 1:
        raise ValueError(f"`factor` must be in [0, 1), got {factor!r}.")
    for name, value in (("patience", patience), ("cooldown", cooldown)):
        _validation.check_count(name, value, low=0, counted="counts of epochs")
    sign = 1.0 if mode == "min" else -1.0  # "max" is "min" of the negated metric

    def is_better(current, best):
        if threshold_mode == "rel":
            bar = best * (1.0 - sign * threshold)
        else:
            bar = best - sign * threshold
        return sign * current < sign * bar

    def init_fn(params):
        del params
        return TorchPlateauState(
            lr=jnp.asarray(lr, jnp.float32),
            best=jnp.asarray(sign * jnp.inf, jnp.float32),
            num_bad_epochs=jnp.zeros([], jnp.int32),
            cooldown_counter=jnp.zeros([], jnp.int32),
        )

    def scheduler_step(state, value):
        current = _metric(value)
        better = is_better(current, state.best)
        best = jnp.where(better, current, state.best)
        bad = jnp.where(better, 0, state.num_bad_epochs + 1)
        in_cooldown = state.cooldown_counter > 0
        cooldown_counter = jnp.where(in_cooldown, state.cooldown_counter - 1, 0)
        bad = jnp.where(in_cooldown, 0, bad)
        reduce = bad > patience
        cut = jnp.maximum(state.lr * factor, min_lr)
        new_lr = jnp.where(reduce & (state.lr - cut > eps), cut, state.lr)
        return TorchPlateauState(
            lr=new_lr,
            best=best,
            num_bad_epochs=jnp.where(reduce, 0, bad).astype(jnp.int32),
            cooldown_counter=jnp.where(reduce, cooldown, cooldown_counter).astype(jnp.int32),
        )

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del params, extra_args
        with standard_numpy_rules():  # a bfloat16 update meets the float32 rate
            updates = jax.tree.map(lambda u: (u * state.lr).astype(u.dtype), updates)
            if value is not None:
                state = scheduler_step(state, value)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
