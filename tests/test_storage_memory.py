"""`rj.state_bytes`: the memory an optimizer state takes, and what each storage format saves."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax as rj


def _transformer_shapes(layers: int = 2, d_model: int = 512, d_ff: int = 2048) -> dict:
    """Abstract parameters of a small transformer: most elements in matrices, a few vectors."""

    def dense(fan_in, fan_out):
        return {
            "kernel": jax.ShapeDtypeStruct((fan_in, fan_out), jnp.float32),
            "bias": jax.ShapeDtypeStruct((fan_out,), jnp.float32),
        }

    params: dict[str, Any] = {"embed": jax.ShapeDtypeStruct((4096, d_model), jnp.float32)}
    for i in range(layers):
        block = {name: dense(d_model, d_model) for name in ("q", "k", "v", "o")}
        block["mlp_in"], block["mlp_out"] = dense(d_model, d_ff), dense(d_ff, d_model)
        block["norm"] = jax.ShapeDtypeStruct((d_model,), jnp.float32)
        params[f"block{i}"] = block
    return params


def test_counts_every_array_of_the_state_against_the_parameter_elements():
    params = {"w": jnp.zeros((10, 20)), "b": jnp.zeros(20, jnp.bfloat16)}
    state = rj.rmsprop(0.1, centered=True, momentum=0.9).init(params)
    memory = rj.state_bytes(state, params)
    # mu, nu and the momentum buffer hold 220 float32 elements each, plus step counters.
    expected = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(state))
    assert memory.total_bytes == expected
    assert memory.total_bytes >= 3 * 220 * 4
    assert memory.bytes_per_parameter == pytest.approx(expected / 220)


def test_accepts_shapes_from_eval_shape():
    params = _transformer_shapes(layers=1)
    tx = rj.rmsprop(1e-3)
    abstract = rj.state_bytes(jax.eval_shape(tx.init, params), params)
    concrete_params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    concrete = rj.state_bytes(tx.init(concrete_params), concrete_params)
    assert abstract == concrete


def test_counts_prng_keys_and_ignores_python_numbers():
    params = {"w": jnp.zeros(8, jnp.float32)}  # float32 even with JAX_ENABLE_X64
    noisy = optax.chain(optax.add_noise(0.1, 0.5, 0), rj.scale_by_rms())
    memory = rj.state_bytes(noisy.init(params), params)
    # add_noise keeps a count and a threefry key (2 x uint32); scale_by_rms a count and nu.
    assert memory.total_bytes == 4 + 8 + 4 + 8 * 4
    assert rj.state_bytes({"a": 1.5, "b": jnp.zeros(2, jnp.float32)}, params).total_bytes == 8


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        # Each counted a shapeless leaf as one parameter: 32780 or 16390 "bytes per parameter".
        (lambda tx, p: (p, "int8"), r"`params` has a leaf of type str \('int8'\) at <root>"),
        (lambda tx, p: (p, tx), r"`params` is an optimizer"),
        (lambda tx, p: (tx, p), r"`state` is an optimizer"),
        (lambda tx, p: (tx.init(p), {"w": p["w"], "f": len}), r"type builtin_function_or_method"),
        # Swapped, the parameters' bytes were divided by the state's elements: no meaning.
        (lambda tx, p: (p, tx.init(p)), r"`params` holds an optimizer state \(EmptyState, Scale"),
        (lambda tx, p: (p, optax.adam(0.1).init(p)), r"state \(ScaleByAdamState, EmptyState\)"),
    ],
    ids=[
        "string",
        "optimizer as params",
        "optimizer as state",
        "function leaf",
        "swapped",
        "swapped adam",
    ],
)
def test_an_optimizer_or_a_shapeless_leaf_in_place_of_the_arguments_is_named(arguments, message):
    params = {"w": jnp.ones((64, 128)), "b": jnp.zeros(3)}
    tx = rj.rmsprop(1e-3, moment_storage="int8")
    with pytest.raises(
        TypeError, match=message + r".*rj\.state_bytes\(tx\.init\(params\), params\)"
    ):
        rj.state_bytes(*arguments(tx, params))
    # Numbers are parameters of one element, as arrays of shape ().
    number = rj.state_bytes(tx.init({"s": 2.0}), {"s": 2.0})
    assert number == rj.state_bytes(tx.init({"s": jnp.zeros(())}), {"s": jnp.zeros(())})
    assert number.bytes_per_parameter == number.total_bytes


def test_rejects_parameters_without_elements_and_non_array_leaves():
    with pytest.raises(ValueError, match="no elements"):
        rj.state_bytes({"nu": jnp.zeros(3)}, {})
    with pytest.raises(TypeError, match="str"):
        rj.state_bytes({"nu": "float32"}, {"w": jnp.zeros(3)})


def _optimizers_and_their_parameters():
    """(name, optimizer, the parameters it is made for) over the ways a state keeps moments."""
    real = {"w": jnp.ones((256, 300)), "b": jnp.zeros(4)}
    with_complex = {**real, "c": jnp.ones((3, 2), jnp.complex64)}
    cases = []
    variants: tuple[dict[str, Any], ...] = ({}, {"centered": True, "momentum": 0.9})
    for fmt in ("float32", "bfloat16", "int8", "factored"):
        for options in variants:
            tx = rj.rmsprop(1e-3, moment_storage=fmt, **options)
            cases += [(f"{fmt} {options}", tx, real)]
            cases += [(f"packed {fmt} {options}", rj.pack_small_leaves(tx), real)]
    partitioned = optax.multi_transform(
        {"rms": rj.rmsprop(1e-3, moment_storage="int8"), "frozen": optax.set_to_zero()},
        {"w": "rms", "b": "frozen"},
    )
    return [
        *cases,
        # The PyTorch presets keep a complex parameter's moments for its real view (..., 2).
        ("torch complex", rj.compat.torch_rmsprop(1e-3, centered=True), with_complex),
        ("masked", optax.masked(rj.rmsprop(1e-3), {"w": True, "b": False}), real),
        ("multi_transform", partitioned, real),
        ("inject_hyperparams", optax.inject_hyperparams(rj.rmsprop)(learning_rate=1e-3), real),
    ]


@pytest.mark.parametrize(
    ("tx", "params"),
    [case[1:] for case in _optimizers_and_their_parameters()],
    ids=[case[0] for case in _optimizers_and_their_parameters()],
)
def test_refuses_parameters_the_state_was_not_made_for(tx, params):
    state = tx.init(params)
    assert rj.state_bytes(state, params).total_bytes > 0
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert rj.state_bytes(jax.eval_shape(tx.init, abstract), abstract) == rj.state_bytes(
        state, params
    )
    transposed = {**params, "w": jnp.ones((300, 256))}
    with pytest.raises(ValueError, match=r"moment of shape \(256, 300\) at \['w'\]"):
        rj.state_bytes(state, transposed)
    with pytest.raises(ValueError, match="no leaf of `params` matches"):
        rj.state_bytes(state, {"v": jnp.ones(3)})


def test_the_parameters_a_state_refuses_are_listed_by_shape_with_a_count_of_the_rest():
    state = rj.rmsprop(1e-3).init({"w": jnp.ones((4, 5))})
    many = {f"p{i:02d}": jnp.ones(i + 1) for i in range(11)}
    with pytest.raises(ValueError, match=r"shapes \(1,\), \(2,\), .*, \(8,\) and 3 more\)"):
        rj.state_bytes(state, many)


def test_matches_flax_nnx_variables_against_a_pure_state():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(300, 256, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, rj.rmsprop(1e-3, moment_storage="int8"), wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    # Paths differ (a Variable's `.value`), the order of leaves does not.
    expected = rj.state_bytes(optimizer.opt_state, params)
    assert rj.state_bytes(nnx.as_pure(optimizer.opt_state), params) == expected
    assert expected.bytes_per_parameter == pytest.approx(1.026, abs=1e-3)


@pytest.mark.parametrize(
    ("moment_storage", "low", "high"),
    [
        ("float32", 4.0, 4.0001),
        ("bfloat16", 2.0, 2.0001),
        ("int8", 1.0, 1.05),
        ("factored", 0, 0.1),
    ],
)
def test_bytes_per_parameter_of_each_format_on_a_transformer(moment_storage, low, high):
    params = _transformer_shapes()
    state = jax.eval_shape(rj.rmsprop(1e-3, moment_storage=moment_storage).init, params)
    assert low <= rj.state_bytes(state, params).bytes_per_parameter <= high


def test_int8_block_scales_cost_four_bytes_per_block():
    params = {"w": jax.ShapeDtypeStruct((512, 768), jnp.float32)}
    state = jax.eval_shape(rj.scale_by_rms(moment_storage="int8").init, params)
    # 768 = 4 blocks of 192 per row: 512 * 768 codes, 512 * 4 float32 scales, the count, and
    # the one-byte placeholder of the unused dense part.
    assert rj.state_bytes(state, params).total_bytes == 512 * 768 + 512 * 4 * 4 + 4 + 1


def test_factored_keeps_rows_plus_columns_per_matrix():
    params = {"w": jax.ShapeDtypeStruct((3, 256, 1024), jnp.float32)}
    state = jax.eval_shape(rj.scale_by_rms(moment_storage="factored").init, params)
    # Rows and columns, the count, and the one-byte placeholder of the unused dense part.
    assert rj.state_bytes(state, params).total_bytes == 3 * (256 + 1024) * 4 + 4 + 1


def _int8_bytes_per_element(shape: tuple[int, ...]) -> float:
    """The bytes of a compressed int8 leaf of `shape` (codes and block scales) per element."""
    params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
    nu = jax.eval_shape(rj.rmsprop(1e-3, moment_storage="int8").init, params)[2].nu
    assert nu.codes["w"].shape == shape  # compressed, not dense
    stored = (nu.codes["w"], nu.scales["w"])
    return sum(np.dtype(x.dtype).itemsize * x.size for x in stored) / np.prod(shape)


@pytest.mark.parametrize(
    ("last_axis", "block"), [(1, 1), (2, 2), (16, 16), (255, 255), (256, 256), (768, 192)]
)
def test_int8_keeps_one_scale_per_block_and_a_block_never_spans_rows(last_axis, block):
    # docs/storage.md: a last axis of n < 256 elements costs 1 + 4/n bytes per element.
    shape = (-(-4096 // last_axis), last_axis)
    assert _int8_bytes_per_element(shape) == pytest.approx(1 + 4 / block)


@pytest.mark.parametrize("last_axis", [257, 258, 300, 1000, 4097])
def test_int8_takes_at_most_1_032_bytes_where_the_last_axis_has_256_elements_or_more(last_axis):
    assert _int8_bytes_per_element((16, last_axis)) <= 1.032
