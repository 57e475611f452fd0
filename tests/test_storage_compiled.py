"""The compiled step of every storage format: small temporaries, state updated in place.

A compressed format exists to lower memory; its update step must not give the saving back in
temporary buffers. Judged on what XLA compiles (`memory_analysis` of a jitted "update + apply"
step with parameters and state donated), which does not move from run to run as timings do:
the temporaries stay under a quarter of a byte per parameter on a transformer-shaped tree, so
every compressed format's peak (arguments + temporaries) is below the float32 step's, and no
donated buffer is copied to a fresh output.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import compile_step, distinct_fusions, needs_jax_0_10_compiler

import rmsprop_jax as rj
from rmsprop_jax import _jax_compat, _runtime_integers

pytestmark = needs_jax_0_10_compiler

# Leaves as in a transformer block (embedding, attention, MLP, norms and biases): 4.5M
# parameters, large enough that a leaf is updated in several row chunks.
SHAPES = {
    "embed": (4096, 512),
    "attention": (512, 512),
    "mlp_in": (512, 2048),
    "mlp_out": (2048, 512),
    "mlp_bias": (2048,),
    "norm": (512,),
}
PARAMS = {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in SHAPES.items()}
PARAMETERS = sum(int(np.prod(shape)) for shape in SHAPES.values())
TEMPORARY_BYTES_PER_PARAMETER = 0.25
POINTER_BYTES = 8  # a tuple-valued program's outputs include a table of one pointer each

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "centered-momentum": {"centered": True, "momentum": 0.9},
}
# Centered with momentum, `mu` kept as 8-bit codes whatever the format of the variance.
INT8_MU: dict[str, Any] = {"centered": True, "momentum": 0.9, "first_moment_storage": "int8"}
INT8_VARIANTS: dict[str, dict[str, Any]] = {**VARIANTS, "centered-momentum-int8-mu": INT8_MU}
FORMATS = ["float32", "bfloat16", "int8", "factored"]


def _memory(moment_storage: str, options: dict[str, Any]) -> tuple[Any, int]:
    return _compiled_memory(rj.rmsprop(1e-3, moment_storage=moment_storage, **options))


def _compiled_memory(tx: optax.GradientTransformation) -> tuple[Any, int]:
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.eval_shape(tx.init, PARAMS)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(PARAMS, state, PARAMS).compile()
    return compiled.memory_analysis(), compiled.out_tree.num_leaves


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("moment_storage", FORMATS)
def test_step_temporaries_stay_under_a_quarter_byte_per_parameter(moment_storage, variant):
    memory, outputs = _memory(moment_storage, VARIANTS[variant])
    temporaries = memory.temp_size_in_bytes / PARAMETERS
    assert temporaries <= TEMPORARY_BYTES_PER_PARAMETER, temporaries
    # Every donated parameter and state buffer is written in place.
    unaliased = memory.output_size_in_bytes - memory.alias_size_in_bytes
    assert unaliased <= POINTER_BYTES * outputs, unaliased


@pytest.mark.parametrize(
    ("moment_storage", "first_moment_storage"),
    [
        (moment_storage, first_moment_storage)
        for moment_storage in FORMATS
        for first_moment_storage in ("float32", "bfloat16", "int8")
        if first_moment_storage in rj.storage.get(moment_storage).first_moment_names
        # The default is `test_step_temporaries_stay_under_a_quarter_byte_per_parameter`'s.
        and first_moment_storage
        != rj.storage.first_moment_format(rj.storage.get(moment_storage)).name
    ],
)
def test_every_first_moment_storage_stays_under_a_quarter_byte_per_parameter(
    moment_storage, first_moment_storage
):
    options = {**INT8_MU, "first_moment_storage": first_moment_storage}
    memory, outputs = _memory(moment_storage, options)
    assert memory.temp_size_in_bytes / PARAMETERS <= TEMPORARY_BYTES_PER_PARAMETER
    assert memory.output_size_in_bytes - memory.alias_size_in_bytes <= POINTER_BYTES * outputs


@pytest.mark.parametrize(
    ("moment_storage", "variant"),
    [
        (moment_storage, variant)
        for moment_storage in ("bfloat16", "int8", "factored")
        for variant in INT8_VARIANTS
        if (moment_storage, variant) != ("factored", "centered-momentum-int8-mu")
    ],
)
def test_compressed_step_peak_is_below_the_float32_step_peak(moment_storage, variant):
    """Peak = arguments (parameters, state, gradients) + temporaries, per parameter."""

    def peak(memory):
        return (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / PARAMETERS

    options = INT8_VARIANTS[variant]
    # float32 keeps `mu` in float32 whatever `first_moment_storage` the others take.
    as_float32 = {k: v for k, v in options.items() if k != "first_moment_storage"}
    reference = peak(_memory("float32", as_float32)[0])
    compressed = peak(_memory(moment_storage, options)[0])
    # Bytes per parameter at least saved: per stored average, 2 (bfloat16), 2.9 (int8: codes
    # and scales, less a little temporary memory) or 3.8 (factored, where the chunks' flags
    # of non-finite spreads take 1/8 byte); centered, `mu` saves 2 as bfloat16 (int8's and
    # factored's default) or 2.9 as 8-bit codes.
    saved = {
        "bfloat16": {"plain": 2.0, "centered-momentum": 4.0, "centered-momentum-int8-mu": 4.9},
        "int8": {"plain": 2.9, "centered-momentum": 4.9, "centered-momentum-int8-mu": 5.8},
        "factored": {"plain": 3.8, "centered-momentum": 5.6},
    }[moment_storage][variant]
    # Besides: scalars (each leaf's rounding seeds, the rows of the table they are read from).
    scalars = 1024 / PARAMETERS
    assert compressed <= reference - saved + scalars, (
        compressed,
        reference,
    )


# Every other option that changes the compiled step. None holds temporaries in float32 (see
# `test_no_variant_holds_temporaries_in_float32`): with Nesterov momentum and L2 (coupled)
# weight decay, where a second kernel reads the step, it is computed again there rather than
# written to memory (see rmsprop_jax._recomputed_steps). A gradient negated or decayed before
# the preconditioner is computed by it, in each of its readers, where it is read behind an
# optimization barrier (the factored statistics, a compressed centered state's `mu`).
OTHER_VARIANTS: dict[str, dict[str, Any]] = {
    "centered": {"centered": True},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "bias_correction": {"bias_correction": True},
    "eps_in_sqrt": {"eps_in_sqrt": True},
    "coupled_weight_decay": {"weight_decay": 0.01},
    "coupled_weight_decay_masked": {
        "weight_decay": 0.01,
        "weight_decay_mask": lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
    },
    "coupled_weight_decay_centered": {"weight_decay": 0.01, "centered": True},
    "coupled_weight_decay_masked_centered_maximize": {
        "weight_decay": 0.01,
        "weight_decay_mask": {name: name != "embed" for name in SHAPES},
        "centered": True,
        "maximize": True,
    },
    "decoupled_weight_decay": {"weight_decay": 0.01, "decoupled_weight_decay": True},
    "maximize": {"maximize": True},
    "maximize_momentum": {"maximize": True, "momentum": 0.9},
    "maximize_centered": {"maximize": True, "centered": True},
}


@functools.cache
def _temporaries_and_peak(moment_storage: str, variant: str) -> tuple[float, float]:
    memory, _ = _memory(moment_storage, OTHER_VARIANTS[variant])
    temporaries = memory.temp_size_in_bytes / PARAMETERS
    return temporaries, memory.argument_size_in_bytes / PARAMETERS + temporaries


@pytest.mark.parametrize("variant", OTHER_VARIANTS)
@pytest.mark.parametrize("moment_storage", ["bfloat16", "int8", "factored"])
def test_compressed_step_adds_under_a_quarter_byte_per_parameter_in_every_variant(
    moment_storage, variant
):
    """Temporaries beyond the float32 step's of the same variant, and a peak below it."""
    reference_temporaries, reference_peak = _temporaries_and_peak("float32", variant)
    temporaries, peak = _temporaries_and_peak(moment_storage, variant)
    assert temporaries <= reference_temporaries + TEMPORARY_BYTES_PER_PARAMETER, (
        temporaries,
        reference_temporaries,
    )
    assert peak < reference_peak - 1.0, (peak, reference_peak)


