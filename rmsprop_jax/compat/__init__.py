"""Presets that reproduce the RMSprop of PyTorch, Keras 3 and TF1, and checkpoint conversion."""

from rmsprop_jax.compat._keras import keras_rmsprop
from rmsprop_jax.compat._tf1 import tf1_rmsprop
from rmsprop_jax.compat._torch import TorchLayoutState, torch_rmsprop
from rmsprop_jax.compat._torch_groups import torch_rmsprop_groups
from rmsprop_jax.compat._torch_state import state_from_torch, state_to_torch

__all__ = [
    "TorchLayoutState",
    "keras_rmsprop",
    "state_from_torch",
    "state_to_torch",
    "tf1_rmsprop",
    "torch_rmsprop",
    "torch_rmsprop_groups",
]
