"""Drivers shared by the tests: run a transformation over a fixed gradient sequence."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.stages import Compiled
from numpy.typing import DTypeLike

from rmsprop_jax import _jax_compat

# Where state lands under automatic sharding is decided by XLA's sharding propagation; the
# placement tests pin down what JAX 0.10 and newer do. JAX 0.5.3 computes the same values but
# places some state elsewhere (under explicit sharding, all of `init`'s state is replicated
# until the first update), so those tests skip there, saying so.
needs_jax_0_10_compiler = pytest.mark.skipif(
    _jax_compat.JAX_VERSION < (0, 10),
    reason=f"compiled-step memory is judged on the XLA of JAX 0.10+, this is JAX {jax.__version__}",
)
needs_jax_0_10_placement = pytest.mark.skipif(
    _jax_compat.JAX_VERSION < (0, 10),
    reason=f"state placement by sharding propagation is checked on JAX 0.10+, this is "
    f"JAX {jax.__version__}",
)


def example(name: str) -> ModuleType:
    """The script `examples/<name>.py` as a module (conftest.py puts `examples/` on the path)."""
    return importlib.import_module(name)


def enable_x64(enabled: bool = True) -> AbstractContextManager[Any]:
    """`jax.enable_x64` as a context manager; `jax.experimental.enable_x64` before JAX had it."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(enabled)
    # JAX releases before `jax.enable_x64` only; the installed JAX no longer has these.
    from jax.experimental import disable_x64  # type: ignore[attr-defined]
    from jax.experimental import enable_x64 as enable  # type: ignore[attr-defined]

    return enable() if enabled else disable_x64()


