"""An independent float64 NumPy RMSprop, written from the equations (README, Numerics).

It shares no code with the package: one leaf at a time, one step at a time, plain NumPy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Config:
    learning_rate: float | Callable[[int], float] = 0.01
    decay: float = 0.9
    eps: float = 1e-8
    eps_in_sqrt: bool = False
    initial_scale: float = 0.0
    centered: bool = False
    momentum: float | None = None
    nesterov: bool = False
    bias_correction: bool = False
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    maximize: bool = False

    def rate(self, step_index: int) -> float:
        """The learning rate of the step with 0-based index `step_index`."""
        if callable(self.learning_rate):
            return float(self.learning_rate(step_index))
        return self.learning_rate

    def as_kwargs(self) -> dict:
        return dataclasses.asdict(self)


class LeafState:
    """Moments of one parameter leaf, in float64 (complex128 for complex leaves)."""

    def __init__(self, param: np.ndarray, config: Config):
        real_shape = np.shape(param)
        self.nu = np.full(real_shape, config.initial_scale, dtype=np.float64)
        self.mu = np.zeros(
            real_shape, dtype=np.complex128 if np.iscomplexobj(param) else np.float64
        )
        self.buffer = np.zeros_like(self.mu)


def reference_step(
    param: np.ndarray,
    grad: np.ndarray,
    state: LeafState,
    config: Config,
    step: int,
    decayed: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One RMSprop step for one leaf; `step` counts from 1. Returns (new_param, update)."""
    dtype = np.complex128 if np.iscomplexobj(param) or np.iscomplexobj(grad) else np.float64
    p = np.asarray(param, dtype=dtype)
    g = np.asarray(grad, dtype=dtype)
    rate = config.rate(step - 1)
    if config.maximize:
        g = -g
    if decayed and config.weight_decay and not config.decoupled_weight_decay:
        g = g + config.weight_decay * p
    beta = config.decay
    state.nu = beta * state.nu + (1 - beta) * np.abs(g) ** 2
    state.mu = beta * state.mu + (1 - beta) * g
    nu = state.nu / (1 - beta**step) if config.bias_correction else state.nu
    variance = np.maximum(nu - np.abs(state.mu) ** 2, 0.0) if config.centered else nu
    if config.eps_in_sqrt:
        denominator = np.sqrt(variance + config.eps)
    else:
        denominator = np.sqrt(variance) + config.eps
    safe = np.where(denominator > 0, denominator, 1.0)
    scaled = rate * np.where(denominator > 0, g / safe, 0.0)
    if config.momentum is None:
        step_vector = scaled
    else:
        state.buffer = config.momentum * state.buffer + scaled
        step_vector = config.momentum * state.buffer + scaled if config.nesterov else state.buffer
    update = -step_vector
    if decayed and config.weight_decay and config.decoupled_weight_decay:
        update = update - rate * config.weight_decay * p
    return p + update, update


def reference_trajectory(
    params: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    config: Config,
    mask: dict[str, bool] | None = None,
    hold_params: bool = False,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Applies the gradients in order. Returns the parameters and the updates after each step.

    With `hold_params`, every update is computed at the initial parameters (as a test that calls
    `update` repeatedly without applying it does).
    """
    states = {name: LeafState(value, config) for name, value in params.items()}
    current = {name: np.asarray(value) for name, value in params.items()}
    trajectory, updates = [], []
    for step, grad in enumerate(grads, start=1):
        new, step_updates = {}, {}
        for name in current:
            decayed = True if mask is None else mask[name]
            new[name], step_updates[name] = reference_step(
                current[name], grad[name], states[name], config, step, decayed
            )
        if not hold_params:
            current = new
        trajectory.append(current)
        updates.append(step_updates)
    return trajectory, updates
