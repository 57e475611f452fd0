"""The identity format: every average kept as an array in the compute dtype (4 bytes for float32).

This is what optax and every framework store, and what the other formats are measured against. A
centered state keeps ν itself (not the variance), as PyTorch, Keras and TF1 do, so its
checkpoints convert to theirs.
"""

from __future__ import annotations

from typing import ClassVar

from rmsprop_jax.storage._format import StorageFormat


class Float32(StorageFormat):
    """Stores nothing compressed: each leaf is its average in the compute dtype."""

    name: ClassVar[str] = "float32"
    stores_centered_variance: ClassVar[bool] = False
    # The step divides by ν - |μ|², where a rounded μ could cancel the whole variance.
    first_moment_names: ClassVar[tuple[str, ...]] = ("float32",)
    rounds: ClassVar[bool] = False


FORMAT = Float32()
