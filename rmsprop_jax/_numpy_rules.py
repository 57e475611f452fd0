"""JAX's default NumPy rules for the library's own arithmetic, whatever the caller set.

The library is written and tested for JAX's defaults: `jax_numpy_dtype_promotion="standard"`,
under which a Python float meets the int32 step count in `1 - decay**count`, and
`jax_numpy_rank_promotion="allow"`, under which a shift by each bit position broadcasts
against a block of bytes. A caller may make either stricter for their own code (`"strict"`,
`"raise"`); the optimizer then runs as it does by default, bit for bit, instead of failing
while it is traced. The `init` and `update` of the public transformations enter
:func:`standard_numpy_rules` (most through :func:`rmsprop_jax._wrappers.map_transformation`),
and so does :func:`rmsprop_jax._precision.as_hyperparameter`, which runs where the optimizer
is built (on every step under `optax.inject_hyperparams`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def standard_numpy_rules() -> Iterator[None]:
    """JAX's default dtype and rank promotion while the block runs (trace time included)."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield
