"""RMSprop for JAX: every variant, exact framework presets, numerics that never NaN."""

from rmsprop_jax import checkpoint as checkpoint
from rmsprop_jax import compat, sweep
from rmsprop_jax import sharding as sharding
from rmsprop_jax import storage as storage
from rmsprop_jax.alias import rmsprop
from rmsprop_jax.grouping import PackedTree, pack_small_leaves
from rmsprop_jax.memory import StateMemory, state_bytes
from rmsprop_jax.storage import FactoredMoment, QuantizedMoment
from rmsprop_jax.transform import (
    ScaleByCenteredRmsState,
    ScaleByCenteredVarianceState,
    ScaleByRmsState,
    scale_by_rms,
)
from rmsprop_jax.weight_decay import DecoupledWeightDecayState, add_decoupled_weight_decay

__version__ = "0.1.0"

__all__ = [
    "DecoupledWeightDecayState",
    "FactoredMoment",
    "PackedTree",
    "QuantizedMoment",
    "ScaleByCenteredRmsState",
    "ScaleByCenteredVarianceState",
    "ScaleByRmsState",
    "StateMemory",
    "add_decoupled_weight_decay",
    "compat",
    "pack_small_leaves",
    "rmsprop",
    "scale_by_rms",
    "state_bytes",
    "storage",
    "sweep",
]
