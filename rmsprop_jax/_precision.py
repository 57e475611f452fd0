"""Mixed precision: optimizer arithmetic in float32 or wider, whatever the parameter dtype.

`g**2` in float16 overflows for |g| > 256, and a learning rate of 1e-3 rounded to bfloat16 is
off by 0.4%. So every transform here sees float32 (or float64 / complex) copies of the
gradients, parameters and hyperparameters, keeps its state in that dtype, and only the final
update is cast back to the dtype of the incoming gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _validation, _wrappers
from rmsprop_jax._numpy_rules import standard_numpy_rules


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype the optimizer computes in for a leaf of `dtype`: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype of the squared magnitude `|g|**2` of a leaf of compute dtype `dtype`."""
    return jnp.finfo(dtype).dtype


def squared_dtype(leaf: Any) -> jnp.dtype:
    """The dtype of `|g|**2` for a leaf (an array or `jax.ShapeDtypeStruct`) in compute dtype."""
    return real_dtype(leaf.dtype)


def as_hyperparameter(value: Any) -> Any:
    """Returns a numeric hyperparameter with at least float32 precision; schedules unchanged.

    Python numbers stay weakly typed (so float64 parameters keep float64 arithmetic); arrays
    in bfloat16 or float16 (as `optax.inject_hyperparams` stores them for low-precision
    parameters) are widened so that the arithmetic does not round them. Called where the
    optimizer is built, outside its transformations' standard rules (and by
    `optax.inject_hyperparams` on every step, with int32 or bfloat16 arrays), so it enters them.
    """
    if callable(value) or isinstance(value, int | float):
        return value
    value = jnp.asarray(value)
    with standard_numpy_rules():
        return value.astype(compute_dtype(value.dtype))


def _upcast_leaf(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(
            x.shape, compute_dtype(x.dtype), sharding=getattr(x, "sharding", None)
        )
    return jnp.asarray(x, compute_dtype(jnp.result_type(x)))


def _upcast(tree: Any) -> Any:
    return jax.tree.map(_upcast_leaf, tree)


def _cast_like(tree: Any, reference: Any) -> Any:
    """`tree` in the dtypes of `reference`, leaf by leaf: the updates in the gradients' dtypes,
    the new state in those of the state given (the dtypes `init` gave it).

    A hyperparameter array wider than the state (float64 with `jax_enable_x64`, a swept
    `decay` say) would otherwise widen every average it multiplies: the state would change
    dtype from one step to the next (which a `jax.lax.scan` carry refuses) and double in size.
    The step still computes with the wide hyperparameter; only what is returned is cast. A
    leaf already in its dtype, or whose reference has none (a Python number), is returned as
    it is. The dtype is the one JAX computes a reference in: a NumPy float64 gradient stands
    for float32 unless `jax_enable_x64` is set (asking for float64 would only raise JAX's
    warning that it is not available).
    """

    def cast(x: Any, ref: Any) -> Any:
        dtype = getattr(ref, "dtype", None)
        if dtype is None:
            return x
        dtype = jax.dtypes.canonicalize_dtype(dtype)
        return x if getattr(x, "dtype", dtype) == dtype else x.astype(dtype)

    return jax.tree.map(cast, tree, reference)


def with_compute_dtype(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Runs `inner` on gradients and parameters upcast to their compute dtype.

    The returned transformation has the same state as `inner`, returned in the dtypes of the
    state it was given (those `init` gave it); its updates have the dtype of the incoming
    gradients. Integer or boolean parameters
    are rejected with a `TypeError`. Nested inside another such wrapper (a public
    transformation chained into another), it does nothing: the outer one has cast already,
    and casting back in between would round.
    """
    return _wrappers.map_transformation(
        inner,
        map_inputs=_upcast,
        map_updates_back=_cast_like,
        map_state_back=_cast_like,
        check_params=_validation.check_float_leaves,
        check_updates=_validation.check_update_inputs,
        once="compute_dtype",
    )
