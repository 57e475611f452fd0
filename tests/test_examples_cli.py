"""The examples' command lines: resume semantics, Ctrl-C, --help, flag errors, progress output."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import example

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Runs the script in argv[1] with Python's own Ctrl-C handler installed.
RUN_WITH_CTRL_C = (
    "import os, runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
# 1347 training examples in batches of 96: 14 steps an epoch.
TINY = ["--batch-size", "96", "--hidden-size", "16"]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.mark.slow  # trains the example
def test_resuming_with_nothing_left_to_do_says_so_and_changes_nothing(tmp_path, capsys):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    flags = [*TINY, "--checkpoint-dir", str(ckpt), "--out", str(out)]
    example("train_digits").main(["--epochs", "2", *flags])
    before = snapshot(tmp_path)
    capsys.readouterr()

    for epochs in ("1", "2"):
        assert example("train_digits").main(["--epochs", epochs, *flags, "--resume"]) == []

    err = capsys.readouterr().err
    assert "nothing to do: the checkpoint in" in err and "at step 28 (epoch 2)" in err
    assert "pass a larger --epochs" in err
    assert snapshot(tmp_path) == before  # neither the history, the figure nor a checkpoint


@pytest.mark.slow  # trains the example
def test_resuming_from_a_directory_without_checkpoints_says_it_starts_afresh(tmp_path, capsys):
    # --resume continues "from the latest checkpoint, if any"; a mistyped directory started a
    # fresh run without a word.
    ckpt = tmp_path / "typo"
    flags = [*TINY, "--checkpoint-dir", str(ckpt), "--out", str(tmp_path)]
    [run] = example("train_digits").main(["--epochs", "1", *flags, "--resume"])
    assert run["history"]["epoch"] == [1]
    err = capsys.readouterr().err
    assert f"note: {ckpt} holds no checkpoint yet, so training starts at step 0" in err
    example("train_digits").main(["--epochs", "2", *flags, "--resume"])
    err = capsys.readouterr().err
    assert "holds no checkpoint yet" not in err and "resumed from" in err


@pytest.mark.slow  # trains the example
def test_a_resumed_run_records_the_history_of_the_whole_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = [*TINY, "--checkpoint-dir", str(ckpt)]
    [first] = example("linen_trainstate").main(["--epochs", "1", *flags, "--out", str(tmp_path)])
    [resumed] = example("linen_trainstate").main(
        ["--epochs", "3", *flags, "--resume", "--out", str(tmp_path)]
    )

    history = resumed["history"]
    assert history["epoch"] == [1, 2, 3]
    assert history["train_loss"][0] == first["history"]["train_loss"][0]
    assert history["test_accuracy"][0] == first["history"]["test_accuracy"][0]
    saved = json.loads((tmp_path / "history_rmsprop.json").read_text())
    assert saved[0]["history"] == history
    # Only the steps orbax keeps have a recorded history.
    recorded = json.loads((ckpt / "history.json").read_text())
    kept = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert sorted(map(int, recorded)) == kept == [14, 28, 42]
    assert recorded["28"]["epoch"] == [1, 2]


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_saying_how_to_resume_and_leaves_no_partial_checkpoint(
    tmp_path,
):
    ckpt = tmp_path / "ckpt"
    # As in a terminal, Ctrl-C raises KeyboardInterrupt, even if this process was started by one
    # that ignores SIGINT (the child would inherit that).
    command = [sys.executable, "-c", RUN_WITH_CTRL_C, str(EXAMPLES / "train_digits.py")]
    command += ["--epochs", "200", *TINY]
    command += ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--out", "out"]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        # A checkpoint every step: the interrupt very likely lands during a save.
        while not (ckpt / "history.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at step "), stderr[-3000:]
    assert "--resume" in last and str(ckpt) in last
    saved_step = int(last.split("checkpoint at step ")[1].split()[0])
    entries = sorted(p.name for p in ckpt.iterdir())
    assert not [name for name in entries if "tmp" in name], entries
    assert str(saved_step) in entries
    assert saved_step == max(int(name) for name in entries if name.isdigit())


def test_ctrl_c_without_checkpoints_says_nothing_was_saved(tmp_path, capsys, monkeypatch):
    common = example("digits_common")

    def interrupted(*args, **kwargs):
        raise common.Interrupted(step=7, saved_step=None)

    monkeypatch.setattr(sys, "argv", ["train_digits.py", "--epochs", "3"])
    with pytest.raises(SystemExit) as stop:
        common.run_cli(interrupted)
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert err == (
        "interrupted at step 7; nothing was saved (with --checkpoint-dir, a run can be resumed)\n"
    )


def test_resume_command_repeats_the_flags_once_with_resume(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["examples/train_digits.py"])
    command = example("digits_common").resume_command(
        ["--checkpoint-dir", "my ckpt", "--resume", "--epochs", "5"]
    )
    assert command == (
        "python examples/train_digits.py --checkpoint-dir 'my ckpt' --epochs 5 --resume"
    )


@pytest.mark.slow  # one Python process per case
@pytest.mark.parametrize(
    ("script", "default"),
    [
        ("train_digits", "(default: 20)"),
        ("linen_trainstate", "(default: 20)"),
        ("sweep_digits", "(default: 40)"),
        ("ellipse", "(default: 500)"),
        ("sharded_training", "(default: 300)"),
    ],
)
def test_help_shows_the_defaults(script, default):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{script}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert default in result.stdout
    assert "(default: None)" not in result.stdout


@pytest.mark.slow  # one Python process per case
@pytest.mark.parametrize(
    ("script", "flags", "message"),
    [
        ("sharded_training", ["--storage", "int4"], "argument --storage: invalid choice: 'int4'"),
        ("sharded_training", ["--steps", "0"], "--steps: must be a whole number >= 1, got 0"),
        ("train_digits", ["--optimizer", "lion"], "argument --optimizer: invalid choice"),
        (
            "sweep_digits",
            ["--epochs-per-chunk", "0"],
            "--epochs-per-chunk: must be a whole number >= 1, got 0",
        ),
        ("ellipse", ["--steps", "0"], "--steps: must be a whole number >= 1, got 0"),
        (
            "train_digits",
            ["--batch-size", "-4"],
            "--batch-size: must be a whole number >= 1, got -4",
        ),
        # Each was a traceback: from NumPy's generator, or from the optimizer being built.
        ("train_digits", ["--seed", "-3"], "--seed: must be an integer in [0, 2**32), got -3"),
        ("linen_trainstate", ["--momentum", "1.5"], "--momentum: must lie in [0, 1), got 1.5"),
        ("sweep_digits", ["--seed", "-1"], "--seed: must be an integer in [0, 2**32), got -1"),
        ("sharded_training", ["--learning-rate", "-1"], "must be a finite number > 0, got -1"),
        ("ellipse", ["--learning-rate", "nan"], "must be a finite number > 0, got nan"),
        # A negative timeout stopped the processes after a second, a NaN one never.
        ("sharded_training", ["--timeout", "-5"], "--timeout: must be a finite number > 0, got -5"),
        ("sharded_training", ["--timeout", "nan"], "--timeout: must be a finite number > 0"),
    ],
)
def test_invalid_flags_are_usage_errors_not_tracebacks(script, flags, message, tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{script}.py"), *flags, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert not (tmp_path / "o").exists()


def test_progress_off_a_terminal_is_plain_periodic_lines():
    progress_report = example("progress_report")
    stream = io.StringIO()  # not a terminal
    bar = progress_report.Progress(range(4), total=4, desc="train", unit="epoch", file=stream)
    for i in bar:
        bar.set_postfix(loss=progress_report.format_loss(10.0**-i))
        if i == 1:
            bar.write("a line of its own")
    lines = stream.getvalue().splitlines()
    # The first line after `interval` seconds (10 by default: none here) and the last.
    assert lines == ["a line of its own", "train: epoch 4/4, loss 0.00100 (0 s)"]
    assert "\r" not in stream.getvalue()

    quiet = io.StringIO()
    bar = progress_report.Progress(range(3), total=3, desc="x", unit="step", file=quiet, interval=0)
    for _ in bar:
        bar.write("hidden")
    assert quiet.getvalue().splitlines() == ["hidden", "x: step 1/3 (0 s)"] * 1 + [
        "hidden",
        "x: step 2/3 (0 s)",
        "hidden",
        "x: step 3/3 (0 s)",
    ]  # with interval 0, a line after every step

    silent = io.StringIO()
    bar = progress_report.Progress(
        range(3), total=3, desc="x", unit="step", file=silent, enabled=False
    )
    for _ in bar:
        bar.write("not process 0")
    assert silent.getvalue() == ""


@pytest.mark.parametrize(
    ("value", "text"),
    [(2.302585, "2.30"), (0.01234, "0.0123"), (7.41e-4, "7.41e-04"), (3e-9, "3.00e-09"), (0, "0")],
)
def test_small_losses_are_not_printed_as_zero(value, text):
    assert example("progress_report").format_loss(value) == text
