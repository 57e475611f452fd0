"""Large leaves updated a chunk of rows at a time give what the one-pass update gives.

The row-chunked update (`rmsprop_jax.storage._rows`) exists to bound the step's memory; it
must not change the result. Each case runs the same steps twice, once as compiled for the
chunks and once with chunking turned off (every leaf updated in one pass), and compares the
states and the updates: equal, except for the order in which a factored matrix's column
means are summed (float32 rounding). The gradients of the middle step hold NaN, infinities,
a value whose square overflows and one whose square is representable but whose sum over a
column would not be.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsprop_jax as rj
from rmsprop_jax import storage
from rmsprop_jax.storage import _rows, _sums

# (1000, 256): chunks of 40 rows (5 of each of 8 groups), 125 rows per group not a multiple
# of the 16 a chunk could hold; (131, 512): a prime row count, chunks of one row; (3, 128,
# 512): a stack, chunks of one matrix. int8: (1000, 384), blocks of 192.
SHAPES = {"odd_rows": (1000, 256), "prime_rows": (131, 512), "stack": (3, 128, 512)}
INT8_SHAPES = {"odd_rows": (1000, 384)}
EXTREMES = [np.nan, np.inf, -np.inf, 1e38, 1.5e19]
ROUNDING_ALLOWANCE = 1e-4
ROUNDED_STEP = 0.07  # half an int8 level (12.5%), and more than bfloat16's 2**-8
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "centered": {"centered": True},
    "centered_no_memory": {"centered": True, "decay": 0.0},
}


def _gradients(shapes: dict[str, tuple[int, ...]], seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    steps = [
        {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)
    ]
    for grad in steps[1].values():
        flat = grad.reshape(-1)
        where = rng.choice(flat.size, size=4 * len(EXTREMES), replace=False)
        flat[where] = np.repeat(np.asarray(EXTREMES, np.float32), 4)
    return steps


def _run(
    moment_storage: str,
    options: dict[str, Any],
    grads: list[dict[str, np.ndarray]],
    maybe_jit: Callable[..., Any],
) -> list[tuple[Any, Any]]:
    tx = rj.scale_by_rms(moment_storage=moment_storage, **options)
    state = tx.init(jax.tree.map(jnp.asarray, grads[0]))
    update = maybe_jit(tx.update)
    out = []
    for g in grads:
        updates, state = update(jax.tree.map(jnp.asarray, g), state)
        out.append((jax.tree.map(np.asarray, updates), jax.tree.map(np.asarray, state)))
    return out


def _assert_same(
    chunked: list[tuple[Any, Any]], one_pass: list[tuple[Any, Any]], rtol: float
) -> None:
    """Equal non-finite entries, float32 arrays within `rtol`, and rounded stored arrays
    (bfloat16, int8 codes) equal but for a few elements one rounding step away: an eager
    one-pass update rounds each operation apart, where the compiled one may fuse a multiply
    and an add, and a last-bit difference before stochastic rounding can flip it."""
    for step, (ours, theirs) in enumerate(zip(chunked, one_pass, strict=True)):
        paths = jax.tree_util.tree_leaves_with_path(theirs)
        for (path, a), b in zip(paths, jax.tree.leaves(ours), strict=True):
            label = f"step {step}, {jax.tree_util.keystr(path)}"
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape, label
            if a.dtype != np.float32:
                a, b = a.astype(np.float64), b.astype(np.float64)
                differ = (a != b) & ~(np.isnan(a) & np.isnan(b))
                assert np.mean(differ) <= ROUNDING_ALLOWANCE, label
                step_size = 2**-7 if a.dtype == jnp.bfloat16 else 1
                assert np.all(np.isclose(a[differ], b[differ], rtol=step_size, atol=0)), label
                continue
            np.testing.assert_array_equal(np.isnan(b), np.isnan(a), err_msg=label)
            np.testing.assert_array_equal(np.isinf(b), np.isinf(a), err_msg=label)
            finite = np.isfinite(a)
            a, b = a[finite], b[finite]
            # An element whose stored average rounded to the other neighbour (above) steps by
            # up to half a rounding step (the step divides by the root of the average).
            differ = ~np.isclose(b, a, rtol=rtol, atol=0)
            assert np.mean(differ) <= ROUNDING_ALLOWANCE, label
            np.testing.assert_allclose(b[differ], a[differ], rtol=ROUNDED_STEP, err_msg=label)


def _chunked_and_one_pass(monkeypatch, moment_storage, options, shapes, maybe_jit):
    fmt = storage.get(moment_storage)
    grads = _gradients(shapes, seed=len(shapes) + len(options))
    with monkeypatch.context() as patch:
        # int8 takes the chunks only with JAX releases whose one-pass update is slow.
        patch.setattr(type(fmt), "updates_in_row_chunks", True)
        for g in grads[0].values():
            assert storage.updates_by_rows(fmt, jnp.asarray(g)), g.shape
        chunked = _run(moment_storage, options, grads, maybe_jit)
    with monkeypatch.context() as patch:
        patch.setattr(_rows, "CHUNK_ELEMENTS", 1 << 40)
        for g in grads[0].values():
            assert not storage.updates_by_rows(fmt, jnp.asarray(g)), g.shape
        one_pass = _run(moment_storage, options, grads, maybe_jit)
    return chunked, one_pass


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_factored_chunks_give_the_one_pass_statistics_and_updates(variant, maybe_jit, monkeypatch):
    """The large-leaf update against one pass: with JAX 0.10.2 and newer, the statistics from
    fused sums and counted means (compared with the chunks themselves below), else the chunks."""
    chunked, one_pass = _chunked_and_one_pass(
        monkeypatch, "factored", VARIANTS[variant], SHAPES, maybe_jit
    )
    # Column means summed chunk by chunk (131 chunks of one row) rather than in one
    # reduction: float32 rounding, some 2**-24 per chunk at worst.
    _assert_same(chunked, one_pass, rtol=1e-5)
    # The overflowed, NaN and infinite entries made some updates non-finite or 0, as in one
    # pass; the statistics stayed finite.
    updates, state = chunked[1]
    assert any(not np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
    second = state.variance if VARIANTS[variant].get("centered") else state.nu
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(second))


@pytest.mark.parametrize("variant", ["plain", "centered"])
def test_int8_chunks_give_the_one_pass_state_and_updates(variant, maybe_jit, monkeypatch):
    chunked, one_pass = _chunked_and_one_pass(
        monkeypatch, "int8", VARIANTS[variant], INT8_SHAPES, maybe_jit
    )
    # Equal under jit; eagerly, the one-pass step rounds operation by operation.
    _assert_same(chunked, one_pass, rtol=1e-6)


def test_summed_flags_must_match_the_stored_arrays():
    g = jnp.ones((1000, 256))
    with pytest.raises(ValueError, match="`summed` has 3 entries for 2 stored arrays"):
        _rows.update_by_rows(lambda g, a, b: (a, b), g, g, g, summed=[False] * 3)


needs_fused_sums = pytest.mark.skipif(
    not _sums.sums_fuse(),
    reason=f"statistics from fused sums need JAX {_sums.SUMS_FUSE_FROM}+, this is "
    f"JAX {jax.__version__}",
)


@needs_fused_sums
def test_fused_sums_do_not_write_the_summed_array():
    g = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
    compiled = jax.jit(lambda g: _sums.fused_sums(lambda g: g * g, g)).lower(g).compile()
    # Two sums of 1024 floats each, and no 4 MiB square.
    memory = compiled.memory_analysis()
    assert memory is not None
    assert memory.temp_size_in_bytes < 64 * 1024
    x = np.random.default_rng(0).normal(size=(1024, 1024)).astype(np.float32)
    rows, cols = compiled(jnp.asarray(x))
    np.testing.assert_allclose(rows, np.sum(np.float64(x) ** 2, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(cols, np.sum(np.float64(x) ** 2, axis=-2), rtol=1e-5)


@needs_fused_sums
def test_fused_sums_of_a_gradient_and_a_bfloat16_moment_write_nothing_whole():
    """The centered spread's sums read g and a bfloat16 mu: the conversion of mu, common to
    both sums, must not be written (2 MiB here) for them to share."""
    shapes = (
        jax.ShapeDtypeStruct((1024, 512), jnp.float32),
        jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16),
    )

    def spread_sums(g, mu):
        return _sums.fused_sums(lambda g, mu: (g - mu.astype(jnp.float32)) ** 2, g, mu)

    compiled = jax.jit(spread_sums).lower(*shapes).compile()
    memory = compiled.memory_analysis()
    assert memory is not None
    assert memory.temp_size_in_bytes < 64 * 1024
    # The row sums of an x computed from two arrays: reduced with a count (two operands).
    text = compiled.as_text()
    assert text is not None
    assert re.search(r"\(f32\[1024\]\{0\}, s32\[1024\]\{0\}\) reduce", text)
    rng = np.random.default_rng(1)
    g = rng.normal(size=(1024, 512)).astype(np.float32)
    mu = jnp.asarray(rng.normal(size=(1024, 512)), jnp.bfloat16)
    x = (np.float64(g) - np.asarray(mu, np.float64)) ** 2
    rows, cols = compiled(jnp.asarray(g), mu)
    np.testing.assert_allclose(rows, x.sum(axis=-1), rtol=1e-5)
    np.testing.assert_allclose(cols, x.sum(axis=-2), rtol=1e-5)


@needs_fused_sums
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_factored_statistics_from_means_are_the_chunks_statistics(variant, maybe_jit, monkeypatch):
    """The default (fused sums where finite, counted means where not: the middle step holds
    NaN, infinities and overflowing squares) against the chunks (the sums turned off)."""
    grads = _gradients(SHAPES, seed=7)
    from_means = _run("factored", VARIANTS[variant], grads, maybe_jit)
    with monkeypatch.context() as patch:
        patch.setattr(_sums, "SUMS_FUSE_FROM", (99,))
        chunked = _run("factored", VARIANTS[variant], grads, maybe_jit)
    _assert_same(from_means, chunked, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1024, 256), (3, 128, 256)], ids=["matrix", "stack"])
def test_counted_means_leave_non_finite_entries_out_and_flag_them(shape, maybe_jit):
    rng = np.random.default_rng(5)
    g = rng.normal(size=shape).astype(np.float32)
    flat = g.reshape(-1)
    flat[rng.choice(flat.size, size=40, replace=False)] = np.repeat(
        np.asarray([np.nan, np.inf, -np.inf, 1e38, 1.5e19], np.float32), 8
    )
    mu = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)

    def counted(g, mu):
        def x_of(g, mu):
            return 0.9 * (g - mu.astype(jnp.float32)) ** 2

        return _sums.counted_means(x_of, jnp.zeros(3), g, mu, flagged=True)

    rows, cols, flags = maybe_jit(counted)(jnp.asarray(g), mu)
    with np.errstate(over="ignore", invalid="ignore"):
        x = 0.9 * (np.float64(g) - np.asarray(mu, np.float64)) ** 2
        x32 = x.astype(np.float32)  # Where float32 overflows, the entry is left out.
    counted_x = np.where(np.isfinite(x32), x, 0)
    np.testing.assert_allclose(rows, counted_x.mean(axis=-1), rtol=1e-5)
    np.testing.assert_allclose(cols, counted_x.mean(axis=-2), rtol=1e-5)
    unpacked = np.asarray(_rows.unpack_flags(flags, shape))
    np.testing.assert_array_equal(unpacked, ~np.isfinite(x32))
    # NaN, both infinities and the overflowing squares of 1e38 (those of 1.5e19 are finite).
    assert unpacked.sum() == 32
    if maybe_jit is jax.jit and _sums.sums_fuse():  # Used from that JAX release on.
        shapes = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, mu.dtype))
        memory = jax.jit(counted).lower(*shapes).compile().memory_analysis()
        # Nothing the size of x (1 MiB): the means, the counts and the flags' bytes.
        assert memory.temp_size_in_bytes < x.size, memory.temp_size_in_bytes


def test_unless_computes_only_where_not_done_and_per_member_under_vmap(maybe_jit):
    def fn(anchor, a):
        return anchor * 0 + 2 * a

    def run(done, a):
        return _sums.unless(done, fn, a, otherwise=-a)[0]

    a = jnp.arange(4.0)
    np.testing.assert_array_equal(maybe_jit(run)(jnp.bool_(True), a), -a)
    np.testing.assert_array_equal(maybe_jit(run)(jnp.bool_(False), a), 2 * a)
    done = jnp.asarray([True, False])
    both = maybe_jit(jax.vmap(run))(done, jnp.stack([a, a]))
    np.testing.assert_array_equal(both, jnp.stack([-a, 2 * a]))


def test_unless_keeps_the_counted_means_in_its_loop():
    """XLA hoists loop-invariant work out of a loop, where it would always run: the counting
    reductions (a float32 and an int32 result) must stay in the loop's body, also under
    `jax.vmap`, where the loop is how they run only for the members that need them; and a
    bfloat16 input carried through the loop is not converted to float32 before it (under
    `jax.vmap`, XLA converts a loop-invariant one: 4 bytes per element written)."""
    shape = (1024, 256)

    def x_of(g, mu):
        return (g - mu.astype(jnp.float32)) ** 2

    def step(g, mu):
        sums = _sums.fused_sums(x_of, g, mu)
        done = jnp.all(jnp.isfinite(sums[0])) & jnp.all(jnp.isfinite(sums[1]))

        def counted(anchor, g, mu):
            return _sums.counted_means(x_of, anchor, g, mu, flagged=False)[:2]

        means, (mu,) = _sums.unless(done, counted, g, otherwise=sums, carried=(mu,))
        return means, mu

    one = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.bfloat16))
    two = tuple(jax.ShapeDtypeStruct((2, *shape), x.dtype) for x in one)
    # mu donated, as the state is: the loop rewrites it in place.
    programs = jax.jit(step, donate_argnums=1), jax.jit(jax.vmap(step), donate_argnums=1)
    for program, args in zip(programs, (one, two), strict=True):
        compiled = program.lower(*args).compile()
        text = compiled.as_text()
        assert text is not None
        entry = text[text.index("\nENTRY") :]
        entry = entry[: entry.index("\n}")]
        assert "while(" in entry
        # Out of the loop, the one counting reduction is the fused row sums' (one result per
        # row); the counted means' column reduction (one per column) stays in the loop.
        counting = re.findall(r"\(f32\[([0-9,]+)\]\{[0-9,]*\}, s32\[", entry)
        assert counting == [",".join(map(str, args[0].shape[:-1]))], entry
        # Alone: nothing the size of the leaf. Under vmap: the rewritten bfloat16 input inside
        # the loop's body (2 bytes per element), but no float32 conversion of it (4).
        elements = int(np.prod(args[0].shape))
        bound = elements if args is one else 3 * elements
        if _sums.sums_fuse():  # Older XLA:CPU writes the sums' x whole (not used there).
            memory = compiled.memory_analysis()
            assert memory is not None
            assert memory.temp_size_in_bytes < bound, args[0].shape


def test_factored_sum_that_overflows_takes_the_chunks(maybe_jit, monkeypatch):
    """Every square finite, but a column's sum overflows float32 where its mean does not:
    the statistics are the one-pass means, finite."""
    g = np.random.default_rng(3).normal(size=(1000, 256)).astype(np.float32)
    g[:, 5] = 1.5e19  # squares 2.25e38; 1000 of them sum past float32's 3.4e38
    grads = [{"w": g}, {"w": g}]
    chunked = _run("factored", {}, grads, maybe_jit)
    with monkeypatch.context() as patch:
        patch.setattr(_rows, "CHUNK_ELEMENTS", 1 << 40)
        one_pass = _run("factored", {}, grads, maybe_jit)
    _assert_same(chunked, one_pass, rtol=1e-5)
    state = chunked[-1][1]
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.nu))
    # (1 - 0.9**2) of the squares' mean: the sum (past float32) would have made it infinite.
    np.testing.assert_allclose(state.nu.col["w"][5], 0.19 * np.float32(1.5e19) ** 2, rtol=1e-5)


@needs_fused_sums
@pytest.mark.parametrize("variant", ["plain", "centered"])
def test_factored_members_of_a_vmap_update_as_each_alone(variant):
    """Under `jax.vmap` the counting passes run for the whole batch when one member needs
    them (a gradient holding NaN, infinities and overflowing squares): each member's update
    and state are still its own, as computed alone."""
    tx = rj.scale_by_rms(moment_storage="factored", **VARIANTS[variant])
    steps = _gradients({"w": (1000, 256)}, seed=11)
    members = [steps[0], steps[1]]  # Finite, and holding the extremes.
    state = tx.init({"w": jnp.asarray(steps[0]["w"])})
    update = jax.jit(tx.update)
    alone = [update({"w": jnp.asarray(g["w"])}, state) for g in members]
    batched_state = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    grads = {"w": jnp.stack([jnp.asarray(g["w"]) for g in members])}
    together = jax.jit(jax.vmap(tx.update))(grads, batched_state)
    for k, one in enumerate(alone):
        ours = jax.tree.map(lambda x, k=k: np.asarray(x[k]), together)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(one), strict=True):
            np.testing.assert_allclose(a, np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize("finite", [True, False], ids=["finite", "with_extremes"])
def test_statistics_passes_differentiate_as_plain_reductions(finite):
    """The sums, the counting passes and the loop that runs them only where needed are
    written for XLA's fusion; their derivatives (forward and reverse) are those of plain sums
    and means of x with its non-finite entries left out."""
    rng = np.random.default_rng(9)
    drawn = rng.normal(size=(512, 384)).astype(np.float32)
    if not finite:
        drawn[3, 5], drawn[7, 1] = np.inf, np.nan
    g, mu = jnp.asarray(drawn), jnp.asarray(rng.normal(size=(512, 384)), jnp.float32)
    tangents = tuple(jnp.asarray(rng.normal(size=(512, 384)), jnp.float32) for _ in range(2))

    def x_of(scale, g, mu):
        return scale * (g - mu) ** 2

    def statistics(g, mu):
        sums = _sums.fused_sums(x_of, 0.5, g, mu)
        done = jnp.all(jnp.isfinite(sums[0])) & jnp.all(jnp.isfinite(sums[1]))
        means = (sums[0] / 384, sums[1] / 512)
        counted = functools.partial(_sums.counted_means, x_of, flagged=False)

        def fn(anchor, scale, g, mu):
            return counted(anchor, scale, g, mu)[:2]

        return _sums.unless(done, fn, 0.5, g, mu, otherwise=means)[0]

    def reference(g, mu):
        x = x_of(0.5, g, mu)
        x = jnp.where(jnp.isfinite(x), x, 0)
        return jnp.mean(x, axis=-1), jnp.mean(x, axis=-2)

    ours = jax.jit(lambda t: jax.jvp(statistics, (g, mu), t))(tangents)
    theirs = jax.jvp(reference, (g, mu), tangents)
    cotangents = theirs[0]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    ours = jax.jit(lambda c: jax.vjp(statistics, g, mu)[1](c))(cotangents)
    theirs = jax.vjp(reference, g, mu)[1](cotangents)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
