"""Presets that reproduce the RMSprop of PyTorch, Keras 3 and TF1, and checkpoint conversion."""

from rmsprop_jax.compat._example_libraries import (
    example_libraries_rmsprop,
    example_libraries_rmsprop_momentum,
    state_from_example_libraries,
    state_to_example_libraries,
)
from rmsprop_jax.compat._keras import keras_rmsprop
from rmsprop_jax.compat._keras_ema import KerasEmaState, keras_ema_weights
from rmsprop_jax.compat._keras_state import state_from_keras, state_to_keras
from rmsprop_jax.compat._tf1 import tf1_rmsprop
from rmsprop_jax.compat._torch import TorchLayoutState, torch_rmsprop
from rmsprop_jax.compat._torch_groups import torch_rmsprop_groups
from rmsprop_jax.compat._torch_one_cycle import torch_one_cycle_lr, torch_one_cycle_momentum
from rmsprop_jax.compat._torch_plateau import TorchPlateauState, torch_reduce_lr_on_plateau
from rmsprop_jax.compat._torch_schedulers import (
    torch_constant_lr,
    torch_cosine_annealing_lr,
    torch_cosine_annealing_warm_restarts,
    torch_exponential_lr,
    torch_lambda_lr,
    torch_linear_lr,
    torch_multi_step_lr,
    torch_polynomial_lr,
    torch_sequential_lr,
    torch_step_lr,
)
from rmsprop_jax.compat._torch_state import state_from_torch, state_to_torch

__all__ = [
    "KerasEmaState",
    "TorchLayoutState",
    "TorchPlateauState",
    "example_libraries_rmsprop",
    "example_libraries_rmsprop_momentum",
    "keras_ema_weights",
    "keras_rmsprop",
    "state_from_example_libraries",
    "state_from_keras",
    "state_from_torch",
    "state_to_example_libraries",
    "state_to_keras",
    "state_to_torch",
    "tf1_rmsprop",
    "torch_constant_lr",
    "torch_cosine_annealing_lr",
    "torch_cosine_annealing_warm_restarts",
    "torch_exponential_lr",
    "torch_lambda_lr",
    "torch_linear_lr",
    "torch_multi_step_lr",
    "torch_one_cycle_lr",
    "torch_one_cycle_momentum",
    "torch_polynomial_lr",
    "torch_reduce_lr_on_plateau",
    "torch_rmsprop",
    "torch_rmsprop_groups",
    "torch_sequential_lr",
    "torch_step_lr",
]