def random_problem(
    shapes: dict[str, tuple[int, ...]], steps: int, seed: int = 0, dtype: DTypeLike = np.float32
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Parameters and a gradient sequence drawn from a seeded normal distribution."""
    rng = np.random.default_rng(seed)
    params = {name: rng.normal(size=shape).astype(dtype) for name, shape in shapes.items()}
    grads = [
        {name: rng.normal(size=shape).astype(dtype) for name, shape in shapes.items()}
        for _ in range(steps)
    ]
    return params, grads


def run_transformation(
    tx: optax.GradientTransformation,
    params: Any,
    grads: Sequence[Any],
    transform_fn: Callable[..., Any] = jax.jit,
) -> tuple[list[Any], Any]:
    """:func:`run_trajectory` for a list of gradient trees, one per step.

    `transform_fn` is `jax.jit` for the compiled variant (anything else runs eagerly).
    Returns the parameter tree after each step and the final state.
    """
    stacked = jax.tree.map(lambda *steps: np.stack(steps), *grads)
    state, history = run_trajectory(tx, params, stacked, jit=transform_fn is jax.jit)
    return [jax.tree.map(lambda h, t=t: h[t], history) for t in range(len(grads))], state


def max_elementwise_relative_error(actual: Any, expected: Any, floor: float = 0.1) -> float:
    """max |actual - expected| / max(|expected|, floor) over every leaf of two trees."""
    worst = 0.0
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a = np.asarray(a, dtype=np.complex128 if np.iscomplexobj(a) else np.float64)
        e = np.asarray(e)
        if a.size:
            worst = max(worst, float(np.max(np.abs(a - e) / np.maximum(np.abs(e), floor))))
    return worst


def run_trajectory(tx, params, grads, steps=slice(None), state=None, *, jit=True):
    """The one trajectory runner: steps `tx` through the gradients from `state`.

    `params` is any pytree; `grads` the same tree with a leading step axis on every leaf, of
    which `steps` is taken. Starts from `tx.init(params)` when `state` is None. One
    `lax.scan` under jit, or a Python loop. Returns the final state and the parameters after
    each step (the tree of `params`, each leaf with a leading step axis).
    """

    def step(carry, g):
        p, state = carry
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        return (p, state), p

    def start(p):
        return p, tx.init(p) if state is None else state

    params = jax.tree.map(jnp.asarray, params)
    chunk = jax.tree.map(lambda g: jnp.asarray(g[steps]), grads)
    if jit:
        run = jax.jit(lambda p, gs: jax.lax.scan(step, start(p), gs))
        (_, final), history = run(params, chunk)
        return final, history
    carry, history = start(params), []
    for t in range(len(jax.tree.leaves(chunk)[0])):
        carry, p = step(carry, jax.tree.map(lambda g, t=t: g[t], chunk))
        history.append(p)
    return carry[1], jax.tree.map(lambda *h: jnp.stack(h), *history)


def preset_trajectory(tx, params, grads, *, jit=True):
    """Parameters after each step of `tx` from `tx.init(params)`."""
    return run_trajectory(tx, params, grads, jit=jit)[1]


def max_error_relative_to_leaf_scale(ours, reference):
    """Max over leaves of max|ours - reference| / max|reference| over the whole trajectory.

    Relative to each leaf's scale rather than elementwise: a coordinate passing through 0
    has a float32 rounding error of ~1e-8 whichever framework computes it.
    """
    worst = 0.0
    for a, b in zip(ours, reference, strict=True):
        assert a.shape == b.shape
        worst = max(worst, float(np.max(np.abs(a - b)) / np.max(np.abs(b))))
    return worst


def conformance_problem(seed, shapes, steps, dtype=np.float32):
    """Initial parameters and a fixed gradient sequence (offset so centering matters)."""
    rng = np.random.default_rng(seed)

    def draw(shape):
        if np.issubdtype(dtype, np.complexfloating):
            return rng.normal(size=shape) + 1j * rng.normal(size=shape)
        return rng.normal(size=shape)

    params = [draw(s).astype(dtype) for s in shapes]
    scale = np.exp(rng.normal(size=(steps,)))
    grads = [
        ((0.3 + draw((steps, *s))) * scale.reshape((steps,) + (1,) * len(s))).astype(dtype)
        for s in shapes
    ]
    return params, grads


def compile_step(tx: optax.GradientTransformation, params: Any) -> Compiled:
    """One jitted "update + apply" step with parameters and state donated, compiled."""
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()


def array_kernels(compiled: Compiled) -> int:
    """Instructions of the entry computation that write an array (not a scalar or a tuple)."""
    text = compiled.as_text()
    assert text is not None, "the backend gives no text of the compiled program"
    entry = text.split("\nENTRY", 1)[1]
    writes = re.findall(r"= (\w+\[[\d,]*\])\S* (?!parameter\(|tuple\(|get-tuple-element\()", entry)
    return sum(1 for shape in writes if not shape.endswith("[]"))


def distinct_fusions(compiled: Compiled) -> int:
    """How many fused computations of the compiled program differ in more than their names.

    Two computations count once when their instructions match after every name is replaced by
    its order of first appearance (and metadata dropped): XLA compiles such kernels once.
    """
    text = compiled.as_text()
    assert text is not None, "the backend gives no text of the compiled program"
    bodies = re.findall(r"\n%?fused\S* \(.*?\) -> .*? \{\n(.*?)\n\}", text, re.S)

    def canonical(body: str) -> str:
        names: dict[str, str] = {}
        body = re.sub(r",? metadata=\{[^}]*\}", "", body)
        return re.sub(r"%[\w.\-]+", lambda m: names.setdefault(m[0], f"%{len(names)}"), body)

    return len({canonical(body) for body in bodies})


def stored_leaf(average, name):
    """What a state stores for parameter `name`: an array, or (int8, factored) the format's
    container holding that parameter's part of each tree (placeholders where unused)."""
    import rmsprop_jax as rj

    if isinstance(average, rj.QuantizedMoment | rj.FactoredMoment):
        return type(average)(*(tree[name] for tree in average))
    return average[name]


def is_compressed(stored: Any) -> bool:
    """Whether a `stored_leaf` holds compressed parts (rather than its dense average)."""
    import rmsprop_jax as rj

    if isinstance(stored, rj.QuantizedMoment | rj.FactoredMoment):
        return stored.dense.shape == (1,) and stored[0].shape != (1,)
    return stored.dtype in (jnp.bfloat16,)


def second_moment_field(state):
    """The stored second moment of a `scale_by_rms` state: `nu`, or `variance` (centered,
    compressed formats)."""
    return getattr(state, "variance", None) if hasattr(state, "variance") else state.nu