def test_no_variant_holds_temporaries_in_float32():
    """Nor do optax's steps of Nesterov momentum and L2 weight decay hold fewer than 4 bytes
    per parameter (the step, or the decayed gradient, written whole), which rj's avoid."""
    holding = {
        variant
        for variant in OTHER_VARIANTS
        if _temporaries_and_peak("float32", variant)[0] > TEMPORARY_BYTES_PER_PARAMETER
    }
    assert holding == set(), holding


@pytest.mark.parametrize(
    "options",
    [{}, {"momentum": 0.9}, {"centered": True, "momentum": 0.9}, {"maximize": True}],
    ids=["plain", "momentum", "centered-momentum", "maximize"],
)
def test_the_pytorch_preset_with_weight_decay_holds_no_temporaries(options):
    """PyTorch's L2 weight decay, g + λp, is read by the new average and by the step: the
    preset computes it again in each (see rmsprop_jax._recomputed_steps), where writing it
    whole took 4 bytes per parameter."""
    memory, _ = _compiled_memory(rj.compat.torch_rmsprop(1e-3, weight_decay=0.01, **options))
    assert memory.temp_size_in_bytes / PARAMETERS <= TEMPORARY_BYTES_PER_PARAMETER


@pytest.mark.parametrize("variant", INT8_VARIANTS)
def test_int8_step_divides_by_the_codes_written_not_a_recomputation(variant):
    """The int8 update writes the new codes in place of the old ones, and the step reads them
    back: the kernel that computes the new parameters reads no old codes (had XLA computed
    the codes again inside it, the old codes would have to be copied before being
    overwritten, and every element encoded twice)."""
    shape = (2048, 512)
    params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
    tx = rj.rmsprop(1e-3, moment_storage="int8", **INT8_VARIANTS[variant])

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.eval_shape(tx.init, params)
    text = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()
    assert text is not None
    entry = text[text.index("\nENTRY") :].splitlines()
    dims = ",".join(map(str, shape))
    definitions = {}
    for line in entry:
        match = re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = (\S+) ([\w\-]+)\((.*)", line)
        if match:
            definitions[match[1]] = (match[2], match[3], re.findall(r"%[\w.\-]+", match[4]))
    codes = {
        name
        for name, (kind, op, _) in definitions.items()
        if op == "parameter" and kind.split("{")[0] in (f"u8[{dims}]", f"s8[{dims}]")
    }
    assert len(codes) == (2 if variant == "centered-momentum-int8-mu" else 1), codes
    root = next(line for line in entry if line.lstrip().startswith("ROOT"))
    new_params = definitions[re.findall(r"%[\w.\-]+", root.split(" tuple(")[1])[0]]
    assert new_params[0].startswith(f"f32[{dims}]"), new_params
    assert not codes & set(new_params[2]), new_params
    assert not any(op == "copy" and set(ops) & codes for _, op, ops in definitions.values())


def test_int8_centered_variance_and_8_bit_mu_share_one_block_reduction():
    """Centered with 8-bit `mu`, the variance and `mu` of a leaf take their block maxima from
    one reduction (both read the gradient and the old `mu`), so a large leaf is read by one
    reduction kernel rather than two."""
    shape = (2048, 512)
    tx = rj.rmsprop(1e-3, moment_storage="int8", **INT8_MU)
    text = compile_step(tx, {"w": jnp.ones(shape)}).as_text()
    assert text is not None
    entry = text[text.index("\nENTRY") :]
    reductions = re.findall(rf"= \((?:\w+\[{shape[0]},{shape[1] // 256}\]\S*,? ?)+\) fusion", entry)
    assert len(reductions) == 1, reductions


# Arithmetic that computes a new block scale (or its inverse) from the block maxima.
_SCALE_ARITHMETIC = ("multiply", "add", "subtract", "minimum", "maximum", "select", "divide")


@pytest.mark.parametrize("variant", INT8_VARIANTS)
def test_int8_leaf_kernels_read_the_block_scales_rather_than_recompute_them(variant):
    """The new block scales are computed once per block and read by the kernels that run
    over the leaf: none of those kernels does arithmetic on block-shaped arrays. (XLA copies
    a cheap elementwise producer into each of its readers: the new scale, computed from the
    block maxima by some 15 operations, was computed again for every element of the leaf.)"""
    shape = (2048, 512)
    blocks = (shape[0], shape[1] // 256)
    tx = rj.rmsprop(1e-3, moment_storage="int8", **INT8_VARIANTS[variant])
    text = compile_step(tx, {"w": jnp.ones(shape)}).as_text()
    assert text is not None
    computations = re.findall(r"\n%?(fused\S*) \(.*?\) -> (\S+) \{\n(.*?)\n\}", text, re.S)
    leaf_kernels = [
        (name, body)
        for name, result, body in computations
        if result.split("{")[0].endswith(f"[{shape[0]},{shape[1]}]")
    ]
    # The codes of each average, and the kernel computing the new parameters (and momentum).
    assert len(leaf_kernels) >= (2 if variant == "plain" else 4), [n for n, _ in leaf_kernels]
    block_type = rf"\w+\[{blocks[0]},{blocks[1]}\]"
    recomputed = {
        name: found
        for name, body in leaf_kernels
        if (found := re.findall(rf"= {block_type}\S* ({'|'.join(_SCALE_ARITHMETIC)})\(", body))
    }
    assert not recomputed, recomputed


@pytest.mark.skipif(
    jax.default_backend() != "cpu"
    or _jax_compat.JAX_VERSION < _runtime_integers.SHARED_KERNELS_FROM,
    reason="seeds are read at run-time rows on CPU, from JAX 0.7.2 on",
)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("moment_storage", ["bfloat16", "int8"])
def test_same_shaped_rounded_leaves_compile_to_one_kernel_whatever_their_number(
    moment_storage, variant
):
    """Each leaf's rounding seed reaches its kernels at run time, so same-shaped leaves share
    their kernels (XLA compiles them once); with the seed, or the row it is read at, written
    into the code there were as many distinct kernels as leaves."""
    tx = rj.rmsprop(1e-3, moment_storage=moment_storage, **VARIANTS[variant])
    distinct = {}
    for leaves in (2, 12):
        params = {f"w{i:02d}": jnp.ones((16, 256)) for i in range(leaves)}
        distinct[leaves] = distinct_fusions(compile_step(tx, params))
    assert distinct[2] == distinct[12], distinct
