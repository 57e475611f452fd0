"""One shape of wrapper: map a transformation's inputs, run it, map its updates back.

The compute-dtype cast, the placement of a new state and PyTorch's complex-as-pairs view are
all this shape. A wrapper given a `once` name runs only at the outermost level: when a public
transformation built from other public transformations (`rmsprop` chains `scale_by_rms`)
wraps them in the same way, the inner wrappers see that it is already done and step aside,
so the cast and the placement happen once per optimizer.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import optax

from rmsprop_jax._numpy_rules import standard_numpy_rules

_ACTIVE: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "rmsprop_jax_active_wrappers", default=frozenset()
)


def _identity(tree: Any) -> Any:
    return tree


@contextlib.contextmanager
def _entered(name: str | None) -> Iterator[bool]:
    """Yields whether the wrapper `name` is the outermost one; marks it active meanwhile."""
    active = _ACTIVE.get()
    if name is None or name not in active:
        token = _ACTIVE.set(active | {name} if name else active)
        try:
            yield True
        finally:
            _ACTIVE.reset(token)
    else:
        yield False


def map_transformation(
    inner: optax.GradientTransformation,
    *,
    map_inputs: Callable[[Any], Any] = _identity,
    map_updates_back: Callable[[Any, Any], Any] = lambda new, _: new,
    map_state_back: Callable[[Any, Any], Any] = lambda new, _: new,
    check_params: Callable[[Any], None] | None = None,
    check_updates: Callable[[Any, Any], None] | None = None,
    after_init: Callable[[Any, Any], Any] | None = None,
    once: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """`inner` run on `map_inputs(params)` and `map_inputs(updates)`.

    Args:
      inner: the transformation to wrap.
      map_inputs: applied to the parameters and the incoming updates.
      map_updates_back: `(new_updates, incoming_updates) -> updates` returned to the caller.
      map_state_back: `(new_state, incoming_state) -> state` returned to the caller.
      check_params: called with the raw parameters at `init` (to reject bad input early).
      check_updates: called with the raw incoming updates and parameters (or None) at
        `update`.
      after_init: `(state, raw_params) -> state`, applied to the new state.
      once: a name; nested wrappers of the same name step aside for the outermost one.

    Returns:
      A transformation with `inner`'s state.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        with standard_numpy_rules(), _entered(once) as outermost:
            if not outermost:
                return inner.init(params)
            if check_params is not None:
                check_params(params)
            state = inner.init(map_inputs(params))
            return state if after_init is None else after_init(state, params)

    def update_fn(updates, state, params=None, **extra_args):
        with standard_numpy_rules(), _entered(once) as outermost:
            if not outermost:
                return inner.update(updates, state, params, **extra_args)
            if check_updates is not None:
                check_updates(updates, params)
            params = None if params is None else map_inputs(params)
            new_updates, new_state = inner.update(map_inputs(updates), state, params, **extra_args)
            return map_updates_back(new_updates, updates), map_state_back(new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
