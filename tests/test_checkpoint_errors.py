"""`rj.checkpoint` on damaged checkpoints and wrong paths: errors that say what to do."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsprop_jax as rj

pytest.importorskip("orbax.checkpoint")


def state(scale: float) -> dict:
    params = {"w": jnp.full((3, 2), scale), "b": jnp.zeros((2,))}
    return {"params": params, "opt_state": rj.rmsprop(1e-2, momentum=0.9).init(params)}


def save_steps(directory, steps=(1, 3)):
    with rj.checkpoint.open_manager(directory) as manager:
        for step in steps:
            rj.checkpoint.save(manager, step, state(float(step)), force=True)
        manager.wait_until_finished()


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# The JSON files orbax reads: the tree's metadata and the per-array metadata (read by
# `item_metadata`), the shardings (read when restoring).
METADATA_FILES = ["default/_METADATA", "default/array_metadatas/process_0", "default/_sharding"]


@pytest.mark.parametrize("damaged", METADATA_FILES)
def test_truncated_metadata_names_step_path_file_and_the_way_out(damaged, tmp_path):
    save_steps(tmp_path)
    step_directory = tmp_path.absolute() / "3"
    truncate(step_directory / damaged)
    manager = rj.checkpoint.open_manager(tmp_path)
    with pytest.raises(rj.checkpoint.CorruptCheckpointError) as error:
        rj.checkpoint.restore(manager, state(0.0))
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "checkpoint at step 3 is damaged" in message
    assert f"metadata in {step_directory} ({damaged} in it)" in message
    assert "step=N) with N in [1]" in message and f"delete {step_directory}" in message
    # The intact step still restores, with its values.
    restored = rj.checkpoint.restore(manager, state(0.0), step=1)
    np.testing.assert_array_equal(restored["params"]["w"], np.ones((3, 2)))


@pytest.mark.parametrize("damaged", METADATA_FILES)
def test_a_damaged_step_is_refused_before_orbax_reads_any_of_it(damaged, tmp_path, monkeypatch):
    # Orbax reads the arrays concurrently; one failing read would leave the others unfinished.
    save_steps(tmp_path)
    truncate(tmp_path / "3" / damaged)
    manager = rj.checkpoint.open_manager(tmp_path)

    def must_not_read(*args, **kwargs):
        raise AssertionError("orbax was asked to read a damaged step")

    monkeypatch.setattr(manager, "item_metadata", must_not_read)
    monkeypatch.setattr(manager, "restore", must_not_read)
    with pytest.raises(rj.checkpoint.CorruptCheckpointError, match=f"{damaged} in it"):
        rj.checkpoint.restore(manager, state(0.0))


def test_a_damaged_only_checkpoint_says_to_use_another_copy(tmp_path):
    save_steps(tmp_path, steps=(5,))
    truncate(tmp_path / "5" / "default" / "_METADATA")
    with pytest.raises(rj.checkpoint.CorruptCheckpointError, match="restore from another copy"):
        rj.checkpoint.restore(rj.checkpoint.open_manager(tmp_path), state(0.0))


def test_restoring_from_a_missing_directory_names_it_and_creates_nothing(tmp_path):
    missing = tmp_path / "runs" / "typo"
    manager = rj.checkpoint.open_manager(missing)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(FileNotFoundError, match=f"checkpoint directory {missing} does not exist"):
        rj.checkpoint.restore(manager, state(0.0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rj.checkpoint.restore(manager, state(0.0), step=3)
    assert list(tmp_path.iterdir()) == []


def test_saving_into_a_new_nested_directory_still_creates_it(tmp_path):
    directory = tmp_path / "runs" / "new"
    save_steps(directory, steps=(2,))
    restored = rj.checkpoint.restore(rj.checkpoint.open_manager(directory), state(0.0))
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 2.0))


def test_restoring_a_step_that_was_never_saved_lists_the_saved_ones(tmp_path):
    save_steps(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 2 in .*steps \[1, 3\]"):
        rj.checkpoint.restore(rj.checkpoint.open_manager(tmp_path), state(0.0), step=2)


def test_opening_or_restoring_from_a_file_says_it_is_not_a_directory(tmp_path):
    path = tmp_path / "state.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(NotADirectoryError, match=f"{path} is a file, not a checkpoint directory"):
        rj.checkpoint.open_manager(path)
    # A directory replaced by a file after the manager was opened.
    (tmp_path / "run").mkdir()
    manager = rj.checkpoint.open_manager(tmp_path / "run")
    (tmp_path / "run").rmdir()
    (tmp_path / "run").write_bytes(b"not a checkpoint")
    with pytest.raises(NotADirectoryError, match="is a file, not a checkpoint directory"):
        rj.checkpoint.restore(manager, state(0.0))
    assert path.read_bytes() == b"not a checkpoint"


@pytest.mark.parametrize(
    ("step", "error", "message"),
    [
        (1.5, TypeError, "`step` must be an integer, got 1.5"),
        (True, TypeError, "`step` must be an integer, got True"),
        ("5", TypeError, "`step` must be an integer, got '5'"),
        (-1, ValueError, "`step` must be >= 0, got -1"),
    ],
)
def test_a_step_that_is_not_a_natural_number_is_refused_and_writes_nothing(
    step, error, message, tmp_path
):
    manager = rj.checkpoint.open_manager(tmp_path)
    with pytest.raises(error, match=message):
        rj.checkpoint.save(manager, step, state(1.0), force=True)
    assert list(tmp_path.iterdir()) == []
    save_steps(tmp_path, steps=(1,))
    with pytest.raises(error, match=message):
        rj.checkpoint.restore(rj.checkpoint.open_manager(tmp_path), state(0.0), step=step)


def test_a_step_held_in_a_jax_integer_is_a_step(tmp_path):
    # An optimizer's own count (a 0-d int32 array) was refused as "not an integer".
    manager = rj.checkpoint.open_manager(tmp_path)
    assert rj.checkpoint.save(manager, jnp.int32(4), state(1.0))
    manager.wait_until_finished()
    assert manager.all_steps() == [4] and type(manager.all_steps()[0]) is int
    restored = rj.checkpoint.restore(manager, state(0.0), step=jnp.int32(4))
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 1.0))


def test_a_step_already_saved_is_refused_and_the_stored_state_stays(tmp_path):
    # orbax skips such a save and returns False: the new state was silently not written.
    with rj.checkpoint.open_manager(tmp_path) as manager:
        assert rj.checkpoint.save(manager, 1, state(1.0))
        with pytest.raises(ValueError, match=r"Step 1 is already saved in .*manager\.delete\(1\)"):
            rj.checkpoint.save(manager, 1, state(2.0))  # before the first save has finished
        manager.wait_until_finished()
        manager.delete(1)
        assert rj.checkpoint.save(manager, 1, state(2.0))  # deleted first, it saves
        manager.wait_until_finished()
        restored = rj.checkpoint.restore(manager, state(0.0))
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 2.0))


def test_a_step_before_the_latest_is_refused_unless_forced(tmp_path):
    # As after restoring an earlier step and training on: orbax skipped every such save.
    save_steps(tmp_path, steps=(10,))
    with rj.checkpoint.open_manager(tmp_path) as manager:
        with pytest.raises(ValueError, match=r"Step 6 comes before step 10, the latest saved in"):
            rj.checkpoint.save(manager, 6, state(6.0))
        assert manager.all_steps() == [10]
        assert rj.checkpoint.save(manager, 6, state(6.0), force=True)
        manager.wait_until_finished()
        assert sorted(manager.all_steps()) == [6, 10]
        restored = rj.checkpoint.restore(manager, state(0.0), step=6)
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 6.0))


def test_a_step_the_save_policy_skips_still_returns_false(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    options = ocp.CheckpointManagerOptions(save_interval_steps=5)
    with rj.checkpoint.open_manager(tmp_path, options) as manager:
        assert rj.checkpoint.save(manager, 0, state(0.0))
        assert not rj.checkpoint.save(manager, 3, state(3.0))
        assert rj.checkpoint.save(manager, 5, state(5.0))
        manager.wait_until_finished()
        assert manager.all_steps() == [0, 5]


@pytest.mark.parametrize("closing", ["close", "with"])
def test_saving_with_a_closed_manager_is_refused_and_the_saved_steps_stay(closing, tmp_path):
    if closing == "with":
        with rj.checkpoint.open_manager(tmp_path) as manager:
            rj.checkpoint.save(manager, 1, state(1.0))
    else:
        manager = rj.checkpoint.open_manager(tmp_path)
        rj.checkpoint.save(manager, 1, state(1.0))
        manager.close()
    with pytest.raises(ValueError, match=r"manager of .* is closed, so step 2 would not be saved"):
        rj.checkpoint.save(manager, 2, state(2.0))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["1"]
    with rj.checkpoint.open_manager(tmp_path) as again:
        assert again.all_steps() == [1]
        rj.checkpoint.save(again, 2, state(2.0))  # reopened, it saves
        again.wait_until_finished()
        restored = rj.checkpoint.restore(again, state(0.0))
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 2.0))


def test_a_closed_manager_made_with_orbax_is_refused_too(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    manager = ocp.CheckpointManager(tmp_path, item_handlers=ocp.StandardCheckpointHandler())
    assert rj.checkpoint.save(manager, 1, state(1.0))
    manager.wait_until_finished()
    assert rj.checkpoint.save(manager, 2, state(2.0))  # still open after waiting
    manager.wait_until_finished()
    manager.close()
    with pytest.raises(ValueError, match=r"manager of .* is closed, so step 3 would not be saved"):
        rj.checkpoint.save(manager, 3, state(3.0))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["1", "2"]
    restored = rj.checkpoint.restore(manager, state(0.0))  # reading needs no open manager
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 2.0))


@pytest.mark.parametrize("kind", ["str", "path", "none"])
def test_a_path_or_none_instead_of_a_manager_is_named(kind, tmp_path):
    """Before, an AttributeError: 'str' object has no attribute 'directory'."""
    manager = {"str": str(tmp_path), "path": tmp_path, "none": None}[kind]
    hint = re.escape(f": open it with rj.checkpoint.open_manager('{tmp_path}')") if manager else ""
    message = rf"`manager` must be an orbax\.checkpoint\.CheckpointManager.*, got .*{hint}"
    with pytest.raises(TypeError, match=message):
        rj.checkpoint.save(manager, 1, state(1.0))
    with pytest.raises(TypeError, match=message):
        rj.checkpoint.restore(manager, state(0.0))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("directory", [3, None, b"ckpt"])
def test_a_directory_that_is_not_a_path_is_named(directory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Path(b"...") is refused by pathlib; nothing may be made
    with pytest.raises(TypeError, match=r"`directory` must be a path .* got " + repr(directory)):
        rj.checkpoint.open_manager(directory)
    assert list(tmp_path.iterdir()) == []


def test_options_of_another_type_are_named(tmp_path):
    with pytest.raises(
        TypeError, match=r"`options` must be .*CheckpointManagerOptions.*max_to_keep"
    ):
        rj.checkpoint.open_manager(tmp_path, {"max_to_keep": 2})


@pytest.mark.parametrize(
    ("leaf", "what"),
    [
        ("cosine", "a str"),
        (lambda x: x, "a function"),
        (2 + 1j, "a complex"),
        (np.array(["a", "b"]), r"an array of dtype <U1"),
        (np.array([None]), "an array of dtype object"),
    ],
    ids=["str", "function", "python-complex", "numpy-strings", "numpy-objects"],
)
def test_a_leaf_orbax_cannot_write_is_named_and_nothing_is_written(leaf, what, tmp_path):
    # Orbax raised midway (or in its background thread) and left
    # `1.orbax-checkpoint-tmp` behind.
    manager = rj.checkpoint.open_manager(tmp_path)
    saved = {**state(1.0), "config": {"schedule": leaf}}
    message = rf"`state` holds {what} at \['config'\]\['schedule'\].*Nothing was written"
    with pytest.raises(TypeError, match=message):
        rj.checkpoint.save(manager, 1, saved)
    assert list(tmp_path.iterdir()) == []
    assert manager.all_steps() == []


@pytest.mark.parametrize("storage", ["float32", "int8", "factored"])
def test_a_zero_size_leaf_is_named_and_nothing_is_written(storage, tmp_path):
    # Orbax raised "Cannot save arrays with zero size" midway and left
    # `1.orbax-checkpoint-tmp` behind; a zero-size parameter gives zero-size state too.
    manager = rj.checkpoint.open_manager(tmp_path)
    params = {"empty": jnp.zeros((0, 5)), "w": jnp.ones((3, 4))}
    opt_state = rj.rmsprop(0.1, moment_storage=storage).init(params)
    message = r"array of shape \(0, 5\) at \['opt_state'\].*no elements.*Nothing was written"
    with pytest.raises(ValueError, match=message):
        rj.checkpoint.save(manager, 1, {"opt_state": opt_state})
    with pytest.raises(ValueError, match=r"shape \(0, 5\) at \['params'\]\['empty'\]"):
        rj.checkpoint.save(manager, 1, {"params": params})
    assert list(tmp_path.iterdir()) == []
    assert manager.all_steps() == []


def test_saving_inside_jit_is_named_and_writes_nothing(tmp_path):
    manager = rj.checkpoint.open_manager(tmp_path)

    @jax.jit
    def step(w):
        rj.checkpoint.save(manager, 1, {"w": w})
        return w

    with pytest.raises(TypeError, match=r"holds a traced value \(save outside jax\.jit"):
        step(jnp.ones(2))
    assert list(tmp_path.iterdir()) == []
