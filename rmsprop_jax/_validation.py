"""Checks on user input that turn silent wrong answers into errors that name the culprit.

Hyperparameters are checked only when they are concrete: a traced value (under `jax.jit`,
`jax.vmap` or `optax.inject_hyperparams`) cannot be inspected, and a schedule is a function.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The optimizer computes in float32 or wider (`rmsprop_jax._precision`): a hyperparameter past
# float32's largest number becomes infinite there, and XLA:CPU (as GPUs commonly do) flushes a
# positive float32 below its smallest normal number (a subnormal one) to zero.
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_SMALLEST_NORMAL = float(np.finfo(np.float32).smallest_normal)
# Update counts are int32, as optax's are.
INT32_MAX = int(np.iinfo(np.int32).max)


def _concrete_values(value: Any) -> np.ndarray | None:
    """Returns `value` as a NumPy array, or None when it cannot be inspected."""
    if value is None or callable(value) or isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def is_concrete_and_positive_in_float32(value: Any) -> bool:
    """True when `value` can be inspected and every element of it stays > 0 in float32's
    arithmetic: at least float32's smallest normal number (about 1.18e-38), as smaller ones
    are flushed to zero."""
    values = _concrete_values(value)
    return (
        values is not None and values.size > 0 and bool(np.all(values >= FLOAT32_SMALLEST_NORMAL))
    )


def is_literal_zero(value: Any) -> bool:
    """True only for a Python zero: an array or tracer may hold other values across a sweep.

    Optional stages (weight decay, a framework's momentum buffer) are left out of a chain only
    for a literal 0, so that a swept hyperparameter keeps the same state structure.
    """
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def check_flag(name: str, value: Any) -> None:
    """Raises `TypeError` unless `value` is a Python bool: flags choose the state's structure.

    A string such as "False" is truthy, so accepting it would silently build the opposite.
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")


def check_step(step: Any) -> int:
    """`step` as an int: a Python, NumPy or concrete JAX integer >= 0 (a step count).

    Raises `TypeError` for anything else (a float or a bool, which would pass as a number) and
    `ValueError` for a negative one.
    """
    try:
        count = None if isinstance(step, bool) else operator.index(step)
    except TypeError:
        count = None
    if count is None:
        raise TypeError(f"`step` must be an integer, got {step!r}.")
    if count < 0:
        raise ValueError(f"`step` must be >= 0, got {step!r}.")
    return count


def check_count(
    name: str, value: Any, *, low: int, counted: str = "update counts", or_none: bool = False
) -> int:
    """`value` as an int: a Python or NumPy integer (not a bool) from `low` to 2**31 - 1, the
    most the int32 counts it is compared with can reach; else `ValueError` naming `name`.

    `counted` says which counts those are; `or_none` adds "or None" to the message where the
    caller takes None as well (and checks it before calling).
    """
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, int | np.integer)
        or not low <= value <= INT32_MAX
    ):
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(
            f"`{name}` must be {kind} (at most 2**31 - 1: {counted} are int32)"
            f"{' or None' if or_none else ''}, got {value!r}."
        )
    return int(value)


def check_transformation(name: str, value: Any, example: str) -> None:
    """Raises `TypeError` unless `value` is an optax transformation; `example` shows a call
    that passes one (a factory such as `rj.rmsprop` itself is the usual mistake)."""
    if not isinstance(value, optax.GradientTransformation):
        raise TypeError(
            f"`{name}` must be an optax.GradientTransformation, got {shown(value)}; pass a "
            f"built transformation, e.g. {example}."
        )


def shown(value: Any, limit: int = 80) -> str:
    """`value` for an error message: its repr if short, else its type. A tree of parameters
    passed in the wrong place (arguments swapped) would otherwise print every array."""
    text = repr(value)
    return text if len(text) <= limit else f"a {type(value).__name__}"


