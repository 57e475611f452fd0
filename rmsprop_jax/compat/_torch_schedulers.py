"""PyTorch's learning-rate schedulers as optax schedules of the update count.

Each function takes the scheduler's arguments (without the optimizer), the base rate `lr`
(the group's `lr` when the scheduler was built) and `steps_per_epoch`, and returns an optax
schedule of the number t of updates applied so far, the count that
:func:`~rmsprop_jax.compat.torch_rmsprop` passes to a schedule given as `lr`.

Stepping convention. A torch scheduler changes the rate when `scheduler.step()` is called, after
`optimizer.step()`. Stepped once per optimizer step (per batch), the rate of update t is the
scheduler's value at epoch e = t: keep `steps_per_epoch=1` and count arguments such as
`step_size` or `T_max` in updates. Stepped once per epoch of n batches, update t uses epoch
e = t // n: pass `steps_per_epoch=n` and keep the arguments in epochs. `OneCycleLR` is stepped per
batch, as torch requires. `CosineAnnealingWarmRestarts` stepped per batch with fractional epochs
(`scheduler.step(epoch + i / n)`) is `T_0 * n` with `steps_per_epoch=1`.

Every schedule is the closed form of torch's (chainable, recursive) update, evaluated in
float32; powers are taken as `exp(e log gamma)` so that thousands of steps do not multiply a
rounded `gamma` thousands of times.

References:
  PyTorch, torch.optim.lr_scheduler.
  https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _validation

_INT32_MAX = _validation.INT32_MAX  # Counts of updates and epochs are int32 in the schedules.


def _positive_int(name: str, value: int) -> int:
    return _validation.check_count(name, value, low=1)


def _sequence(name: str, values: Any, what: str) -> list[Any]:
    """`values` as a list, or a TypeError naming `name` when it is not a sequence of `what`."""
    if (
        isinstance(values, str | bytes | Mapping)
        or not isinstance(values, Iterable)
        or getattr(values, "ndim", None) == 0  # A 0-d array is iterable by type only.
    ):
        raise TypeError(f"`{name}` must be a sequence of {what}, got {values!r}.")
    return list(values)


def _epochs(name: str, values: Any) -> list[int]:
    return [_positive_int(name, m) for m in _sequence(name, values, "epochs (positive integers)")]


def _finite(name: str, value: float, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    message = f"`{name}` must be a finite number >= {low}, got {value!r}."
    try:
        number = float(value)
    except OverflowError:  # A Python integer past float64's range (10**400).
        number = math.inf if value > 0 else -math.inf
    else:
        if not math.isfinite(number):
            raise ValueError(message)
    if number < low:
        raise ValueError(message)
    _validation.check_fits_float32(name, value, np.float64(number))
    return number


def _epoch(count: jax.Array, steps_per_epoch: int) -> jax.Array:
    return jnp.asarray(count, jnp.int32) // steps_per_epoch


def _power(gamma: float, exponent: jax.Array) -> jax.Array:
    """gamma ** exponent as exp(exponent * log(gamma)), log taken in float64."""
    if gamma == 0.0:
        return jnp.where(exponent == 0, 1.0, 0.0).astype(jnp.float32)
    return jnp.exp(exponent.astype(jnp.float32) * np.float32(math.log(gamma)))


def torch_step_lr(
    lr: float, step_size: int, gamma: float = 0.1, *, steps_per_epoch: int = 1
) -> optax.Schedule:
    """`StepLR`: `lr * gamma ** (e // step_size)` at epoch e.

    Examples:
      >>> schedule = rj.compat.torch_step_lr(0.1, step_size=2, gamma=0.5)
      >>> [round(float(schedule(t)), 4) for t in range(5)]
      [0.1, 0.1, 0.05, 0.05, 0.025]
      >>> schedule = rj.compat.torch_step_lr(0.1, step_size=2, gamma=0.5, steps_per_epoch=3)
      >>> [round(float(schedule(t)), 4) for t in range(7)]
      [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05]
    """
    lr, gamma = _finite("lr", lr), _finite("gamma", gamma)
    step_size = _positive_int("step_size", step_size)
    spe = _positive_int("steps_per_epoch", steps_per_epoch)
    return lambda count: lr * _power(gamma, _epoch(count, spe) // step_size)


def torch_multi_step_lr(
    lr: float, milestones: Sequence[int], gamma: float = 0.1, *, steps_per_epoch: int = 1
) -> optax.Schedule:
    """`MultiStepLR`: `lr * gamma ** k` at epoch e, k the number of milestones ≤ e.

    A milestone listed twice counts twice, as in torch.

    Examples:
      >>> schedule = rj.compat.torch_multi_step_lr(0.1, milestones=[1, 3], gamma=0.5)
      >>> [round(float(schedule(t)), 4) for t in range(5)]
      [0.1, 0.05, 0.05, 0.025, 0.025]
    """
    lr, gamma = _finite("lr", lr), _finite("gamma", gamma)
    spe = _positive_int("steps_per_epoch", steps_per_epoch)
    marks = np.sort(np.asarray(_epochs("milestones", milestones), np.int32))

    def schedule(count):
        passed = jnp.sum(_epoch(count, spe)[..., None] >= marks, axis=-1)
        return lr * _power(gamma, passed)

    return schedule


def torch_exponential_lr(lr: float, gamma: float, *, steps_per_epoch: int = 1) -> optax.Schedule:
    """`ExponentialLR`: `lr * gamma ** e` at epoch e.

    Examples:
      >>> schedule = rj.compat.torch_exponential_lr(0.1, gamma=0.5)
      >>> [round(float(schedule(t)), 4) for t in range(4)]
      [0.1, 0.05, 0.025, 0.0125]
    """
    lr, gamma = _finite("lr", lr), _finite("gamma", gamma)
    spe = _positive_int("steps_per_epoch", steps_per_epoch)
    return lambda count: lr * _power(gamma, _epoch(count, spe))


def torch_linear_lr(
    lr: float,
    start_factor: float = 1.0 / 3,
    end_factor: float = 1.0,
    total_iters: int = 5,
    *,
    steps_per_epoch: int = 1,
) -> optax.Schedule:
    """`LinearLR`: the factor goes linearly from `start_factor` to `end_factor` in `total_iters`
    epochs, then stays: `lr * (s + (f - s) * min(e, T) / T)` at epoch e, with s, f and T the
    start factor, end factor and `total_iters`.

    Examples:
      >>> schedule = rj.compat.torch_linear_lr(0.1, start_factor=0.5, total_iters=4)
      >>> [round(float(schedule(t)), 4) for t in range(6)]
      [0.05, 0.0625, 0.075, 0.0875, 0.1, 0.1]
    """
    lr = _finite("lr", lr)
    start, end = _finite("start_factor", start_factor), _finite("end_factor", end_factor)
    if not 0 < start <= 1 or not 0 <= end <= 1:
        raise ValueError(
            f"`start_factor` must be in (0, 1] and `end_factor` in [0, 1], got {start_factor!r} "
            f"and {end_factor!r}."
        )
    total = _positive_int("total_iters", total_iters)
    spe = _positive_int("steps_per_epoch", steps_per_epoch)

    def schedule(count):
        done = jnp.minimum(_epoch(count, spe), total).astype(jnp.float32)
        return lr * (start + (end - start) * done / total)

    return schedule


def torch_constant_lr(
    lr: float, factor: float = 1.0 / 3, total_iters: int = 5, *, steps_per_epoch: int = 1
) -> optax.Schedule:
    """`ConstantLR`: `lr * factor` for the first `total_iters` epochs, then `lr`.

    Examples:
      >>> schedule = rj.compat.torch_constant_lr(0.1, factor=0.5, total_iters=2)
      >>> [round(float(schedule(t)), 4) for t in range(4)]
      [0.05, 0.05, 0.1, 0.1]
    """
    lr, factor = _finite("lr", lr), _finite("factor", factor)
    if not 0 <= factor <= 1:
        raise ValueError(f"`factor` must be in [0, 1], got {factor!r}.")
    total = _positive_int("total_iters", total_iters)
    spe = _positive_int("steps_per_epoch", steps_per_epoch)
    return lambda count: jnp.where(_epoch(count, spe) < total, lr * factor, lr).astype(jnp.float32)


def _half_cosine(fraction: jax.Array) -> jax.Array:
    """(1 + cos(pi x)) / 2 as cos(pi x / 2)**2: no cancellation near x = 1 in float32."""
    return jnp.cos(jnp.pi / 2 * fraction) ** 2


def _cosine(lr: float, eta_min: float, fraction: jax.Array) -> jax.Array:
    return eta_min + (lr - eta_min) * _half_cosine(fraction)


def torch_cosine_annealing_lr(
    lr: float, T_max: int, eta_min: float = 0.0, *, steps_per_epoch: int = 1
) -> optax.Schedule:
    """`CosineAnnealingLR`: `eta_min + (lr - eta_min) * (1 + cos(π e / T_max)) / 2` at epoch e.

    Past `T_max` the rate rises again, with period `2 T_max`, as torch's does (unlike
    `optax.cosine_decay_schedule`, which stays at its floor).

    Examples:
      >>> schedule = rj.compat.torch_cosine_annealing_lr(0.1, T_max=4)
      >>> [round(float(schedule(t)), 4) for t in range(9)]
      [0.1, 0.0854, 0.05, 0.0146, 0.0, 0.0146, 0.05, 0.0854, 0.1]
    """
    lr, eta_min = _finite("lr", lr), _finite("eta_min", eta_min)
    t_max = _positive_int("T_max", T_max)
    spe = _positive_int("steps_per_epoch", steps_per_epoch)
    # The phase modulo one period keeps the cosine's argument small and exact in float32.
    return lambda count: _cosine(
        lr, eta_min, (_epoch(count, spe) % (2 * t_max)).astype(jnp.float32) / t_max
    )


def torch_cosine_annealing_warm_restarts(
    lr: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0, *, steps_per_epoch: int = 1
) -> optax.Schedule:
    """`CosineAnnealingWarmRestarts`: cosine from `lr` to `eta_min` over `T_i` epochs, then a
    restart, with `T_i` = `T_0` for the first cycle and `T_mult * T_i` for the next.

    Examples:
      >>> schedule = rj.compat.torch_cosine_annealing_warm_restarts(0.1, T_0=2, T_mult=2)
      >>> [round(float(schedule(t)), 4) for t in range(7)]
      [0.1, 0.05, 0.1, 0.0854, 0.05, 0.0146, 0.1]
    """
    lr, eta_min = _finite("lr", lr), _finite("eta_min", eta_min)
    t_0, t_mult = _positive_int("T_0", T_0), _positive_int("T_mult", T_mult)
    spe = _positive_int("steps_per_epoch", steps_per_epoch)
    # Restart epochs below 2**31, as integers: a float32 logarithm misplaces some.
    starts, length = [0], t_0
    while t_mult > 1 and starts[-1] + length < 2**31:
        starts.append(starts[-1] + length)
        length *= t_mult
    starts_array = jnp.asarray(np.asarray(starts, np.int64).astype(np.int32))
    lengths = np.asarray([t_0 * t_mult**i for i in range(len(starts))], np.float64)
    lengths_array = jnp.asarray(lengths.clip(max=2.0**31).astype(np.float32))

    def schedule(count):
        epoch = _epoch(count, spe)
        if t_mult == 1:
            return _cosine(lr, eta_min, (epoch % t_0).astype(jnp.float32) / t_0)
        cycle = jnp.sum(epoch[..., None] >= starts_array, axis=-1) - 1
        t_cur = (epoch - starts_array[cycle]).astype(jnp.float32)
        return _cosine(lr, eta_min, t_cur / lengths_array[cycle])

    return schedule


def torch_polynomial_lr(
    lr: float, total_iters: int = 5, power: float = 1.0, *, steps_per_epoch: int = 1
) -> optax.Schedule:
    """`PolynomialLR`: `lr * (1 - min(e, T) / T) ** power` at epoch e, with T the `total_iters`.

    Examples:
      >>> schedule = rj.compat.torch_polynomial_lr(0.1, total_iters=4, power=2.0)
      >>> [round(float(schedule(t)), 4) for t in range(6)]
      [0.1, 0.0563, 0.025, 0.0063, 0.0, 0.0]
    """
    lr, power = _finite("lr", lr), _finite("power", power)
    total = _positive_int("total_iters", total_iters)
    spe = _positive_int("steps_per_epoch", steps_per_epoch)

    def schedule(count):
        done = jnp.minimum(_epoch(count, spe), total).astype(jnp.float32)
        return lr * (1.0 - done / total) ** power

    return schedule


def torch_lambda_lr(
    lr: float, lr_lambda: Callable[[jax.Array], jax.Array], *, steps_per_epoch: int = 1
) -> optax.Schedule:
    """`LambdaLR`: `lr * lr_lambda(e)` at epoch e.

    `lr_lambda` must accept a traced integer epoch (use `jnp.minimum`, `jnp.where`, ... instead
    of Python's `min` and `if`).

    Examples:
      >>> schedule = rj.compat.torch_lambda_lr(0.1, lambda epoch: 1.0 / (1 + epoch))
      >>> [round(float(schedule(t)), 4) for t in range(4)]
      [0.1, 0.05, 0.0333, 0.025]
    """
    lr = _finite("lr", lr)
    if not callable(lr_lambda):
        raise TypeError(f"`lr_lambda` must be a function of the epoch, got {lr_lambda!r}.")
    spe = _positive_int("steps_per_epoch", steps_per_epoch)

    def schedule(count: jax.Array) -> jax.Array:
        return lr * _lambda_factor(lr_lambda(_epoch(count, spe)))

    return schedule


def _lambda_factor(factor: Any) -> jax.Array:
    """`factor` (what `lr_lambda` returned) as float32, or a `TypeError` naming `lr_lambda`."""
    if factor is not None:  # JAX 0.5 converts None to NaN without a word
        try:
            return jnp.asarray(factor, jnp.float32)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"`lr_lambda` must return a number for the epoch, got {factor!r}.")


def torch_sequential_lr(
    schedules: Sequence[optax.Schedule], milestones: Sequence[int], *, steps_per_epoch: int = 1
) -> optax.Schedule:
    """`SequentialLR`: schedule `i` from epoch `milestones[i - 1]` on, restarted at its count 0.

    At a milestone torch resets the next scheduler to its epoch 0 from the group's initial
    rate, so each schedule is built with the base `lr` and the same `steps_per_epoch`.

    Examples:
      >>> warmup = rj.compat.torch_constant_lr(0.1, factor=0.1, total_iters=2)
      >>> decay = rj.compat.torch_exponential_lr(0.1, gamma=0.5)
      >>> schedule = rj.compat.torch_sequential_lr([warmup, decay], milestones=[2])
      >>> [round(float(schedule(t)), 4) for t in range(6)]
      [0.01, 0.01, 0.1, 0.05, 0.025, 0.0125]
    """
    spe = _positive_int("steps_per_epoch", steps_per_epoch)
    schedules = _sequence("schedules", schedules, "schedules")
    if not schedules:
        raise ValueError("`schedules` must hold at least one schedule, got none.")
    for i, schedule in enumerate(schedules):
        if not callable(schedule):
            raise TypeError(
                f"`schedules[{i}]` must be a schedule (a function of the update count), got "
                f"{schedule!r}."
            )
    marks = _epochs("milestones", milestones)
    if len(marks) != len(schedules) - 1 or marks != sorted(marks):
        raise ValueError(
            f"`milestones` must be {len(schedules) - 1} increasing epochs (one fewer than the "
            f"schedules), got {list(milestones)!r}."
        )
    return optax.join_schedules(schedules, [m * spe for m in marks])
