"""examples/train_digits.py (Flax NNX) and examples/linen_trainstate.py (Linen TrainState).

Short runs of the real scripts: they must learn the digits, not merely run.
"""

from __future__ import annotations

import json

import pytest
from helpers import example

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.slow  # every test trains an example

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("script", ["train_digits", "linen_trainstate"])
def test_rmsprop_reaches_93_percent_test_accuracy_in_5_epochs(script, tmp_path):
    [result] = example(script).main(["--epochs", "5", "--out", str(tmp_path)])

    assert result["optimizer"] == "rmsprop"
    assert result["test_accuracy"] >= 0.93
    losses = result["history"]["train_loss"]
    assert result["final_train_loss"] == losses[-1] < losses[0] / 2 < 0.5
    assert result["history"]["epoch"] == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "history_rmsprop.json").read_text()) == [result]
    assert (tmp_path / "history_rmsprop.png").read_bytes().startswith(PNG_SIGNATURE)


def test_the_two_frameworks_train_the_same_architecture(tmp_path):
    common = example("digits_common")
    args = common.parse_args(common.build_parser("", "unused"), ["--hidden-size", "24"])
    nnx_tree = example("train_digits").NNXTrainer(args).checkpoint_tree()
    linen_tree = example("linen_trainstate").LinenTrainer(args).checkpoint_tree()

    def shapes(tree):
        return {layer: {k: v.shape for k, v in p.items()} for layer, p in tree["params"].items()}

    assert shapes(nnx_tree) == shapes(linen_tree)
    assert shapes(nnx_tree)["hidden"]["kernel"] == (1024, 24)


def test_compare_trains_every_optimizer_and_writes_figure_table_and_json(tmp_path, capsys):
    common = example("digits_common")
    results = example("train_digits").main(["--compare", "--epochs", "1", "--out", str(tmp_path)])
    assert f"wrote {tmp_path / 'compare'}.json, .md and .png" in capsys.readouterr().err

    assert [r["optimizer"] for r in results] == list(common.OPTIMIZERS)
    for result in results:
        assert result["learning_rate"] == common.DEFAULT_LEARNING_RATES[result["optimizer"]]
        assert result["test_accuracy"] >= 0.7, result  # chance is 0.10
        assert result["wall_time_s"] > 0
    assert json.loads((tmp_path / "compare.json").read_text()) == results
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert len(table) == 2 + len(results)
    for row, result in zip(table[2:], results, strict=True):
        assert row.startswith(f"| {result['optimizer']} |")
        assert f"{result['test_accuracy']:.2%}" in row
    figure = (tmp_path / "compare.png").read_bytes()
    assert figure.startswith(PNG_SIGNATURE)
    assert 10_000 < len(figure) < 300_000


@pytest.mark.parametrize(
    "flags",
    [
        ["--optimizer", "sgd", "--momentum", "0.9"],
        ["--optimizer", "adam", "--bias-correction"],
        ["--resume"],
        ["--checkpoint-every", "10"],
        ["--compare", "--learning-rate", "0.1"],
        ["--compare", "--checkpoint-dir", "ckpt"],
        ["--epochs", "0"],
        ["--batch-size", "5000"],
    ],
)
def test_inconsistent_flags_stop_before_training(flags, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        example("train_digits").main([*flags, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists()


def test_existing_checkpoints_are_not_overwritten_without_resume(tmp_path):
    argv = ["--epochs", "1", "--batch-size", "256", "--out", str(tmp_path)]
    argv += ["--checkpoint-dir", str(tmp_path / "ckpt")]
    example("linen_trainstate").main(argv)
    with pytest.raises(FileExistsError, match=r"already holds checkpoints \(steps \[5\]\)"):
        example("linen_trainstate").main(argv)