def check_fits_float32(name: str, value: Any, values: np.ndarray) -> None:
    """Raises `ValueError` naming `name` and `value` where an element of `values` (its numbers)
    lies past float32's largest number: the optimizer computes in float32, where it would be
    infinite."""
    if np.any(np.abs(values) > FLOAT32_MAX):
        raise ValueError(
            f"`{name}` must be at most {FLOAT32_MAX:.8g}, float32's largest number (the "
            f"optimizer computes in float32, where it would be infinite), got {value!r}."
        )


def check_in_range(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = float("inf"),
    high_inclusive: bool = True,
    optional: bool = False,
    schedule: bool = False,
) -> None:
    """Raises `ValueError` unless every element of a concrete `value` is finite in float32
    and in range.

    The range is [low, high] (or [low, high) when not `high_inclusive`). None is refused
    unless `optional`; a schedule (any callable) raises `TypeError` unless `schedule`, as it
    would otherwise fail only when traced, inside the arithmetic. Traced values and accepted
    schedules cannot be inspected and pass.
    """
    if value is None:
        if optional:
            return
        what = "a number, an array or a schedule" if schedule else "a number or an array"
        raise ValueError(f"`{name}` must be {what}, got None.")
    if callable(value) and not schedule:
        raise TypeError(
            f"`{name}` must be a number or an array, got the callable {shown(value)}: only "
            f"the learning rate takes a schedule. To change `{name}` during "
            f"training, let optax.inject_hyperparams evaluate the schedule at every step: "
            f"optax.inject_hyperparams(factory)(..., {name}=schedule)."
        )
    values = _concrete_values(value)
    if values is None:
        return
    # jnp.issubdtype, unlike NumPy's, counts bfloat16 (as inject_hyperparams stores it) as a number.
    if (
        not jnp.issubdtype(values.dtype, jnp.number)
        or np.iscomplexobj(values)
        or values.dtype == np.bool_
    ):
        raise ValueError(f"`{name}` must be a real number, got {value!r}.")
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    check_fits_float32(name, value, values)
    below = values < low
    above = values > high if high_inclusive else values >= high
    if np.any(below | above):
        if high == float("inf"):
            expected = f"be >= {low}"
        else:
            expected = f"lie in [{low}, {high}{']' if high_inclusive else ')'}"
        raise ValueError(f"`{name}` must {expected}, got {value!r}.")


# What an array hyperparameter (or schedule result) was probably meant for, and the way to it.
_ONE_VALUE_PER_RUN = (
    "To train with several values at once, build the optimizer inside a function mapped by "
    "jax.vmap (see rmsprop_jax.sweep)."
)


def scalar_hyperparameters(
    inner: optax.GradientTransformation, **hyperparameters: Any
) -> optax.GradientTransformationExtraArgs:
    """`inner`, or, where a hyperparameter is an array with axes, a transformation whose
    `init` and `update` raise `ValueError` naming it.

    Such an array is accepted when the optimizer is built, so that a whole sweep grid can be
    range-checked at once (see :mod:`rmsprop_jax.sweep`); used, it would be broadcast against
    every parameter leaf: a silent wrong answer for a leaf of the same shape, a shape error
    for the others. Schedules and None pass; a traced value is checked by its shape.
    """
    shaped = [
        (name, value)
        for name, value in hyperparameters.items()
        if not (value is None or callable(value) or np.ndim(value) == 0)
    ]
    if not shaped:
        return optax.with_extra_args_support(inner)
    name, value = shaped[0]
    message = (
        f"`{name}` has shape {np.shape(value)}, but a hyperparameter must be a scalar when the "
        f"optimizer runs (got {value!r}): an array would be broadcast against every "
        f"parameter. {_ONE_VALUE_PER_RUN}"
    )

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ValueError(message)

    return optax.GradientTransformationExtraArgs(refuse, refuse)


_PRECONDITIONER_MODULE = "rmsprop_jax.transform"


