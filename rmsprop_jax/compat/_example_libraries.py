r"""`jax.example_libraries.optimizers.rmsprop` and `rmsprop_momentum` as optax transformations.

The two optimizers of JAX's example library compute, per array,

.. math::

    v_t = \gamma v_{t-1} + (1 - \gamma) g_t^2

    s_t = \eta(i) g_t / \sqrt{v_t + \epsilon}

    m_t = \mu m_{t-1} + s_t

    x_t = x_{t-1} - m_t

where `rmsprop` has no buffer (m = s) and v₀ = m₀ = 0: `eps` inside the square root and
the step size applied before the momentum buffer, which is `rmsprop_jax.rmsprop` with
`eps_in_sqrt=True`. Their `update(i, grads, opt_state)` takes the step index `i` from the
caller; the optax schedule sees
the number of updates applied so far, the same number when `i` counts from 0.

Their `OptimizerState` holds the parameters and, per leaf, `(x, avg_sq_grad)` or
`(x, avg_sq_grad, mom)`; :func:`state_from_example_libraries` and
:func:`state_to_example_libraries` convert it to and from `(params, optax state)`.

References:
  JAX, jax.example_libraries.optimizers.
  https://docs.jax.dev/en/latest/jax.example_libraries.optimizers.html
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

import rmsprop_jax as rj
from rmsprop_jax import _validation
from rmsprop_jax.compat._common import (
    check_imported_statistic,
    imported_step_count,
    reject_complex,
)
from rmsprop_jax.transform import ScaleByCenteredRmsState, ScaleByRmsState

_STATS = (ScaleByRmsState, ScaleByCenteredRmsState)
_SLOT_NAMES = {1: "avg_sq_grad", 2: "mom"}
_FRAMEWORK = "jax.example_libraries.optimizers"


def example_libraries_rmsprop(
    step_size: optax.ScalarOrSchedule, gamma: chex.Numeric = 0.9, eps: chex.Numeric = 1e-8
) -> optax.GradientTransformationExtraArgs:
    """`jax.example_libraries.optimizers.rmsprop(step_size, gamma, eps)`: same trajectory.

    Args:
      step_size: a number or a schedule of the step index, as there.
      gamma: the decay of the mean square.
      eps: added to the mean square inside the square root.

    Returns:
      `rmsprop_jax.rmsprop(step_size, decay=gamma, eps=eps, eps_in_sqrt=True)`, whose `init`
      raises a `TypeError` on complex parameters: the example library squares a complex
      gradient as `g * g` (a complex "mean square"), so it has no trajectory to reproduce.

    Examples:
      >>> from jax.example_libraries import optimizers
      >>> init, update, get_params = optimizers.rmsprop(0.01)
      >>> reference = get_params(update(0, jnp.array([0.5, -0.5]), init(jnp.array([1.0, -2.0]))))
      >>> tx = rj.compat.example_libraries_rmsprop(0.01)
      >>> updates, _ = tx.update(jnp.array([0.5, -0.5]), tx.init(jnp.zeros(2)))
      >>> reference.round(4), (jnp.array([1.0, -2.0]) + updates).round(4)
      (Array([ 0.9684, -1.9684], dtype=float32), Array([ 0.9684, -1.9684], dtype=float32))
    """
    _check_hyperparameters(step_size, gamma, eps)
    return reject_complex(rj.rmsprop(step_size, decay=gamma, eps=eps, eps_in_sqrt=True), _FRAMEWORK)


def example_libraries_rmsprop_momentum(
    step_size: optax.ScalarOrSchedule,
    gamma: chex.Numeric = 0.9,
    eps: chex.Numeric = 1e-8,
    momentum: chex.Numeric = 0.9,
) -> optax.GradientTransformationExtraArgs:
    """`jax.example_libraries.optimizers.rmsprop_momentum(...)`: same trajectory.

    Args:
      step_size: a number or a schedule of the step index, as there.
      gamma: the decay of the mean square.
      eps: added to the mean square inside the square root.
      momentum: the decay of the buffer of scaled steps.

    Returns:
      `rmsprop_jax.rmsprop(step_size, decay=gamma, eps=eps, eps_in_sqrt=True,
      momentum=momentum)`, refusing complex parameters as :func:`example_libraries_rmsprop`.

    Examples:
      >>> tx = rj.compat.example_libraries_rmsprop_momentum(0.01, momentum=0.9)
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([0.5, -0.5]), state)
      >>> updates, state[4].trace
      (Array([-0.03162277,  0.03162277], dtype=float32),
       Array([-0.03162277,  0.03162277], dtype=float32))
    """
    _check_hyperparameters(step_size, gamma, eps)
    # Not optional here: `rj.rmsprop` would take None as "no momentum buffer".
    _validation.check_in_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    return reject_complex(
        rj.rmsprop(step_size, decay=gamma, eps=eps, eps_in_sqrt=True, momentum=momentum),
        _FRAMEWORK,
    )


def _check_hyperparameters(step_size: Any, gamma: Any, eps: Any) -> None:
    """`rj.rmsprop`'s checks, run first so that the errors name the example library's
    arguments (`gamma` rather than `decay`, `step_size` rather than `learning_rate`)."""
    _validation.check_in_range("step_size", step_size, low=0.0, schedule=True)
    _validation.check_in_range("gamma", gamma, low=0.0, high=1.0)
    _validation.check_in_range("eps", eps, low=0.0)


def _find(state: Any, kinds: tuple[type, ...]) -> list[Any]:
    return [
        node
        for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds))
        if isinstance(node, kinds)
    ]


def _parts(opt_state: Any, what: str) -> tuple[Any, Any | None]:
    stats, traces = _find(opt_state, _STATS), _find(opt_state, (optax.TraceState,))
    if len(stats) != 1 or len(traces) > 1 or isinstance(stats[0], ScaleByCenteredRmsState):
        raise ValueError(
            f"{what} holds {len(stats)} RMS statistics and {len(traces)} momentum buffers; "
            "pass the state of one `example_libraries_rmsprop` or "
            "`example_libraries_rmsprop_momentum` (not centered)."
        )
    return stats[0], (traces[0] if traces else None)


def _unpack(example_state: Any) -> tuple[Any, list[tuple[Any, ...]]]:
    """Parameters and per-leaf state tuples of an example-library `OptimizerState`."""
    fields = getattr(example_state, "_fields", None)
    if fields != ("packed_state", "tree_def", "subtree_defs"):
        raise ValueError(
            "`example_state` must be a jax.example_libraries.optimizers.OptimizerState, got "
            f"{type(example_state).__name__}."
        )
    packed, tree_def, subtree_defs = example_state
    per_leaf = [tuple(jax.tree.unflatten(d, s)) for d, s in zip(subtree_defs, packed, strict=True)]
    lengths = {len(s) for s in per_leaf}
    if not lengths <= {2, 3}:
        raise ValueError(
            f"The example-library state holds {sorted(lengths)} arrays per leaf; rmsprop keeps "
            "(x, avg_sq_grad) and rmsprop_momentum (x, avg_sq_grad, mom)."
        )
    params = jax.tree.unflatten(tree_def, [s[0] for s in per_leaf])
    return params, per_leaf


def state_from_example_libraries(
    example_state: Any, optimizer: optax.GradientTransformation, step: int = 0
) -> tuple[optax.Params, optax.OptState]:
    """`(params, optax state)` equal to an example-library `OptimizerState`.

    Args:
      example_state: the `OptimizerState` of `rmsprop` or `rmsprop_momentum`.
      optimizer: the matching :func:`example_libraries_rmsprop` or
        :func:`example_libraries_rmsprop_momentum`.
      step: the index `i` the next `update(i, ...)` would have been called with; it becomes
        the step count of the statistics and of the schedule.

    Returns:
      The parameters and `optimizer.init(params)` holding the mean squares, the buffers
      and `step`.

    Raises:
      ValueError: on a state of another optimizer, with momentum on one side only, a
        negative `step` or one past 2**31 - 1 (counts are int32), or statistics that hold a
        NaN or a negative `avg_sq_grad`.
      TypeError: on an `optimizer` that is not a built transformation, or a `step` that is not
        an integer.

    Examples:
      >>> from jax.example_libraries import optimizers
      >>> init, update, _ = optimizers.rmsprop_momentum(0.01, momentum=0.9)
      >>> example_state = update(0, jnp.array([0.5, -0.5]), init(jnp.array([1.0, -2.0])))
      >>> tx = rj.compat.example_libraries_rmsprop_momentum(0.01, momentum=0.9)
      >>> params, state = rj.compat.state_from_example_libraries(example_state, tx, step=1)
      >>> params.round(4), state[2].count, state[2].nu
      (Array([ 0.9684, -1.9684], dtype=float32), Array(1, dtype=int32),
       Array([0.025, 0.025], dtype=float32))
    """
    _validation.check_transformation(
        "optimizer", optimizer, "rj.compat.example_libraries_rmsprop(0.01)"
    )
    count = imported_step_count(_validation.check_step(step), "`step`")
    params, per_leaf = _unpack(example_state)
    opt_state = optimizer.init(params)
    stats, trace = _parts(opt_state, "The state of `optimizer`")
    if (trace is not None) != (len(per_leaf[0]) == 3 if per_leaf else False):
        raise ValueError(
            "Use `example_libraries_rmsprop_momentum` for a rmsprop_momentum state and "
            "`example_libraries_rmsprop` for a rmsprop state."
        )

    def tree_of(position: int, like: Any, sign: float = 1.0) -> Any:
        values = [sign * jnp.asarray(s[position]) for s in per_leaf]
        for leaf, value in enumerate(values):
            check_imported_statistic(
                value,
                f"The example-library {_SLOT_NAMES[position]} of leaf {leaf}",
                mean_square=position == 1,
            )
        leaves = jax.tree.leaves(like)
        return jax.tree.unflatten(
            jax.tree.structure(like),
            [v.astype(ref.dtype) for v, ref in zip(values, leaves, strict=True)],
        )

    def fill(node: Any) -> Any:
        if node is stats:
            return node._replace(count=count, nu=tree_of(1, node.nu))
        if trace is not None and node is trace:
            # The buffer here holds the step that is added: minus the one subtracted there.
            return node._replace(trace=tree_of(2, node.trace, -1.0))
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=count)
        return node

    kinds = (*_STATS, optax.TraceState, optax.ScaleByScheduleState)
    return params, jax.tree.map(fill, opt_state, is_leaf=lambda x: isinstance(x, kinds))


def state_to_example_libraries(opt_state: optax.OptState, params: optax.Params) -> Any:
    """The example-library `OptimizerState` equal to `params` and an optax state.

    Args:
      opt_state: the state of :func:`example_libraries_rmsprop` or
        :func:`example_libraries_rmsprop_momentum`.
      params: the current parameters.

    Returns:
      A `jax.example_libraries.optimizers.OptimizerState` for the matching example-library
      optimizer's `update` and `get_params`.

    Raises:
      ValueError: on a state that is not one example-library preset's, or `params` whose
        leaves' shapes are not those of its statistics.

    Examples:
      >>> from jax.example_libraries import optimizers
      >>> tx = rj.compat.example_libraries_rmsprop(0.01)
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(jnp.array([0.5, -0.5]), tx.init(params))
      >>> example_state = rj.compat.state_to_example_libraries(state, params + updates)
      >>> _, update, get_params = optimizers.rmsprop(0.01)
      >>> get_params(update(1, jnp.array([0.5, -0.5]), example_state)).round(4)
      Array([ 0.9454, -1.9454], dtype=float32)
    """
    from jax.example_libraries.optimizers import OptimizerState

    stats, trace = _parts(opt_state, "`opt_state`")
    leaves, tree_def = jax.tree.flatten(params)
    shapes = [jnp.shape(leaf) for leaf in leaves]
    stat_shapes = [jnp.shape(nu) for nu in jax.tree.leaves(stats.nu)]
    if shapes != stat_shapes:
        raise ValueError(
            f"`params` has leaves of shapes {shapes}, but `opt_state` keeps statistics of shapes "
            f"{stat_shapes}; pass the parameters the state was made for."
        )
    columns = [leaves, jax.tree.leaves(stats.nu)]
    if trace is not None:
        columns.append([-t for t in jax.tree.leaves(trace.trace)])
    per_leaf = [tuple(jnp.asarray(c) for c in row) for row in zip(*columns, strict=True)]
    flat = [jax.tree.flatten(s) for s in per_leaf]
    return OptimizerState([f[0] for f in flat], tree_def, [f[1] for f in flat])
