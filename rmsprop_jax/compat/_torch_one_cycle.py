"""PyTorch's `OneCycleLR` (and its momentum cycle) as optax schedules of the update count.

See :mod:`rmsprop_jax.compat._torch_schedulers` for the stepping convention (`OneCycleLR` is
stepped once per batch).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from rmsprop_jax import _validation
from rmsprop_jax.compat._torch_schedulers import (
    _INT32_MAX,
    _finite,
    _half_cosine,
    _positive_int,
)


def torch_one_cycle_lr(
    max_lr: float,
    total_steps: int | None = None,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> optax.Schedule:
    """`OneCycleLR` (stepped per batch): the rate of its 1cycle policy.

    With torch's default `cycle_momentum=True` torch also cycles the optimizer's `momentum`;
    reproduce that with :func:`torch_one_cycle_momentum` and `optax.inject_hyperparams`.

    The rate of updates 0 to `total_steps - 1` is torch's. Past them torch extrapolates the
    last phase for one more update (a rate rising again, or below 0 with
    `anneal_strategy="linear"`) and then raises; a schedule cannot raise inside `jax.jit`, so
    it holds its final rate from there on instead.

    Examples:
      >>> schedule = rj.compat.torch_one_cycle_lr(0.1, total_steps=6)
      >>> [round(float(schedule(t)), 4) for t in range(8)]
      [0.004, 0.0994, 0.0812, 0.0463, 0.0133, 0.0, 0.0, 0.0]
    """
    total = _one_cycle_total(total_steps, epochs, steps_per_epoch)
    initial = _finite("max_lr", max_lr) / _divisor("div_factor", div_factor)
    values = (initial, float(max_lr), initial / _divisor("final_div_factor", final_div_factor))
    return _one_cycle(total, pct_start, anneal_strategy, three_phase, values)


def torch_one_cycle_momentum(
    total_steps: int | None = None,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    three_phase: bool = False,
) -> optax.Schedule:
    """The `momentum` that `OneCycleLR(..., cycle_momentum=True)` sets, per update.

    It falls from `max_momentum` to `base_momentum` while the rate of
    :func:`torch_one_cycle_lr` rises, and rises back while the rate anneals; from update
    `total_steps - 1` on it holds its final value (see :func:`torch_one_cycle_lr`).

    Examples:
      >>> schedule = rj.compat.torch_one_cycle_momentum(total_steps=6)
      >>> [round(float(schedule(t)), 4) for t in range(6)]
      [0.95, 0.8506, 0.8688, 0.9037, 0.9367, 0.95]
    """
    total = _one_cycle_total(total_steps, epochs, steps_per_epoch)
    base, top = _finite("base_momentum", base_momentum), _finite("max_momentum", max_momentum)
    return _one_cycle(total, pct_start, anneal_strategy, three_phase, (top, base, top))


def _divisor(name: str, value: float) -> float:
    """`value` as a float, refused unless finite and positive: torch divides by it."""
    if _finite(name, value) == 0:
        raise ValueError(
            f"`{name}` must be a finite number > 0 (the rate is divided by it), got {value!r}."
        )
    return float(value)


def _one_cycle_total(
    total_steps: int | None, epochs: int | None, steps_per_epoch: int | None
) -> int:
    if total_steps is not None:
        return _positive_int("total_steps", total_steps)
    if epochs is None or steps_per_epoch is None:
        raise ValueError("Pass `total_steps`, or both `epochs` and `steps_per_epoch`.")
    total = _positive_int("epochs", epochs) * _positive_int("steps_per_epoch", steps_per_epoch)
    if total > _INT32_MAX:
        raise ValueError(
            f"`epochs` * `steps_per_epoch` must be at most 2**31 - 1 = {_INT32_MAX} (update "
            f"counts are int32), got {epochs!r} * {steps_per_epoch!r} = {total}."
        )
    return total


def _one_cycle(
    total: int,
    pct_start: float,
    anneal_strategy: str,
    three_phase: bool,
    values: tuple[float, float, float],
) -> optax.Schedule:
    """Torch's phases: (start value, peak, end), ends at steps pct*T - 1 (, 2 pct*T - 2), T - 1."""
    if not isinstance(pct_start, float) or not 0 <= pct_start <= 1:
        raise ValueError(f"`pct_start` must be a float in [0, 1], got {pct_start!r}.")
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"`anneal_strategy` must be 'cos' or 'linear', got {anneal_strategy!r}.")
    _validation.check_flag("three_phase", three_phase)
    start, peak, end = values
    if three_phase:
        ends = [pct_start * total - 1, 2 * pct_start * total - 2, total - 1]
        pairs = [(start, peak), (peak, start), (start, end)]
    else:
        ends = [pct_start * total - 1, total - 1]
        pairs = [(start, peak), (peak, end)]
    begins = [0.0, *ends[:-1]]

    def anneal(a, b, pct):
        if anneal_strategy == "cos":
            return b + (a - b) * _half_cosine(pct)
        return (b - a) * pct + a

    def schedule(count):
        # Past the last end torch extrapolates the last phase once and then raises: hold the
        # end instead (extrapolated, a linear anneal would go below 0).
        step = jnp.minimum(jnp.asarray(count, jnp.float32), total - 1)
        value = jnp.float32(0.0)
        # Phases from last to first, so the first phase whose end is not passed wins.
        for (a, b), begin, stop in reversed(list(zip(pairs, begins, ends, strict=True))):
            phase = anneal(a, b, (step - begin) / (stop - begin))
            value = phase if stop == ends[-1] else jnp.where(step <= stop, phase, value)
        return value

    return schedule