def stage_states_checked(
    name: str, chain: optax.GradientTransformation, *, stages: int
) -> optax.GradientTransformationExtraArgs:
    """`chain` (whose state is a tuple of `stages` stage states), whose `update` refuses
    anything else (another optimizer's state, optax's error not saying which; a list of stage
    states, as a restore without a target gives), and a tuple with a stage state of another
    type: the state of another configuration (momentum or none, a schedule or a constant rate,
    a mask or none), which the stage would fail on with an `AttributeError`, or, for an
    `optax.identity` given a buffer, carry along unused. The
    types are those `chain.init` gives for parameters of the tree structure of the update's
    (found once per structure, from shapes only; where that fails, a mask function reading
    values say, from the update's own parameters when they are concrete, in an eager update;
    under a trace such a mask fails anyway)."""
    chain = optax.with_extra_args_support(chain)
    expected_by_structure: dict[Any, list[type] | None] = {}

    def initial_states(params: Any) -> Any:
        try:
            return jax.eval_shape(chain.init, params)
        except Exception:
            if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(params)):
                return None
        try:
            return chain.init(params)
        except Exception:  # The stages' types then go unchecked, as under a trace.
            return None

    def expected(params: Any) -> list[type] | None:
        params = {} if params is None else params
        structure = jax.tree.structure(params)
        if structure not in expected_by_structure:
            states = initial_states(params)
            expected_by_structure[structure] = (
                None if states is None else [type(stage) for stage in states]
            )
        return expected_by_structure[structure]

    def update_fn(updates, state, params=None, **extra_args):
        given = len(state) if isinstance(state, Sequence) else None
        if given != stages:
            what = type(state).__name__ + ("" if given is None else f" of {given}")
            raise ValueError(
                f"{name}'s state is a tuple of {stages} stage states, as its init returns, but "
                f"it was given a {what}: a state made by another optimizer's init. Start from "
                "this optimizer's init(params), or restore a checkpoint into a target built by "
                "it."
            )
        if not isinstance(state, tuple):
            raise ValueError(
                f"{name}'s state is a tuple of {stages} stage states, as its init returns, but "
                f"it was given a {type(state).__name__} of them: a state restored without a "
                "target comes back with lists and dicts in place of tuples and named tuples. "
                "Restore into a target built by this optimizer's init(params) "
                "(rj.checkpoint.restore(manager, target))."
            )
        kinds = expected(params)
        if kinds is not None and len(state) == len(kinds):
            for index, (stage, kind) in enumerate(zip(state, kinds, strict=True)):
                # The preconditioner checks its own state, naming its options.
                if not isinstance(stage, kind) and kind.__module__ != _PRECONDITIONER_MODULE:
                    raise ValueError(
                        f"{name}'s state holds {_article(kind.__name__)} at position {index}, "
                        f"but was given {_article(type(stage).__name__)} there: a state made by "
                        "an optimizer of another configuration (momentum or none, a schedule or "
                        "a constant rate, a weight decay mask or none). Start from this "
                        "optimizer's init(params), or restore a checkpoint into a target built "
                        "by it."
                    )
        return chain.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(chain.init, update_fn)


def params_required_message(name: str, what: str) -> str:
    """The error for an update called without params by a transformation whose `name`
    (the argument that asked for it) does `what` with them."""
    return (
        f"`{name}` {what}, but update was called without params: call "
        "tx.update(grads, state, params)."
    )


