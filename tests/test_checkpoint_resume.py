"""rmsprop_jax.checkpoint and the examples' --resume: exact, typed, and refused when mismatched.

The library half saves and restores optimizer states of every variant in this process. The
example half interrupts a training run at a checkpoint, resumes it in a fresh process, and
requires the result to equal the uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import needs_simulated_devices
from helpers import example

import rmsprop_jax as rj

ocp = pytest.importorskip("orbax.checkpoint")
pytest.importorskip("flax")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "centered_momentum": {"centered": True, "momentum": 0.9},
    "momentum_bias_correction": {"momentum": 0.9, "bias_correction": True},
    "nesterov": {"momentum": 0.5, "nesterov": True},
    "decoupled_weight_decay": {"weight_decay": 0.01, "decoupled_weight_decay": True},
    "coupled_weight_decay_maximize": {"weight_decay": 0.01, "maximize": True},
    "bfloat16_nu": {"moment_storage": "bfloat16"},
}


def make_params():
    keys = jax.random.split(jax.random.key(0), 2)
    return {
        "dense": {
            "kernel": jax.random.normal(keys[0], (5, 3), jnp.float32),
            "bias": jax.random.normal(keys[1], (3,), jnp.bfloat16),
        }
    }


def loss_grads(params, step):
    # Deterministic, step-dependent gradients, so every moment of the state moves.
    return jax.tree.map(
        lambda p: jnp.sin(p.astype(jnp.float32) * (step + 1)).astype(p.dtype), params
    )


def run(tx, params, state, first, last):
    for step in range(first, last):
        updates, state = tx.update(loss_grads(params, step), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def saved_tree(tx, steps):
    params = make_params()
    params, state = run(tx, params, tx.init(params), 0, steps)
    return {"params": params, "opt_state": state}


def fresh_target(tx):
    """Abstract, from a freshly initialized optimizer: only shapes, dtypes and node types."""
    return jax.eval_shape(lambda: {"params": make_params(), "opt_state": tx.init(make_params())})


def assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.dtype(x.dtype) == np.dtype(y.dtype)
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("variant", VARIANTS)
def test_restored_state_has_the_saved_namedtuple_types_dtypes_and_values(variant, tmp_path):
    tx = rj.rmsprop(1e-2, **VARIANTS[variant])
    saved = saved_tree(tx, steps=3)
    manager = rj.checkpoint.open_manager(tmp_path)
    rj.checkpoint.save(manager, 3, saved)
    manager.wait_until_finished()

    restored = rj.checkpoint.restore(rj.checkpoint.open_manager(tmp_path), fresh_target(tx))

    assert [type(s) for s in restored["opt_state"]] == [type(s) for s in saved["opt_state"]]
    rms_state = restored["opt_state"][2]
    centered = VARIANTS[variant].get("centered", False)
    assert type(rms_state) is (rj.ScaleByCenteredRmsState if centered else rj.ScaleByRmsState)
    momentum_state = restored["opt_state"][4]
    has_momentum = "momentum" in VARIANTS[variant]
    assert type(momentum_state) is (optax.TraceState if has_momentum else optax.EmptyState)
    assert restored["params"]["dense"]["bias"].dtype == jnp.bfloat16
    assert rms_state.count.dtype == jnp.int32
    assert_identical(restored, saved)


@pytest.mark.parametrize("variant", ["centered_momentum", "momentum_bias_correction"])
def test_training_from_a_restored_state_equals_training_straight_through(variant, tmp_path):
    tx = rj.rmsprop(1e-2, **VARIANTS[variant])
    straight = saved_tree(tx, steps=6)
    half = saved_tree(tx, steps=3)
    manager = rj.checkpoint.open_manager(tmp_path)
    rj.checkpoint.save(manager, 3, half)
    manager.wait_until_finished()

    restored = rj.checkpoint.restore(manager, fresh_target(tx), step=3)
    params, state = run(tx, restored["params"], restored["opt_state"], 3, 6)

    assert_identical({"params": params, "opt_state": state}, straight)


def saved_manager(tmp_path, tx, params=None):
    params = make_params() if params is None else params
    manager = rj.checkpoint.open_manager(tmp_path)
    rj.checkpoint.save(manager, 7, {"params": params, "opt_state": tx.init(params)})
    manager.wait_until_finished()
    return rj.checkpoint.open_manager(tmp_path)


def test_restoring_into_other_parameter_shapes_names_the_leaf_and_both_shapes(tmp_path):
    tx = rj.rmsprop(1e-2)
    manager = saved_manager(tmp_path, tx)
    wider = jax.tree.map(lambda p: jnp.zeros((*p.shape[:-1], 4), p.dtype), make_params())
    target = {"params": wider, "opt_state": tx.init(wider)}

    with pytest.raises(
        ValueError,
        match=r"parameter 'params\.dense\.kernel' with shape \(5, 3\), "
        r"the target expects \(5, 4\)",
    ) as error:
        rj.checkpoint.restore(manager, target)

    assert isinstance(error.value, rj.checkpoint.CheckpointMismatchError)
    assert "optimizer state leaf 'opt_state.2.nu.dense" in str(error.value)
    assert "the model differs" in str(error.value)


@pytest.mark.parametrize(
    ("saved_kwargs", "target_kwargs", "leaf"),
    [
        ({"centered": True}, {}, "opt_state.2.mu.dense.bias"),
        ({}, {"centered": True}, "opt_state.2.mu.dense.bias"),
        ({"momentum": 0.9}, {}, "opt_state.4.trace.dense.bias"),
        ({}, {"momentum": 0.9}, "opt_state.4.trace.dense.bias"),
    ],
)
def test_restoring_into_another_optimizer_configuration_names_the_extra_or_missing_state(
    saved_kwargs, target_kwargs, leaf, tmp_path
):
    manager = saved_manager(tmp_path, rj.rmsprop(1e-2, **saved_kwargs))
    target_tx = rj.rmsprop(1e-2, **target_kwargs)

    with pytest.raises(rj.checkpoint.CheckpointMismatchError) as error:
        rj.checkpoint.restore(manager, fresh_target(target_tx))

    side = "has leaves the target lacks" if saved_kwargs else "lacks leaves the target has"
    assert f"{side}: '{leaf}'" in str(error.value)
    assert "the optimizer configuration differs" in str(error.value)


def test_restoring_a_bfloat16_moment_into_a_float32_one_names_both_dtypes(tmp_path):
    manager = saved_manager(tmp_path, rj.rmsprop(1e-2, moment_storage="bfloat16"))

    with pytest.raises(
        ValueError,
        match=r"'opt_state\.2\.nu\.dense\.kernel' with dtype bfloat16, the target "
        r"expects float32",
    ):
        rj.checkpoint.restore(manager, fresh_target(rj.rmsprop(1e-2)))


STORAGES = ("float32", "bfloat16", "int8", "factored")


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("saved", STORAGES)
def test_a_checkpoint_of_another_moment_storage_names_the_option_that_restores_it(
    tmp_path, saved, centered
):
    # The message listed the leaves and guessed "the optimizer configuration differs
    # (centered or not, ...)" (or, float32 against bfloat16, gave no cause) without naming
    # `moment_storage`, the option that differs.
    manager = saved_manager(tmp_path, rj.rmsprop(1e-2, moment_storage=saved, centered=centered))
    for target in STORAGES:
        tx = rj.rmsprop(1e-2, moment_storage=target, centered=centered)
        if target == saved:
            rj.checkpoint.restore(manager, fresh_target(tx))
            continue
        with pytest.raises(rj.checkpoint.CheckpointMismatchError) as error:
            rj.checkpoint.restore(manager, fresh_target(tx))
        message = str(error.value)
        assert (
            f"keeps the squared-gradient average as moment_storage='{saved}', the target as "
            f"'{target}': build the target's optimizer with moment_storage='{saved}'."
        ) in message
        assert "Probably" not in message


@pytest.mark.parametrize(
    ("storage", "saved", "target", "option"),
    [
        ("int8", None, "float32", None),
        ("int8", "float32", None, "float32"),
        ("bfloat16", None, "float32", None),
        ("bfloat16", "float32", None, "float32"),
    ],
)
def test_a_checkpoint_of_another_first_moment_storage_names_the_option(
    tmp_path, storage, saved, target, option
):
    # The message listed `mu`'s leaves with both dtypes and gave no cause.
    options: dict[str, Any] = {"moment_storage": storage, "centered": True, "momentum": 0.9}
    manager = saved_manager(tmp_path, rj.rmsprop(1e-2, first_moment_storage=saved, **options))
    with pytest.raises(rj.checkpoint.CheckpointMismatchError) as error:
        rj.checkpoint.restore(
            manager, fresh_target(rj.rmsprop(1e-2, first_moment_storage=target, **options))
        )
    words = {None: "None", "float32": "'float32'"}[option]
    assert (
        f"keeps the centered mean gradient `mu` in {saved or 'bfloat16'}, the target in "
        f"{target or 'bfloat16'}: build the target's optimizer with first_moment_storage={words}."
    ) in str(error.value)
    # A layer called "mu" or "nu" in the model changes nothing.
    params = {"mu": make_params()["dense"], "nu": {"w": jnp.ones((4, 2), jnp.bfloat16)}}
    named = saved_manager(
        tmp_path / "named", rj.rmsprop(1e-2, first_moment_storage=saved, **options), params
    )
    target_tx = rj.rmsprop(1e-2, first_moment_storage=target, **options)
    with pytest.raises(rj.checkpoint.CheckpointMismatchError, match=re.escape(words + ".")):
        rj.checkpoint.restore(
            named, jax.eval_shape(lambda: {"params": params, "opt_state": target_tx.init(params)})
        )
    # The option named restores it.
    rj.checkpoint.restore(
        manager, fresh_target(rj.rmsprop(1e-2, first_moment_storage=option, **options))
    )


def test_the_storage_hint_is_not_given_for_other_optimizers_or_other_variants(tmp_path):
    # Same storage, other variant: the general cause, no storage sentence.
    manager = saved_manager(tmp_path / "int8", rj.rmsprop(1e-2, moment_storage="int8"))
    target = fresh_target(rj.rmsprop(1e-2, moment_storage="int8", momentum=0.9))
    with pytest.raises(rj.checkpoint.CheckpointMismatchError) as error:
        rj.checkpoint.restore(manager, target)
    assert "the optimizer configuration differs" in str(error.value)
    assert "moment_storage" not in str(error.value)
    # Other storage and not centered: both causes.
    target = fresh_target(rj.rmsprop(1e-2, moment_storage="float32", centered=True))
    with pytest.raises(rj.checkpoint.CheckpointMismatchError) as error:
        rj.checkpoint.restore(manager, target)
    assert "(centered or not," in str(error.value)
    assert "as moment_storage='int8', the target as 'float32'" in str(error.value)
    # optax.adam's state has an `nu` of float32 too, in another place: no storage sentence.
    manager = saved_manager(tmp_path / "adam", optax.adam(1e-2))
    with pytest.raises(rj.checkpoint.CheckpointMismatchError) as error:
        rj.checkpoint.restore(manager, fresh_target(rj.rmsprop(1e-2, moment_storage="int8")))
    assert "the optimizer configuration differs" in str(error.value)


def test_bias_correction_does_not_change_the_state_so_either_setting_restores(tmp_path):
    manager = saved_manager(tmp_path, rj.rmsprop(1e-2, bias_correction=True))
    restored = rj.checkpoint.restore(manager, fresh_target(rj.rmsprop(1e-2)))
    assert type(restored["opt_state"][2]) is rj.ScaleByRmsState


def test_numbers_saved_with_the_state_restore_as_numbers_of_their_type(tmp_path):
    # A training loop's counters, saved beside the state: orbax writes Python and NumPy numbers,
    # and they come back as the same kind of number (an int target for a saved float is refused).
    tx, params = rj.rmsprop(1e-2), make_params()
    saved = {"opt_state": tx.init(params), "epoch": 7, "lr": 0.1, "done": True}
    saved |= {"loss": np.float32(2.5), "seen": np.int64(1 << 40)}
    manager = rj.checkpoint.open_manager(tmp_path)
    rj.checkpoint.save(manager, np.int64(1), saved)
    manager.wait_until_finished()
    assert [type(step) for step in manager.all_steps()] == [int]
    target = {"opt_state": fresh_target(tx)["opt_state"], "epoch": 0, "lr": 0.0, "done": False}
    target |= {"loss": np.float32(0), "seen": np.int64(0)}

    restored = rj.checkpoint.restore(manager, target)

    for name in ("epoch", "lr", "done", "loss", "seen"):
        assert type(restored[name]) is type(saved[name]) and restored[name] == saved[name]
    assert_identical(restored["opt_state"], saved["opt_state"])
    with pytest.raises(
        rj.checkpoint.CheckpointMismatchError, match="'lr' with dtype float64, the target expects"
    ):
        rj.checkpoint.restore(manager, {**target, "lr": 0})


def test_prng_keys_saved_with_the_state_restore_as_keys(tmp_path):
    # Orbax writes a typed key's raw data and could not restore it into a key target: a
    # CheckpointMismatchError (shape (2,) where the target expects ()) for what was saved.
    tx, params = rj.rmsprop(1e-2), make_params()
    keys = {"dropout": jax.random.key(3), "per_layer": jax.random.split(jax.random.key(4), 3)}
    keys |= {"rbg": jax.random.key(5, impl="rbg"), "raw": jax.random.PRNGKey(6)}
    saved = {"params": params, "opt_state": tx.init(params), "keys": keys}
    manager = rj.checkpoint.open_manager(tmp_path)
    rj.checkpoint.save(manager, 1, saved)
    manager.wait_until_finished()
    fresh_keys = {"dropout": jax.random.key(0), "per_layer": jax.random.split(jax.random.key(0), 3)}
    fresh_keys |= {"rbg": jax.random.key(0, impl="rbg"), "raw": jax.random.PRNGKey(0)}
    shapes = jax.tree.map(lambda key: jax.ShapeDtypeStruct(key.shape, key.dtype), keys)
    targets = {"arrays": fresh_keys, "shapes": shapes}
    for kind, target_keys in targets.items():
        restored = rj.checkpoint.restore(manager, {**fresh_target(tx), "keys": target_keys})
        for name, key in keys.items():
            back = restored["keys"][name]
            assert back.dtype == key.dtype and back.shape == key.shape, (kind, name)
            data = jax.random.key_data if name != "raw" else np.asarray
            np.testing.assert_array_equal(data(back), data(key))
        # The same random numbers as from the saved keys.
        np.testing.assert_array_equal(
            jax.random.uniform(restored["keys"]["per_layer"][2], (4,)),
            jax.random.uniform(keys["per_layer"][2], (4,)),
        )
        assert_identical(restored["opt_state"], saved["opt_state"])
    with pytest.raises(rj.checkpoint.CheckpointMismatchError, match=r"'keys\.dropout' with shape"):
        rj.checkpoint.restore(
            manager, {**fresh_target(tx), "keys": {**fresh_keys, "dropout": keys["per_layer"]}}
        )


@needs_simulated_devices
def test_keys_sharded_over_devices_restore_sharded_as_the_target(tmp_path):
    # The raw data's shape was taken with jax.eval_shape, whose abstract sharding orbax
    # cannot place ("_device_assignment is not implemented for AbstractMesh").
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(jax.make_mesh((2,), ("d",)), PartitionSpec("d"))
    keys = jax.device_put(jax.random.split(jax.random.key(1), 4), sharding)
    manager = rj.checkpoint.open_manager(tmp_path)
    rj.checkpoint.save(manager, 1, {"keys": keys})
    manager.wait_until_finished()
    shapes = {"keys": jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=sharding)}
    for target in ({"keys": keys}, shapes):
        restored = rj.checkpoint.restore(manager, target)["keys"]
        assert restored.dtype == keys.dtype and restored.sharding.is_equivalent_to(sharding, 1)
        np.testing.assert_array_equal(jax.random.key_data(restored), jax.random.key_data(keys))


def test_keys_and_their_raw_data_restore_into_each_other_as_the_target_says(tmp_path):
    # A key saved restores into a raw uint32 target as its data (orbax hands back a key), and
    # raw key data (jax.random.PRNGKey) into a typed key target as a key.
    manager = rj.checkpoint.open_manager(tmp_path)
    rj.checkpoint.save(manager, 1, {"typed": jax.random.key(9), "raw": jax.random.PRNGKey(8)})
    manager.wait_until_finished()
    target = {"typed": jax.random.PRNGKey(0), "raw": jax.random.key(0)}
    restored = rj.checkpoint.restore(manager, target)
    assert restored["typed"].dtype == jnp.uint32 and restored["raw"].dtype == target["raw"].dtype
    np.testing.assert_array_equal(restored["typed"], jax.random.key_data(jax.random.key(9)))
    np.testing.assert_array_equal(jax.random.key_data(restored["raw"]), jax.random.PRNGKey(8))


def test_restore_without_checkpoints_or_without_metadata_says_what_is_wrong(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint to restore"):
        rj.checkpoint.restore(
            rj.checkpoint.open_manager(tmp_path / "empty"), fresh_target(rj.rmsprop(1e-2))
        )
    saved_manager(tmp_path / "saved", rj.rmsprop(1e-2))
    plain = ocp.CheckpointManager((tmp_path / "saved").absolute())
    with pytest.raises(ValueError, match="cannot read the metadata of checkpoint step 7"):
        rj.checkpoint.restore(plain, fresh_target(rj.rmsprop(1e-2)))


# The examples: an interrupted run resumed in a fresh process equals the uninterrupted one.

RESUME_CASES = {
    "nnx_centered_momentum": (
        "train_digits",
        ["--optimizer", "rmsprop-centered", "--momentum", "0.9"],
    ),
    "linen_momentum_bias_correction": (
        "linen_trainstate",
        ["--optimizer", "rmsprop-momentum", "--bias-correction"],
    ),
}
# 1347 training examples in batches of 96 make 14 steps an epoch: 42 steps in 3 epochs,
# checkpoints at steps 21 (the middle of the second epoch) and 42.
SHORT_RUN = [
    "--epochs",
    "3",
    "--batch-size",
    "96",
    "--hidden-size",
    "16",
    "--checkpoint-every",
    "21",
]


def run_example_process(name, argv, cwd):
    return subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def restore_final(module, argv, directory):
    """The step-42 checkpoint, restored against a freshly built trainer like --resume does."""
    common = example("digits_common")
    flags = [*argv, "--checkpoint-dir", str(directory)]
    args = common.parse_args(common.build_parser("", "unused"), flags)
    trainer = {"train_digits": "NNXTrainer", "linen_trainstate": "LinenTrainer"}[module]
    target = common.checkpoint_tree(getattr(example(module), trainer)(args), args)
    return rj.checkpoint.restore(rj.checkpoint.open_manager(directory), target, step=42)


@pytest.mark.slow  # trains an example
@pytest.mark.parametrize("case", RESUME_CASES)
def test_resuming_in_a_fresh_process_equals_the_uninterrupted_run_bit_for_bit(case, tmp_path):
    module, variant = RESUME_CASES[case]
    argv = SHORT_RUN + variant
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    example(module).main([*argv, "--checkpoint-dir", str(straight), "--out", str(tmp_path)])
    resumed.mkdir()
    shutil.copytree(straight / "21", resumed / "21")
    shutil.copy(straight / "history.json", resumed / "history.json")

    process = run_example_process(
        module, [*argv, "--checkpoint-dir", str(resumed), "--resume", "--out", "out"], tmp_path
    )

    assert process.returncode == 0, process.stderr[-3000:]
    assert f"resumed from {resumed} at step 21" in process.stderr
    # The history covers the whole run: epoch 1 from before the checkpoint, then 2 and 3.
    history = json.loads((tmp_path / "out" / f"history_{variant[1]}.json").read_text())
    straight_history = json.loads((tmp_path / f"history_{variant[1]}.json").read_text())
    assert history[0]["history"] == straight_history[0]["history"]
    assert history[0]["history"]["epoch"] == [1, 2, 3]
    expected = restore_final(module, argv, straight)
    actual = restore_final(module, argv, resumed)
    opt_state = actual["opt_state"]
    assert type(opt_state[2]) is (
        rj.ScaleByCenteredRmsState if "rmsprop-centered" in variant else rj.ScaleByRmsState
    )
    assert type(opt_state[4]) is optax.TraceState
    assert type(opt_state[0]) is optax.EmptyState
    assert int(opt_state[2].count) == int(actual["step"]) == 42
    assert_identical(actual, expected)


@pytest.mark.slow  # trains an example
def test_resuming_with_another_hidden_size_fails_before_training(tmp_path):
    directory = tmp_path / "ckpt"
    argv = ["--epochs", "1", "--batch-size", "96", "--hidden-size", "16", "--out", str(tmp_path)]
    example("linen_trainstate").main([*argv, "--checkpoint-dir", str(directory)])
    (tmp_path / "history_rmsprop.json").unlink()

    with pytest.raises(
        ValueError,
        match=r"parameter 'params\.hidden\.kernel' with shape \(1024, 16\), the "
        r"target expects \(1024, 8\)",
    ):
        example("linen_trainstate").main(
            [*argv, "--hidden-size", "8", "--checkpoint-dir", str(directory), "--resume"]
        )

    assert sorted(p.name for p in directory.iterdir()) == ["14", "history.json"]
    assert not (tmp_path / "history_rmsprop.json").exists()


@pytest.mark.slow  # trains an example
def test_resuming_with_another_batch_size_or_seed_fails_before_training(tmp_path):
    directory = tmp_path / "ckpt"
    argv = ["--epochs", "1", "--batch-size", "96", "--hidden-size", "16", "--out", str(tmp_path)]
    example("train_digits").main([*argv, "--checkpoint-dir", str(directory)])
    (tmp_path / "history_rmsprop.json").unlink()

    resume = [*argv, "--batch-size", "128", "--seed", "3", "--checkpoint-dir", str(directory)]

    with pytest.raises(
        ValueError,
        match=r"checkpoint at step 14 was written with --seed 0 \(this run: 3\), "
        r"--batch-size 96 \(this run: 128\)",
    ):
        example("train_digits").main([*resume, "--resume"])

    assert sorted(p.name for p in directory.iterdir()) == ["14", "history.json"]
    assert not (tmp_path / "history_rmsprop.json").exists()


@pytest.mark.slow  # trains an example
def test_resuming_a_plain_checkpoint_as_centered_exits_with_the_error_and_trains_nothing(
    tmp_path,
):
    directory = tmp_path / "ckpt"
    argv = ["--epochs", "1", "--batch-size", "96", "--hidden-size", "16"]
    example("train_digits").main(
        [*argv, "--checkpoint-dir", str(directory), "--out", str(tmp_path / "first")]
    )

    process = run_example_process(
        "train_digits",
        [
            *argv,
            *("--optimizer", "rmsprop-centered", "--resume", "--out", "out"),
            *("--checkpoint-dir", str(directory)),
        ],
        tmp_path,
    )

    assert process.returncode == 1
    last_line = process.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: checkpoint at step 14 does not match")
    assert "lacks leaves the target has: 'opt_state.2.mu.conv1.bias'" in last_line
    assert "Traceback" not in process.stderr
    assert sorted(p.name for p in directory.iterdir()) == ["14", "history.json"]
    assert not (tmp_path / "out" / "history_rmsprop-centered.json").exists()


def test_a_checkpoint_with_8_bit_mu_names_first_moment_storage_and_restores_with_it(tmp_path):
    """Centered int8 states kept `mu` as 8-bit codes in release 0.1.0; the default is now
    bfloat16. Such a checkpoint is refused by a default target, with the option that restores
    it, and restores bit for bit into a target built with that option."""
    params = {"w": jax.random.normal(jax.random.key(1), (64, 128))}
    options: dict[str, Any] = {"centered": True, "momentum": 0.9, "moment_storage": "int8"}
    eight_bit = rj.rmsprop(1e-2, first_moment_storage="int8", **options)
    params, state = run(eight_bit, params, eight_bit.init(params), 0, 3)
    manager = rj.checkpoint.open_manager(tmp_path)
    rj.checkpoint.save(manager, 3, {"params": params, "opt_state": state})
    manager.wait_until_finished()

    default = rj.rmsprop(1e-2, **options)
    target = {"params": params, "opt_state": default.init(params)}
    with pytest.raises(
        rj.checkpoint.CheckpointMismatchError,
        match=r"keeps the centered mean gradient `mu` as 8-bit codes .* "
        r"first_moment_storage='int8'",
    ):
        rj.checkpoint.restore(manager, target)
    target = {"params": params, "opt_state": eight_bit.init(params)}
    restored = rj.checkpoint.restore(manager, target)
    assert_identical(restored, {"params": params, "opt_state": state})

    # And the other way round: a target with 8-bit mu, a checkpoint without.
    rj.checkpoint.save(manager, 4, {"params": params, "opt_state": default.init(params)})
    manager.wait_until_finished()
    with pytest.raises(
        rj.checkpoint.CheckpointMismatchError,
        match=r"The target keeps the centered mean gradient `mu` as 8-bit codes",
    ):
        rj.checkpoint.restore(manager, target, step=4)
