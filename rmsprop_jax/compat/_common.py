"""Pieces shared by the framework presets: complex-parameter policies, imported-state checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _validation, _wrappers


def _view_as_real(x: Any) -> Any:
    return jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1) if jnp.iscomplexobj(x) else x


def _view_as_complex(x: Any, like: Any) -> Any:
    if x is None or not jnp.iscomplexobj(like):
        return x
    return jax.lax.complex(x[..., 0], x[..., 1]).astype(jnp.result_type(like))


def view_as_real(tree: Any) -> Any:
    """Replaces each complex leaf of shape `s` by its real and imaginary parts, shape `s + (2,)`.

    This is `torch.view_as_real`: the layout PyTorch's RMSprop updates complex parameters in.
    """
    return jax.tree.map(_view_as_real, tree)


def _complex_like(new_updates: Any, updates: Any) -> Any:
    return jax.tree.map(_view_as_complex, new_updates, updates, is_leaf=lambda x: x is None)


def as_real_pairs(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Runs `inner` on complex leaves viewed as pairs of reals with separate statistics.

    The state of `inner` holds each complex leaf of shape `s` as a real array of shape
    `s + (2,)` (see :func:`view_as_real`); updates come back complex, in the gradient's dtype.
    """
    return _wrappers.map_transformation(
        inner, map_inputs=view_as_real, map_updates_back=_complex_like
    )


def reject_complex(
    inner: optax.GradientTransformation, framework: str
) -> optax.GradientTransformationExtraArgs:
    """Wraps `inner` so that `init` raises `TypeError` on complex parameters.

    Keras and TF1 square a complex gradient as `g * g` (a complex number, not `|g|**2`), which
    is not a second moment; there is no trajectory worth reproducing.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        def check(path, leaf):
            if jnp.iscomplexobj(leaf):
                raise TypeError(
                    f"Parameter at {jax.tree_util.keystr(path) or '<root>'} is complex "
                    f"({jnp.result_type(leaf)}), but {framework} squares complex gradients as "
                    "g * g rather than |g|**2, so it has no RMSprop trajectory to reproduce. "
                    "Use `rmsprop_jax.rmsprop` (|g|**2) or `rmsprop_jax.compat.torch_rmsprop` "
                    "(real and imaginary parts separately) for complex parameters."
                )

        jax.tree.map_with_path(check, params)
        return inner.init(params)

    return optax.GradientTransformationExtraArgs(init_fn, inner.update)


def check_imported_statistic(values: Any, what: str, *, mean_square: bool) -> None:
    """`ValueError` naming `what` when an imported state array holds a NaN or a negative square.

    Another framework's optimizer state holds a NaN only after its run diverged, and a negative
    mean square only when it was edited: imported, either makes every later update NaN. An
    infinite mean square is kept (float32 squares overflow for gradients above about 1.8e19,
    and the step then divides by it as the framework does). Traced values are not checked.
    """
    if isinstance(values, jax.core.Tracer):
        return
    array = np.asarray(values)
    if np.isnan(array).any():
        bad, kind = np.isnan(array), "NaN"
        why = "the run it comes from had diverged; import an earlier state"
    elif mean_square and (array < 0).any():
        bad, kind, why = array < 0, "negative", "a mean of squares is never negative"
    else:
        return
    raise ValueError(
        f"{what} holds {np.count_nonzero(bad)} {kind} entries of {array.size} (the first "
        f"{array[bad].flat[0].item()!r}); imported, it would make every update NaN: {why}."
    )


def imported_step_count(value: Any, what: str) -> jax.Array:
    """An imported step count as the int32 scalar the state keeps; `ValueError` naming `what`
    unless it is one whole number from 0 to 2**31 - 1.

    PyTorch keeps `step` as a float tensor and Keras `iteration` as an integer variable: a
    fractional, negative or non-finite one comes only from an edited state, and would become
    a wrong count (truncated, or negative for the schedules) rather than an error.
    """
    array = np.asarray(value)
    number = array.item() if array.size == 1 and array.dtype.kind in "iuf" else None
    if not (
        isinstance(number, int | float)
        and np.isfinite(number)
        and number == int(number)
        and 0 <= number <= _validation.INT32_MAX
    ):
        raise ValueError(
            f"{what} must be one whole number from 0 to 2**31 - 1 = {_validation.INT32_MAX} "
            f"(update counts are int32), got "
            f"{_validation.shown(array.item() if array.size == 1 else value)}."
        )
    return jnp.asarray(int(number), jnp.int32)