def params_required(
    name: str, what: str, transformation: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    """`transformation`, whose update raises `ValueError` naming `name` when called without
    params (optax's error names neither the argument nor the remedy)."""
    transformation = optax.with_extra_args_support(transformation)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(params_required_message(name, what))
        return transformation.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(transformation.init, update_fn)


def _article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _is_flag(leaf: Any) -> bool:
    """True or False: a Python or NumPy bool, or a concrete boolean array without axes."""
    if isinstance(leaf, bool | np.bool_):
        return True
    dtype = getattr(leaf, "dtype", None)
    return (
        dtype is not None
        and np.dtype(dtype) == np.bool_
        and np.ndim(leaf) == 0
        and not isinstance(leaf, jax.core.Tracer)
    )


def checked_mask(name: str, mask: Any) -> Callable[[Any], Any]:
    """`mask` (a tree of booleans, or a function of the parameters giving one) as a function
    for `optax.masked` that checks what it gives: a prefix of the parameters' tree structure
    (`ValueError` naming `name` otherwise) whose leaves are True or False (`TypeError`: a
    string or an array would be taken for True, or fail deep inside optax)."""

    def resolved(tree: Any) -> Any:
        value = mask(tree) if callable(mask) else mask
        try:
            jax.tree.map(lambda flag, _: flag, value, tree)
        except ValueError as error:
            raise ValueError(
                f"`{name}` must have the tree structure of the parameters (or a prefix of it), "
                f"with True or False for each leaf: {error}"
            ) from None
        for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            if not _is_flag(leaf):
                raise TypeError(
                    f"`{name}` at {_path_str(path)} must be True or False, got {leaf!r}."
                )
        return value

    return resolved


def scalar_schedule(name: str, value: Any) -> Any:
    """`value`, or where it is a schedule, the schedule with its result checked to be a scalar,
    and, where it is concrete (an eager update), a finite number >= 0.

    A schedule returning an array with axes would be broadcast against every parameter leaf,
    as an array hyperparameter would (see :func:`scalar_hyperparameters`); its shape is known
    while the update is traced, so the check costs nothing in the compiled step. A traced
    value cannot be inspected: a NaN rate then gives NaN updates (which
    `optax.apply_if_finite` sees), a negative one ascends.
    """
    if not callable(value):
        return value

    def checked(count: Any) -> Any:
        result = value(count)
        if np.ndim(result) != 0:
            raise ValueError(
                f"`{name}` is a schedule that returned an array of shape {np.shape(result)}; a "
                f"schedule must return a scalar for each step count. {_ONE_VALUE_PER_RUN}"
            )
        try:
            check_in_range(name, result, low=0.0)
        except ValueError as error:
            step = _concrete_values(count)
            at = "" if step is None else f" at step count {step.item()}"
            raise ValueError(f"{error} It is the value of the schedule `{name}`{at}.") from None
        return result

    return checked


def _path_str(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _leaf_dtype(leaf: Any) -> Any:
    """The dtype of an array leaf; for a Python number, its type (an int or bool is integral)."""
    if isinstance(leaf, bool):
        return np.dtype(np.bool_)
    if isinstance(leaf, int):
        return np.dtype(np.int64)
    return getattr(leaf, "dtype", None)


def _check_inexact(tree: Any, what: str, remedy: str) -> None:
    """Raises `TypeError` naming the first leaf of `tree` that is neither floating nor complex.

    Paths are built only for a leaf to name (:func:`leaf_path`): eager updates run this on
    every call.
    """
    for index, leaf in enumerate(jax.tree.leaves(tree, is_leaf=_is_none)):
        dtype = _leaf_dtype(leaf)
        if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{what.capitalize()} at {leaf_path(tree, index)} has dtype {dtype}; RMSprop needs "
                f"floating or complex {what}s. {remedy}"
            )


def check_update_count(count: Any) -> None:
    """Raises `ValueError` unless an optimizer state's update count is int32, as `init` makes
    it: a state cast leaf by leaf (to bfloat16, say) would count on in that dtype."""
    dtype = getattr(count, "dtype", None)
    if dtype != jnp.int32:
        found = f"dtype {dtype}" if dtype is not None else f"no dtype ({shown(count)})"
        raise ValueError(
            f"The optimizer state's `count` has {found}, but updates are counted in "
            "int32 (in bfloat16 the count would stop at 256, and bias correction and schedules "
            "with it): the state was cast (by a tree map over the whole state, say) or not made "
            "by init. Cast only the parameters, or start from this optimizer's init(params)."
        )


def check_float_leaves(params: Any) -> None:
    """Raises `TypeError` naming the first integer or boolean parameter: it cannot be optimized."""
    _check_inexact(
        params,
        "parameter",
        "Keep integer or boolean leaves out of the optimized tree (for example with "
        "`optax.masked` or `flax.nnx.Optimizer(..., wrt=nnx.Param)`).",
    )


def check_float_gradients(updates: Any) -> None:
    """Raises `TypeError` naming the first integer or boolean gradient.

    Such a gradient would give an integer update (and for float parameters a zero one).
    """
    _check_inexact(
        updates,
        "gradient",
        "Differentiate with respect to floating-point parameters, or cast the gradient "
        "(e.g. `g.astype(jnp.float32)`).",
    )


def _is_none(node: Any) -> bool:
    return node is None


def _leaves_with_paths(tree: Any) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)[0]


