"""Checkpoints of parameters and optimizer state that restore with their types, or fail clearly.

Orbax stores a NamedTuple state (`ScaleByRmsState`, optax's `TraceState`, ...) as a dict and an
`EmptyState` as nothing, so a checkpoint read back without a target comes back as dicts and
lists that no optax `update` accepts. Restoring against an abstract target built from a freshly
initialized optimizer gives back the original types and dtypes. Before restoring, the stored
tree is compared leaf by leaf with that target, so a checkpoint written by another model or
another optimizer configuration (centered or not, with or without momentum) is refused with a
message naming the leaf, instead of being padded, truncated or half-restored. A step whose
metadata files are damaged raises :class:`CorruptCheckpointError` naming the step, its
directory and the way out, and a directory that does not exist is reported, never created.

Typical use, with any pytree of arrays (the keys `params` and `opt_state` make the messages
speak of parameters and optimizer state)::

    manager = rj.checkpoint.open_manager(directory)
    rj.checkpoint.save(manager, step, {"params": params, "opt_state": opt_state})
    ...
    fresh = {"params": init_params(), "opt_state": tx.init(init_params())}
    restored = rj.checkpoint.restore(manager, fresh)  # the latest step, same types as `fresh`

Orbax saves in the background (unless `enable_async_checkpointing=False`): :func:`save`
returns while the files are written. A save in flight is finished before :func:`restore`
reads, and before the Python process ends normally (a script that returns right after its
last save keeps it: orbax alone would leave a temporary directory). `manager.close()` or
`manager.wait_until_finished()` finishes it at a time of your choosing.

Needs `orbax-checkpoint` (`pip install rmsprop-jax[examples]`), imported on first use.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import os
import sys
import threading
import traceback
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax import _validation
from rmsprop_jax._checkpoint_match import CheckpointMismatchError, _flat, _path_key, check_matches

if TYPE_CHECKING:
    import orbax.checkpoint as ocp


class CorruptCheckpointError(ValueError):
    """A checkpoint's metadata cannot be read: the files of a step are truncated or damaged.

    Raised by :func:`restore` instead of the `json.JSONDecodeError` (or storage error) that
    reading the damaged file gives, with the step, its directory, the damaged files and what
    to do: restore another step, or delete the damaged one.

    Examples:
      >>> import pathlib, tempfile
      >>> directory = tempfile.mkdtemp()
      >>> manager = rj.checkpoint.open_manager(directory)
      >>> rj.checkpoint.save(manager, 1, {"w": jnp.ones(3)}); manager.wait_until_finished()
      True
      >>> _ = (pathlib.Path(directory) / "1" / "default" / "_METADATA").write_text("{")
      >>> rj.checkpoint.restore(manager, {"w": jnp.zeros(3)})
      Traceback (most recent call last):
      ...
      rmsprop_jax.checkpoint.CorruptCheckpointError: checkpoint at step 1 is damaged: its
      metadata in .../1 (default/_METADATA in it) cannot be read ...
      >>> import shutil; manager.close(); shutil.rmtree(directory)
    """


# Managers made by `open_manager` and since closed. Orbax's `save` on a closed manager returns
# True, but its closed background threads never finish the checkpoint: only a temporary
# directory is left, and errors are logged minutes later.
_CLOSED: weakref.WeakSet[Any] = weakref.WeakSet()


# Managers whose last save may still be running in orbax's background threads. Held strongly
# (not a WeakSet like `_CLOSED`): a manager dropped right after `save` has files to finish.
_IN_FLIGHT: set[Any] = set()


def _finish_in_flight() -> None:
    """Finishes every save still in flight (the Python process is ending)."""
    while _IN_FLIGHT:
        manager = _IN_FLIGHT.pop()
        try:
            _finished(manager)
        except Exception:  # reported; the other managers are still finished
            print(
                f"rmsprop_jax.checkpoint: a save in {manager.directory} could not be finished "
                "as the process ended:",
                file=sys.stderr,
            )
            traceback.print_exc()


@functools.cache
def _finish_in_flight_at_exit() -> None:
    """Registers, once, the finishing of the saves in flight before the process ends.

    Orbax finishes a save in background threads that use `concurrent.futures` executors,
    which refuse new work once the interpreter starts shutting down, before `atexit`
    functions run: the save was left as a temporary directory. So they are finished in a hook
    of `threading`'s own shutdown (the one `concurrent.futures` uses), registered after
    orbax's import and therefore run before that of `concurrent.futures` (the last registered
    runs first). Python releases without it fall back to `atexit`, where a save may still be
    lost: there, call `manager.wait_until_finished()`.
    """
    register = getattr(threading, "_register_atexit", atexit.register)
    register(_finish_in_flight)


def _in_flight(manager: ocp.CheckpointManager) -> None:
    """Records that `manager` may have a save running, to be finished before the process ends."""
    _IN_FLIGHT.add(manager)
    _finish_in_flight_at_exit()


def _finished(manager: ocp.CheckpointManager) -> None:
    """Waits for the save `manager` may have in flight (orbax's own wait), unless closed."""
    if _closed(manager):
        return
    manager.wait_until_finished()
    _IN_FLIGHT.discard(manager)


def _marked_when_closed(manager: ocp.CheckpointManager) -> ocp.CheckpointManager:
    """`manager`, whose `close` (directly or by leaving a `with` block) marks it closed."""
    close = manager.close

    def close_and_mark() -> None:
        close()  # orbax's close waits for a save in flight
        _CLOSED.add(manager)
        _IN_FLIGHT.discard(manager)

    manager.close = close_and_mark
    return manager


def _closed(manager: ocp.CheckpointManager) -> bool:
    """Whether `manager` was closed: marked by :func:`open_manager`, or, for a manager made
    with orbax itself, its metadata writer shut down (what `close` does in orbax 0.11.13 to
    0.12; a manager without one, in a later orbax, counts as open unless marked)."""
    if manager in _CLOSED:
        return True
    metadata_store = getattr(manager, "_non_blocking_metadata_store", None)
    executor = getattr(metadata_store, "_single_thread_executor", None)
    return getattr(executor, "_shutdown", False) is True


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:
        raise ImportError(
            "rmsprop_jax.checkpoint needs orbax-checkpoint: pip install 'rmsprop-jax[examples]'"
        ) from error
    return ocp


def _abstract_leaf(leaf: Any) -> Any:
    """What orbax restores `leaf` from: its shape and dtype (and sharding), or a Python number
    itself (restored as a number of its type)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if isinstance(leaf, np.generic):  # a NumPy scalar, which orbax restores only as an array
        return np.zeros((), leaf.dtype)
    return _orbax().utils.to_shape_dtype_struct(leaf)


def _is_key(leaf: Any) -> bool:
    """Whether `leaf` is an array (or shape) of typed PRNG keys (`jax.random.key`)."""
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _read(leaf: Any) -> Any:
    """What the checkpoint's metadata records for the target leaf `leaf`: typed PRNG keys as
    their raw data (uint32, one trailing axis more, placed as the keys are), which orbax
    writes and reads back as keys; anything else as it is."""
    if not _is_key(leaf):
        return leaf
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.random.key_data(leaf)
    # Shapes only: eval_shape would also give an abstract sharding orbax cannot place.
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=leaf.sharding)


def _restored_like(leaf: Any, value: Any) -> Any:
    """`value` as read for the target leaf `leaf`: raw key data wrapped with `leaf`'s PRNG
    implementation, keys unwrapped for a raw (uint32) target (orbax reads keys it wrote as
    keys, whatever the target), a NumPy scalar taken out of its 0-d array."""
    if _is_key(leaf) != _is_key(value):
        if not _is_key(leaf):
            return jax.random.key_data(value)
        return jax.random.wrap_key_data(value, impl=jax.random.key_impl(jnp.zeros((), leaf.dtype)))
    return value[()] if isinstance(leaf, np.generic) else value


def open_manager(
    directory: str | os.PathLike[str], options: ocp.CheckpointManagerOptions | None = None
) -> ocp.CheckpointManager:
    """An `orbax.checkpoint.CheckpointManager` for :func:`save` and :func:`restore`.

    It knows the format of its items from the start, so a new process can read the metadata
    of existing checkpoints before restoring any of them (a plain manager cannot).

    Opening creates nothing: the directory is made by the first :func:`save` (orbax's
    `create` option is turned off), so a mistyped directory given to :func:`restore` raises
    `FileNotFoundError` naming it instead of leaving a new empty directory behind.

    Args:
      directory: where the checkpoints live (made absolute; created by the first save).
      options: orbax's `CheckpointManagerOptions` (how many to keep, async saving, ...); its
        `create` field is ignored, as said above.

    Raises:
      TypeError: `directory` is not a path, or `options` is not a `CheckpointManagerOptions`
        (a dict, for example).
      NotADirectoryError: `directory` is a file.

    Examples:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as parent:
      ...     manager = rj.checkpoint.open_manager(os.path.join(parent, "run"))
      ...     print(manager.all_steps(), os.listdir(parent))
      ...     manager.close()
      [] []
    """
    ocp_ = _orbax()
    if options is not None and not isinstance(options, ocp_.CheckpointManagerOptions):
        raise TypeError(
            "`options` must be an orbax.checkpoint.CheckpointManagerOptions or None, got "
            f"{options!r}."
        )
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(f"`directory` must be a path (a str or os.PathLike), got {directory!r}.")
    options = dataclasses.replace(options or ocp_.CheckpointManagerOptions(), create=False)
    path = Path(directory).absolute()

    def manager() -> ocp.CheckpointManager:
        return _marked_when_closed(
            ocp_.CheckpointManager(
                path, options=options, item_handlers=ocp_.StandardCheckpointHandler()
            )
        )

    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(
                f"{path} is a file, not a checkpoint directory: pass a directory (it is made by "
                "the first save if it does not exist)."
            )
        return manager()
    # Older orbax (0.11.13) refuses to open a directory that does not exist: open it on a
    # directory made for the purpose, then remove what was made, so that opening still leaves
    # nothing behind (the first `save` makes the directory again).
    made = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True)
    try:
        return manager()
    finally:
        for folder in made:  # deepest first
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()


_SAVABLE_KINDS = "biufc"  # NumPy dtype kinds orbax writes: bool, integers, floats, complex.


def _unsavable(leaf: Any) -> str | None:
    """What `leaf` is, where orbax cannot save it; None where it can."""
    if isinstance(leaf, jax.core.Tracer):
        return "a traced value (save outside jax.jit, jax.vmap and jax.grad)"
    if isinstance(leaf, jax.Array | bool | int | float):
        return None
    if isinstance(leaf, np.ndarray | np.generic):
        return None if leaf.dtype.kind in _SAVABLE_KINDS else f"an array of dtype {leaf.dtype}"
    return f"a {type(leaf).__name__}"


def _check_savable(state: Any) -> None:
    """Refuses, before anything is written, a leaf orbax cannot save: it would raise midway
    (or in its background thread) and leave a temporary step directory behind."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        problem = _unsavable(leaf)
        if problem is None and np.size(leaf) > 0:
            continue
        where = jax.tree_util.keystr(path) or "its root"
        if problem is not None:
            raise TypeError(
                f"`state` holds {problem} at {where}, which cannot be saved: only arrays and "
                "Python or NumPy numbers of boolean, integer, floating or complex dtypes can. "
                "Nothing was written."
            )
        raise ValueError(
            f"`state` holds an array of shape {np.shape(leaf)} at {where}, which has no "
            "elements: orbax cannot save such an array. Leave it out of the saved tree (it "
            "holds no values) and build it again after restoring, e.g. from a zero-size "
            "parameter's shape. Nothing was written."
        )


def _check_manager(manager: Any) -> None:
    if isinstance(manager, _orbax().CheckpointManager):
        return
    path = isinstance(manager, str | os.PathLike)
    named = path or manager is None or isinstance(manager, int | float)
    got = repr(manager) if named else f"a {type(manager).__name__}"
    hint = f": open it with rj.checkpoint.open_manager({os.fspath(manager)!r})" if path else ""
    raise TypeError(
        "`manager` must be an orbax.checkpoint.CheckpointManager, as "
        f"rj.checkpoint.open_manager(directory) returns, got {got}{hint}."
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves the pytree `state` as `step` of `manager` (one item, orbax's standard format).

    Returns:
      Whether the step is saved (the manager's save policy may skip a step). With orbax's
      default asynchronous saving the files are still being written: they are complete after
      `manager.wait_until_finished()` or `manager.close()`, and :func:`restore` and the normal
      end of the process wait for them.

    Raises:
      TypeError: `manager` is not an orbax `CheckpointManager` (a path, say), `step` is not
        an integer (a float or a bool would name a directory "1.5" or "True"), or `state`
        holds a leaf that is neither an array nor a Python or NumPy number (a string, a
        function, a traced value under `jax.jit`: orbax would fail midway and leave a
        temporary directory).
      ValueError: `state` holds an array with no elements (a zero-size axis), which orbax
        cannot save (it would fail midway and leave a temporary directory); `step` is
        negative; `manager` was closed (orbax would report success and leave an unfinished
        temporary directory); or, without `force`, `step` is already saved
        or comes before the latest saved step (orbax would skip the save and return False,
        so the state would silently not be written: after restoring an earlier step, say).

    Examples:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     manager = rj.checkpoint.open_manager(directory)
      ...     params = {"w": jnp.ones((2, 3))}
      ...     state = {"params": params, "opt_state": rj.rmsprop(0.1).init(params)}
      ...     print(rj.checkpoint.save(manager, 10, state), manager.all_steps())
      ...     manager.close()
      True [10]
    """
    _check_manager(manager)
    # Orbax takes any value as a step and names a directory after it ("1.5", "True", "-1").
    step = _validation.check_step(step)
    _check_savable(state)
    if _closed(manager):
        raise ValueError(
            f"The checkpoint manager of {manager.directory} is closed, so step {step} would not "
            "be saved (orbax would report success and leave an unfinished temporary "
            "directory). Save before closing it, or open it again with "
            "rj.checkpoint.open_manager(directory)."
        )
    if not force:
        _check_after_latest(manager, step)
    ocp_ = _orbax()
    # The manager was opened with `create=False`; older orbax versions (0.11.13) then refuse
    # to save into a directory that does not exist yet, so the first save makes it.
    Path(manager.directory).mkdir(parents=True, exist_ok=True)
    # NumPy scalars as 0-d arrays, which every supported orbax writes (0.11 refuses scalars).
    state = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, np.generic) else x, state)
    saved = manager.save(step, args=ocp_.args.StandardSave(state), force=force)
    if saved:
        _in_flight(manager)
    return saved


def _check_after_latest(manager: ocp.CheckpointManager, step: int) -> None:
    """Raises unless `step` comes after every saved step: orbax skips any other save without a
    word (its `should_save`), so a state meant to be saved would be lost."""
    latest = manager.latest_step()
    if latest is None or step > latest:
        return
    if step in manager.all_steps():
        raise ValueError(
            f"Step {step} is already saved in {manager.directory}: orbax would skip this save "
            "and keep the stored state. Save under a new step, or delete the stored one first "
            f"with manager.delete({step})."
        )
    raise ValueError(
        f"Step {step} comes before step {latest}, the latest saved in {manager.directory}: "
        "orbax would skip this save, so the state would not be written. Save under a step "
        f"after {latest}, or pass force=True to save it as step {step} (restore() without a "
        f"step still reads step {latest}, the highest)."
    )


def _step_directory(manager: ocp.CheckpointManager, step: int) -> Any:
    try:  # honours a custom `step_name_format`; private in orbax, hence the fallback
        return manager._get_read_step_directory(step, manager.directory)
    except AttributeError:  # another orbax version: the default layout, <directory>/<step>
        return manager.directory / str(step)


def _unreadable_json(step_directory: Any) -> dict[str, Exception]:
    """The JSON metadata files of a step directory that do not parse (relative to it), each
    with the error its parse raised."""
    root = Path(str(step_directory))
    damaged: dict[str, Exception] = {}
    for path in sorted(root.rglob("*")):
        is_metadata = path.name.startswith("_") or path.parent.name == "array_metadatas"
        if not (path.is_file() and is_metadata):
            continue
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            damaged[str(path.relative_to(root))] = error
    return damaged


def _corrupt(manager: ocp.CheckpointManager, step: int, error: Exception) -> CorruptCheckpointError:
    step_directory = _step_directory(manager, step)
    damaged = list(_unreadable_json(step_directory))
    which = f" ({', '.join(damaged)} in it)" if damaged else ""
    others = [other for other in manager.all_steps() if other != step]
    instead = (
        f"restore another step (restore(manager, target, step=N) with N in {sorted(others)})"
        if others
        else "restore from another copy"
    )
    return CorruptCheckpointError(
        f"checkpoint at step {step} is damaged: its metadata in {step_directory}{which} cannot "
        f"be read ({type(error).__name__}: {error}). It was probably truncated by a full disk "
        f"or an interrupted copy. Either {instead}, or delete {step_directory} so that the "
        "latest step is an intact one."
    )


def _check_readable(manager: ocp.CheckpointManager, step: int) -> None:
    """Raises :class:`CorruptCheckpointError` where a metadata file of `step` does not parse.

    Checked before orbax reads anything: orbax reads the arrays concurrently, and where one
    read fails the others are abandoned unfinished (their coroutines are collected after
    their event loop closed).
    """
    damaged = _unreadable_json(_step_directory(manager, step))
    if damaged:
        raise _corrupt(manager, step, next(iter(damaged.values())))


def restore(manager: ocp.CheckpointManager, target: Any, step: int | None = None) -> Any:
    """Restores `step` (default: the latest) of `manager` into the structure of `target`.

    A save of `manager` still being written in the background is finished first.

    Args:
      manager: from :func:`open_manager`, holding checkpoints written by :func:`save`.
      target: a tree like the one saved, e.g. built from a freshly initialized model and
        optimizer (arrays or `jax.ShapeDtypeStruct` leaves; only shapes, dtypes, shardings and
        the tree structure are used). Python and NumPy numbers (a step or epoch counter saved
        with the state) come back as numbers of their type, typed PRNG keys
        (`jax.random.key`, in a Flax NNX state say) as keys.
      step: the step to restore (a non-negative integer); None for the latest.

    Returns:
      The stored values in a tree with the structure and node types of `target` (NamedTuple
      states stay NamedTuples) and the stored dtypes.

    Raises:
      FileNotFoundError: the manager's directory does not exist (nothing is created), it holds
        no checkpoint, or none at `step`.
      NotADirectoryError: the manager's path is a file.
      TypeError: `manager` is not an orbax `CheckpointManager` (a path, say).
      TypeError, ValueError: `step` is not a non-negative integer.
      ValueError: the manager cannot read the checkpoint's metadata (not opened by
        :func:`open_manager`).
      CorruptCheckpointError: the checkpoint's metadata files are truncated or damaged.
      CheckpointMismatchError: the checkpoint's leaves, shapes or dtypes differ from `target`'s;
        nothing is restored.

    Examples:
      >>> import tempfile
      >>> tx, params = rj.rmsprop(0.1), {"w": jnp.ones((2, 3))}
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     manager = rj.checkpoint.open_manager(directory)
      ...     _ = rj.checkpoint.save(manager, 10, {"opt_state": tx.init(params)})
      ...     manager.wait_until_finished()
      ...     fresh = {"opt_state": tx.init(jax.tree.map(jnp.zeros_like, params))}
      ...     restored = rj.checkpoint.restore(manager, fresh)
      ...     manager.close()
      >>> type(restored["opt_state"][2]).__name__, restored["opt_state"][2].nu["w"].shape
      ('ScaleByRmsState', (2, 3))
    """
    ocp_ = _orbax()
    _check_manager(manager)
    _finished(manager)  # a save in flight is read whole, not as its temporary directory
    if not manager.directory.exists():
        raise FileNotFoundError(
            f"checkpoint directory {manager.directory} does not exist: nothing to restore. "
            "Check the path (it is resolved against the current directory)."
        )
    if not manager.directory.is_dir():
        raise NotADirectoryError(
            f"{manager.directory} is a file, not a checkpoint directory: pass the directory "
            "that save() wrote the checkpoints into."
        )
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint to restore in {manager.directory}")
    else:
        step = _validation.check_step(step)
        if step not in manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint at step {step} in {manager.directory}; it holds steps "
                f"{sorted(manager.all_steps())}"
            )
    _check_readable(manager, step)
    try:
        metadata = manager.item_metadata(step)
    except ValueError as error:  # a damaged file that is not JSON (tensorstore's error)
        raise _corrupt(manager, step, error) from error
    if metadata is None:
        raise ValueError(
            f"cannot read the metadata of checkpoint step {step} in {manager.directory}: create "
            "the manager with rmsprop_jax.checkpoint.open_manager(directory), or pass "
            "item_handlers=orbax.checkpoint.StandardCheckpointHandler() to CheckpointManager"
        )
    stored = jax.tree.map(_read, target)
    check_matches(metadata, stored, where=f"checkpoint at step {step}")
    # Orbax compares the stored structure with the restore item's, empty nodes included, so
    # the item is the stored structure (NamedTuples as dicts) with the target's shapes, dtypes
    # and shardings; the leaves then go back into the target's structure by path. A target
    # with a leafless node the checkpoint lacks (a newer version's layout record) restores.
    abstract = {path: _abstract_leaf(leaf) for path, leaf in _flat(stored).items()}
    item = jax.tree_util.tree_map_with_path(
        lambda path, _: abstract[_path_key(path)], getattr(metadata, "tree", metadata)
    )
    try:
        restored = _flat(manager.restore(step, args=ocp_.args.StandardRestore(item)))
    except json.JSONDecodeError as error:  # damaged after the check above
        raise _corrupt(manager, step, error) from error
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _restored_like(leaf, restored[_path_key(path)]), target
    )


__all__ = [
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "check_matches",
    "open_manager",
    "restore",
    "save",
]
