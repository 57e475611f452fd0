"""`rj.checkpoint` saves still being written in the background are never lost.

Orbax writes a checkpoint in background threads and `save` returns before the files are
complete. Before, a `restore` right after a `save` read the step's temporary directory
(`FileNotFoundError`), and a script that ended right after its last save kept only that
temporary directory.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import rmsprop_jax as rj

pytest.importorskip("orbax.checkpoint")


def state(scale: float) -> dict:
    # Large enough (4 MB) that its files are still being written when `save` returns.
    params = {"w": jnp.full((512, 1024), scale), "b": jnp.zeros(7)}
    return {"params": params, "opt_state": rj.rmsprop(1e-2, centered=True).init(params)}


def test_a_restore_right_after_a_save_reads_the_saved_state(tmp_path):
    manager = rj.checkpoint.open_manager(tmp_path)
    for step in (1, 2):
        assert rj.checkpoint.save(manager, step, state(float(step)))
        restored = rj.checkpoint.restore(manager, state(0.0))  # no wait_until_finished
        np.testing.assert_array_equal(restored["params"]["w"], np.full((512, 1024), step))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["1", "2"]
    manager.close()


SAVE_AND_END = """
import jax.numpy as jnp
import rmsprop_jax as rj

params = {{"w": jnp.full((512, 1024), 3.0), "b": jnp.zeros(7)}}
state = {{"params": params, "opt_state": rj.rmsprop(1e-2, centered=True).init(params)}}
{save}
print("returned")
"""


@pytest.mark.parametrize(
    "save",
    [
        "rj.checkpoint.save(rj.checkpoint.open_manager({directory!r}), 5, state)",
        # A manager made with orbax itself, and closed by its own close().
        "import orbax.checkpoint as ocp\n"
        "manager = ocp.CheckpointManager(\n"
        "    {directory!r}, item_handlers=ocp.StandardCheckpointHandler()\n"
        ")\n"
        "rj.checkpoint.save(manager, 5, state)\n"
        "manager.close()",
    ],
    ids=["left_open", "closed_by_orbax"],
)
def test_a_script_that_ends_right_after_saving_keeps_the_checkpoint(save, tmp_path):
    directory = tmp_path / "run"
    script = SAVE_AND_END.format(save=save.format(directory=str(directory)))
    finished = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "returned"
    assert "Traceback" not in finished.stderr, finished.stderr
    assert [path.name for path in directory.iterdir()] == ["5"]  # no temporary directory
    with rj.checkpoint.open_manager(directory) as manager:
        restored = rj.checkpoint.restore(manager, state(0.0))
    np.testing.assert_array_equal(restored["params"]["w"], np.full((512, 1024), 3.0))