def leaf_path(tree: Any, index: int) -> str:
    """The path of leaf `index` of `jax.tree.leaves(tree, is_leaf=lambda x: x is None)`, as
    messages name it. Checks that run on every eager update build it only for a leaf to name."""
    return _path_str(_leaves_with_paths(tree)[index][0])


def check_same_tree(
    tree: Any,
    reference: Any,
    *,
    what: str = "Gradient",
    reference_name: str = "the optimizer state",
    reference_shape: str = "the optimizer state was initialized for shape",
    remedy: str = "Initialize the optimizer with the same parameter tree the gradients come from.",
) -> None:
    """Raises `ValueError` naming the first path where `tree` and `reference` differ.

    Compares the tree structure and the shape of each leaf, so that a gradient for a different
    model fails with a readable message instead of an opaque tree or broadcasting error. `what`
    names `tree`'s leaves and `reference_name` the reference; a differing shape is reported as
    "{what} at {path} has shape {shape} but {reference_shape} {the reference's shape}".
    """
    if jax.tree.structure(tree, is_leaf=_is_none) == jax.tree.structure(
        reference, is_leaf=_is_none
    ):
        pairs = zip(
            jax.tree.leaves(tree, is_leaf=_is_none),
            jax.tree.leaves(reference, is_leaf=_is_none),
            strict=True,
        )
        for index, (g, s) in enumerate(pairs):
            if g is None and s is None:
                continue
            if (g is None) != (s is None):
                raise ValueError(
                    f"{what} at {leaf_path(tree, index)} is {'None' if g is None else 'an array'} "
                    f"but {reference_name} has {'None' if s is None else 'an array'}."
                )
            if np.shape(g) != np.shape(s):
                raise ValueError(
                    f"{what} at {leaf_path(tree, index)} has shape {np.shape(g)} but "
                    f"{reference_shape} {np.shape(s)}."
                )
        return
    paths = [_path_str(p) for p, _ in _leaves_with_paths(tree)]
    reference_paths = [_path_str(p) for p, _ in _leaves_with_paths(reference)]
    present, expected = set(paths), set(reference_paths)
    missing = [path for path in reference_paths if path not in present]
    extra = [path for path in paths if path not in expected]
    if not missing and not extra:
        raise ValueError(
            f"{what} tree has the same paths as {reference_name} but different container "
            f"types: {jax.tree.structure(tree)} vs {jax.tree.structure(reference)}."
        )
    differences = []
    if missing:
        differences.append(f"it lacks {listed(missing)}")
    if extra:
        differences.append(f"it has {listed(extra)}, which {reference_name} lacks")
    raise ValueError(
        f"{what} tree differs from {reference_name} ({_leaves(len(paths))} against "
        f"{_leaves(len(reference_paths))}): {'; '.join(differences)}. {remedy}"
    )


def check_update_inputs(updates: Any, params: Any) -> None:
    """The checks of `update`'s inputs before any arithmetic: floating gradients, and
    gradients in the tree of the parameters (where given), of their shapes.

    Parameters of another shape would be broadcast against the gradients by weight decay
    (coupled or decoupled), giving updates of the wrong values or shape rather than an error.
    """
    check_float_gradients(updates)
    if params is not None:
        check_same_tree(
            updates,
            params,
            reference_name="the parameter tree",
            reference_shape="the parameter there has shape",
            remedy="Pass gradients and parameters of the tree the optimizer was initialized with.",
        )


def _leaves(count: int) -> str:
    return f"{count} leaf" if count == 1 else f"{count} leaves"


def listed(names: list[str], limit: int = 4) -> str:
    """`names` joined for an error message: the first `limit`, then how many more."""
    joined = ", ".join(names[:limit])
    return joined if len(names) <= limit else f"{joined} and {len(names) - limit} more"
