"""Round trips of the storage formats on their own: error bounds, zeros, unbiasedness, layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmsprop_jax.storage import _rounding as _rounding_noise
from rmsprop_jax.storage import bfloat16 as _storage_bf16
from rmsprop_jax.storage import factored as _storage_factored
from rmsprop_jax.storage import int8 as _storage_int8

# One code step of the int8 code books, relative to the value rounded: 8 evenly spaced levels
# per octave (the 3 leading mantissa bits of a float32), so neighbours are 1/8 (just above a
# power of two) to 1/15 apart. The float32 product by the block's reciprocal adds ~1e-7.
NU_STEP = MU_STEP = 1 / 8
# The smallest levels, as a fraction of the block scale: 1.5 * 2**-32 for nu (9.5 orders of
# magnitude), 1.375 * 2**-16 for |mu| (4.7 orders).
NU_SMALLEST, MU_SMALLEST = 1.5 * 2.0**-32, 1.375 * 2.0**-16

INT8 = _storage_int8.FORMAT
_encode = jax.jit(INT8.encode, static_argnames="signed")
_decode = jax.jit(INT8.decode, static_argnums=1)


def _shuffled_logspace(rows: int, orders: float, seed: int = 0) -> np.ndarray:
    """Rows of 512 values log-spaced over `orders` decades below 1, shuffled within each row.

    Every block of 256 holds its row's largest value (1.0) and values down to 10**-orders.
    """
    rng = np.random.default_rng(seed)
    base = np.logspace(-orders, 0, 512)
    values = np.stack([rng.permutation(base) for _ in range(rows)])
    for row in values:
        row[:256][np.argmax(row[:256])] = 1.0
        row[256:][np.argmax(row[256:])] = 1.0
    return values


def _relative_error(decoded: np.ndarray, exact: np.ndarray) -> np.ndarray:
    return np.abs(decoded - exact) / np.where(exact != 0, np.abs(exact), 1.0)


@pytest.mark.parametrize("block_scale", [1e-20, 1e-6, 1.0, 1e6, 1e20])
def test_int8_second_moment_relative_error_bounded_across_9_orders_in_a_block(block_scale):
    exact = (_shuffled_logspace(16, orders=9) * block_scale).astype(np.float32)
    exact[:, :5] = 0.0
    stored = _encode(jnp.asarray(exact), jnp.uint32(0), signed=False)
    decoded = np.asarray(_decode(stored, jnp.float32))
    assert stored[0].dtype == jnp.uint8
    assert np.all(decoded[:, :5] == 0.0)
    assert np.max(_relative_error(decoded, exact)) <= NU_STEP * (1 + 1e-5)


@pytest.mark.parametrize("block_scale", [1e-10, 1.0, 1e10])
def test_int8_first_moment_keeps_sign_and_relative_error_across_4_orders(block_scale):
    rng = np.random.default_rng(1)
    magnitude = _shuffled_logspace(16, orders=4, seed=1)
    exact = (magnitude * rng.choice([-1.0, 1.0], size=magnitude.shape) * block_scale).astype(
        np.float32
    )
    exact[:, 7] = 0.0
    stored = _encode(jnp.asarray(exact), jnp.uint32(1), signed=True)
    decoded = np.asarray(_decode(stored, jnp.float32))
    assert stored[0].dtype == jnp.int8
    assert np.all(decoded[:, 7] == 0.0)
    assert np.all(np.sign(decoded) == np.sign(exact))
    assert np.max(_relative_error(decoded, exact)) <= MU_STEP * (1 + 1e-5)


def _level(code: np.ndarray, top: int) -> np.ndarray:
    """Level `code` (1..top) of an int8 code book in float64: `top` is 1.0, and below it 8
    evenly spaced levels per octave, `(1 + m / 8) * 2**e`."""
    field = code.astype(np.int64) + 127 * 8 - top
    return (1 + (field % 8) / 8) * 2.0 ** (field // 8 - 127)


def test_int8_codes_decode_to_the_code_book_in_float64():
    codes = np.arange(256, dtype=np.uint8).reshape(1, 256).repeat(16, axis=0)
    scales = np.geomspace(1e-8, 1e8, 16, dtype=np.float32).reshape(16, 1)
    stored = (jnp.asarray(codes), jnp.asarray(scales))
    decoded = np.asarray(_decode(stored, jnp.float32), np.float64)
    level = np.where(codes > 0, _level(codes, 253), 0.0)
    assert level[0, 253] == 1.0 and level[0, 1] == NU_SMALLEST
    # The level is exact; its product by the float32 scale is rounded once.
    np.testing.assert_allclose(
        decoded[:, :254], (level * scales.astype(np.float64))[:, :254], rtol=1.2e-7
    )
    assert np.all(decoded[:, 254] == np.inf) and np.all(np.isnan(decoded[:, 255]))


def test_int8_signed_codes_decode_to_the_code_book_in_float64():
    codes = np.arange(-128, 128).astype(np.int8).reshape(1, 256)
    stored = (jnp.asarray(codes), jnp.full((1, 1), 3.0, jnp.float32))
    decoded = np.asarray(_decode(stored, jnp.float32), np.float64)[0]
    magnitude = np.abs(codes[0].astype(np.int64))
    level = np.where(
        (magnitude > 0) & (magnitude < 127), _level(np.minimum(magnitude, 126), 126), 0
    )
    finite = np.abs(codes[0].astype(np.int64)) < 127
    np.testing.assert_allclose(
        decoded[finite], (np.sign(codes[0]) * 3.0 * level)[finite], rtol=1.2e-7
    )
    assert _level(np.array([1]), 126)[0] == MU_SMALLEST
    assert decoded[255] == np.inf and decoded[1] == -np.inf and np.isnan(decoded[0])


def test_int8_values_below_the_smallest_level():
    """nu below the range is stored as the smallest level, never 0 (the step divides by it);
    mu rounds to 0 or the smallest level without bias."""
    nu = np.full((64, 512), 0.25 * NU_SMALLEST, np.float32)
    nu[:, 0] = nu[:, 256] = 1.0  # the block scales
    nu = np.asarray(_decode(_encode(jnp.asarray(nu), jnp.uint32(0), signed=False), jnp.float32))
    assert np.all(nu[:, 0] == 1.0)
    np.testing.assert_array_equal(nu[:, 1:256], np.float32(NU_SMALLEST))
    exact = np.full((64, 512), 0.25 * MU_SMALLEST, np.float32)
    exact[:, 0] = exact[:, 256] = 1.0
    mu = np.asarray(_decode(_encode(jnp.asarray(-exact), jnp.uint32(0), signed=True), jnp.float32))
    below = np.delete(mu, [0, 256], axis=1)
    assert set(np.unique(below)) == {0.0, np.float32(-MU_SMALLEST)}
    assert np.mean(below) == pytest.approx(-0.25 * MU_SMALLEST, rel=0.05)


@pytest.mark.parametrize("signed", [False, True])
def test_int8_keeps_non_finite_values_per_element_out_of_the_block_scale(signed):
    rng = np.random.default_rng(11)
    exact = rng.uniform(0.5, 1.0, size=(4, 512)).astype(np.float32)
    special = [np.inf, np.nan] + ([-np.inf] if signed else [])
    for column, value in enumerate(special):
        exact[:, 3 + 100 * column] = value
    codes, scales = _encode(jnp.asarray(exact), jnp.uint32(12), signed=signed)
    decoded = np.asarray(_decode((codes, scales), jnp.float32))
    finite = np.isfinite(exact)
    assert np.all(np.isfinite(np.asarray(scales)))
    np.testing.assert_array_equal(decoded[~finite], exact[~finite])  # nan == nan here
    assert np.max(_relative_error(decoded[finite], exact[finite])) <= NU_STEP * (1 + 1e-5)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_int8_update_scale_averages_the_block_maxima_and_bounds_the_new_average(signed, decay):
    """After an update, a block's scale is decay * (largest finite |old|) + (1 - decay) *
    (largest finite |x|), checked in float64 against the decoded old average: no smaller
    than any finite new value, at most twice the largest for a non-negative average, and the
    new values are stored within a code step of the exact average (NaN and infinities kept
    per element, out of the scales)."""
    rng = np.random.default_rng(21 + signed)
    shape = (6, 768)  # blocks of 192
    old = rng.uniform(0.0, 1.0, shape) * 10.0 ** rng.uniform(-3, 3, (6, 1))
    x = rng.uniform(0.0, 1.0, shape) * 10.0 ** rng.uniform(-3, 3, (6, 1))
    if signed:
        old, x = old * rng.choice([-1, 1], shape), x * rng.choice([-1, 1], shape)
    old[0, 5], x[1, 7], x[2, 200] = np.inf, np.nan, -np.inf if signed else np.inf
    x[3, :192] = 0.0  # a block where only the old average counts
    stored = _encode(jnp.asarray(old, jnp.float32), jnp.uint32(5), signed=signed)
    update = jax.jit(INT8.update, static_argnames="signed")
    (codes, scales), average = update(
        stored, jnp.asarray(x, jnp.float32), decay, jnp.uint32(6), signed=signed
    )

    def block_max(a):
        a = np.abs(np.asarray(a, np.float64)).reshape(6, 4, 192)
        return np.max(np.where(np.isfinite(a), a, 0), axis=-1)

    decoded_old = np.asarray(_decode(stored, jnp.float32), np.float64)
    expected = decay * block_max(decoded_old) + (1 - decay) * block_max(x.astype(np.float32))
    np.testing.assert_allclose(np.asarray(scales), expected, rtol=1e-6)

    with np.errstate(invalid="ignore"):  # decay 0 times the infinite old element: NaN, as stored
        exact = decay * decoded_old + (1 - decay) * x.astype(np.float32).astype(np.float64)
    decoded = np.asarray(_decode((codes, scales), jnp.float32), np.float64)
    # What the step divides by: the stored average, up to the rounding of a scale that XLA
    # computes again (a multiply-add it may contract) inside the step.
    np.testing.assert_allclose(np.asarray(average), decoded, rtol=1e-6)
    finite = np.isfinite(exact)
    np.testing.assert_array_equal(decoded[~finite], exact[~finite])  # nan == nan here
    assert np.all(block_max(exact) <= np.asarray(scales, np.float64) * (1 + 1e-6))
    if not signed:
        assert np.all(np.asarray(scales) <= 2 * block_max(exact) * (1 + 1e-6))
    in_range = finite & (np.abs(exact) >= 1e-3 * np.repeat(expected, 192, axis=-1))
    assert np.max(_relative_error(decoded[in_range], exact[in_range])) <= NU_STEP * (1 + 1e-5)


def test_int8_all_zero_blocks_stay_zero_with_zero_scale():
    stored = _encode(jnp.zeros((4, 1024)), jnp.uint32(2), signed=False)
    assert np.all(np.asarray(stored[0]) == 0)
    assert np.all(np.asarray(stored[1]) == 0)
    assert np.all(np.asarray(_decode(stored, jnp.float32)) == 0)


@pytest.mark.parametrize("signed", [False, True])
def test_int8_stochastic_rounding_is_unbiased(signed):
    rng = np.random.default_rng(3)
    exact = rng.uniform(0.01, 1.0, size=(64, 512)).astype(np.float32)
    if signed:
        exact *= rng.choice([-1.0, 1.0], size=exact.shape)
    draws = [
        np.asarray(
            _decode(
                _encode(jnp.asarray(exact), jnp.uint32(i), signed=signed),
                jnp.float32,
            )
        )
        for i in range(16)
    ]
    bias = np.mean(np.stack(draws) - exact) / np.mean(np.abs(exact))
    # 16 draws of 32768 values, each off by at most one code step (<= 12.5%): the mean error of
    # unbiased rounding is ~1e-4 of the mean; round-to-nearest would leave ~1e-2 of it.
    assert abs(bias) < 2e-3


@pytest.mark.parametrize(
    ("length", "layout"),
    [
        (256, (1, 256)),
        (512, (2, 256)),
        (4096, (16, 256)),
        (768, (4, 192)),
        (3072, (16, 192)),
        (100, (1, 100)),
        (1000, (4, 250)),
        (771, (4, 256)),  # 771 = 3 * 257 splits into no equal power-of-two blocks: padded.
    ],
)
def test_int8_block_layout(length, layout):
    assert _storage_int8.block_layout(length) == layout


def test_int8_round_trip_with_a_padded_last_block():
    rng = np.random.default_rng(4)
    exact = np.abs(rng.normal(size=(8, 771))).astype(np.float32)
    stored = _encode(jnp.asarray(exact), jnp.uint32(4), signed=False)
    assert stored[0].shape == (8, 771)
    assert stored[1].shape == (8, 4)
    np.testing.assert_array_equal(np.asarray(stored[1])[:, 3], np.max(exact[:, 768:], axis=-1))
    decoded = np.asarray(_decode(stored, jnp.float32))
    assert np.max(_relative_error(decoded, exact)) <= NU_STEP * (1 + 1e-5)


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 3e-7])
def test_int8_init_represents_the_initial_value_exactly(value):
    stored = INT8.create(jnp.zeros((16, 512)), value, signed=False)
    decoded = np.asarray(_decode(stored, jnp.float32))
    assert np.all(decoded == np.float32(value))


def _bf16_neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bfloat16 values just below and above |x| (as float32), by truncating the bits."""
    bits = np.abs(x).astype(np.float32).view(np.uint32)
    # uint32 masks: NumPy 1.x would widen `uint32 & int` to int64 and refuse the view.
    down = (bits & np.uint32(0xFFFF0000)).view(np.float32)
    up = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    return down, up


def test_bf16_stochastic_rounding_picks_a_neighbour_without_bias():
    rng = np.random.default_rng(5)
    exact = (rng.uniform(1, 2, size=(64, 512)) * rng.choice([-1, 1], (64, 512))).astype(np.float32)
    draws = np.stack(
        [
            np.asarray(_storage_bf16.stochastic_round(jnp.asarray(exact), jnp.uint32(i)))
            for i in range(16)
        ]
    ).astype(np.float32)
    down, up = _bf16_neighbours(exact)
    magnitude = np.abs(draws)
    assert np.all((magnitude == down) | (magnitude == up))
    assert np.all(np.sign(draws) == np.sign(exact))
    bias = np.mean(draws - exact) / np.mean(np.abs(up - down))
    assert abs(bias) < 2e-2  # 524288 draws; nearest rounding leaves no guarantee here.


def test_bf16_stochastic_rounding_keeps_zero_infinity_and_nan():
    special = jnp.asarray([0.0, -0.0, jnp.inf, -jnp.inf, jnp.nan, 1e-40], jnp.float32)
    special = jnp.concatenate([special, jnp.asarray([np.uint32(0x7FFFFFFF)]).view(jnp.float32)])
    rounded = np.asarray(_storage_bf16.stochastic_round(special, jnp.uint32(6)).astype(jnp.float32))
    assert rounded[0] == 0 and rounded[1] == 0
    assert rounded[2] == np.inf and rounded[3] == -np.inf
    assert np.isnan(rounded[4]) and np.isnan(rounded[6])
    assert rounded[5] in _bf16_neighbours(np.float32(1e-40))


def test_bf16_moving_average_follows_increments_below_bf16_resolution():
    """decay=0.999 moves the average by 0.1% per step, under half a bfloat16 step (0.2-0.4%)."""
    bf16 = _storage_bf16.FORMAT
    stored, exact = bf16.create(jnp.zeros(4096), 1.0, signed=False), np.ones(4096)
    update = jax.jit(bf16.update, static_argnames="signed")
    for step in range(2000):
        stored, _ = update(stored, jnp.full(4096, 2.0), 0.999, jnp.uint32(step), signed=False)
        exact = 0.999 * exact + 0.001 * 2.0
    mean = float(jnp.mean(stored[0].astype(jnp.float32)))
    assert exact[0] > 1.8
    assert abs(mean - exact[0]) < 0.01 * exact[0]


@pytest.mark.parametrize("decay", [0.9, 0.99])
def test_int8_moving_average_noise_stays_within_a_code_step(decay):
    """The stored average wanders over neighbouring codes; its spread does not grow with steps."""
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.uniform(0.1, 1.0, (64, 1024)), jnp.float32)
    stored = INT8.create(x, 0.0, signed=False)
    update = jax.jit(INT8.update, static_argnames="signed")
    steps = int(10 / (1 - decay))
    for step in range(steps):
        stored, _ = update(stored, x, decay, jnp.uint32(step), signed=False)
    exact = np.asarray(x, np.float64) * (1 - decay**steps)
    relative = np.asarray(_decode(stored, jnp.float32)) / exact - 1
    assert abs(np.mean(relative)) < 0.005
    assert np.std(relative) < NU_STEP / 2  # measured 3.6% at both decays


FACTORED = _storage_factored.FORMAT


def test_factored_decode_is_the_normalized_outer_product_in_float64():
    rng = np.random.default_rng(7)
    row, col = rng.uniform(0.1, 10, size=(3, 128)), rng.uniform(0.1, 10, size=(3, 192))
    stored = (jnp.asarray(row, jnp.float32), jnp.asarray(col, jnp.float32))
    expected = row[:, :, None] * col[:, None, :] / row.mean(axis=-1)[:, None, None]
    decoded = np.asarray(FACTORED.decode(stored, jnp.float32))
    np.testing.assert_allclose(decoded, expected, rtol=1e-5)


def test_factored_estimate_is_exact_for_rank_one_averages():
    rng = np.random.default_rng(8)
    left, right = rng.uniform(0.1, 3, size=(128, 1)), rng.uniform(0.1, 3, size=(1, 256))
    stored = FACTORED.create(jnp.zeros((128, 256)), 0.0, signed=False)
    exact = np.zeros((128, 256))
    for scale in (1.0, 4.0, 0.25):
        x = scale * left * right
        stored, estimate = FACTORED.update(
            stored, jnp.asarray(x, jnp.float32), 0.9, None, signed=False
        )
        exact = 0.9 * exact + 0.1 * x
    np.testing.assert_allclose(np.asarray(estimate), exact, rtol=1e-5)


def test_factored_estimate_of_nothing_seen_is_zero_not_nan():
    stored = FACTORED.create(jnp.zeros((128, 128)), 0.0, signed=False)
    stored, estimate = FACTORED.update(stored, jnp.zeros((128, 128)), 0.9, None, signed=False)
    assert np.all(np.asarray(estimate) == 0)


def test_factored_means_do_not_overflow_where_the_mean_is_representable():
    """g = 1.5e19 gives g**2 = 2.25e38 < 3.4e38: a plain sum of 128 of them overflows."""
    x = jnp.full((128, 256), 2.25e38, jnp.float32)
    stored = FACTORED.create(x, 0.0, signed=False)
    (row, col), estimate = FACTORED.update(stored, x, 0.0, None, signed=False)
    assert np.all(np.isfinite(np.asarray(row))) and np.all(np.isfinite(np.asarray(col)))
    np.testing.assert_allclose(np.asarray(estimate), 2.25e38, rtol=1e-5)


def test_factored_non_finite_entries_stay_out_of_the_statistics():
    rng = np.random.default_rng(13)
    x = rng.uniform(0.5, 1.0, size=(128, 256)).astype(np.float32)
    bad = x.copy()
    bad[3, 5], bad[7, 9], bad[100, 200] = np.nan, np.inf, np.inf
    clean = x.copy()
    clean[3, 5] = clean[7, 9] = clean[100, 200] = 0.0
    stored = FACTORED.create(jnp.asarray(x), 0.0, signed=False)
    out_bad = FACTORED.update(stored, jnp.asarray(bad), 0.9, None, signed=False)
    out_clean = FACTORED.update(stored, jnp.asarray(clean), 0.9, None, signed=False)
    for a, b in zip(jax.tree.leaves(out_bad[0]), jax.tree.leaves(out_clean[0]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    estimate, reference = np.asarray(out_bad[1]), np.asarray(out_clean[1])
    finite = np.isfinite(bad)
    np.testing.assert_array_equal(estimate[finite], reference[finite])
    assert np.isnan(estimate[3, 5]) and estimate[7, 9] == np.inf


@pytest.mark.parametrize(
    ("shape", "factored"),
    [((128, 128), True), ((4, 128, 256), True), ((127, 4096), False), ((4096,), False)],
)
def test_factored_applies_to_leaves_with_two_trailing_axes_of_at_least_128(shape, factored):
    assert FACTORED.compresses(shape, jnp.float32, signed=False) is factored


def test_rounding_noise_is_uniform_and_uncorrelated_across_steps_and_neighbours():
    like = jnp.zeros((256, 1024))
    draws = np.stack(
        [
            np.asarray(_rounding_noise.uniform(_rounding_noise.seed(jnp.int32(step), 3, 0), like))
            for step in range(4)
        ]
    )
    assert np.all((draws >= 0) & (draws < 1))
    counts, _ = np.histogram(draws[0], bins=64, range=(0, 1))
    expected = draws[0].size / 64
    chi_square = np.sum((counts - expected) ** 2 / expected)
    assert chi_square < 120  # 63 degrees of freedom: above 120 has probability < 1e-5.
    centred = draws - 0.5
    for a, b in [(0, 1), (1, 2), (0, 3)]:
        assert abs(np.mean(centred[a] * centred[b])) / np.var(centred[a]) < 0.01
    assert abs(np.mean(centred[0][:, 1:] * centred[0][:, :-1])) / np.var(centred[0]) < 0.01
    assert abs(np.mean(centred[0][1:] * centred[0][:-1])) / np.var(centred[0]) < 0.01


@pytest.mark.parametrize(("field", "shift"), [("bfloat16", 16), ("int8", 12), ("uniform", 8)])
def test_rounding_bit_fields_in_use_are_uniform_and_independent_of_neighbours(field, shift):
    """The high bits each format uses: balanced bits, and no dependence between an element and
    its neighbours along a row, down a column, nor between consecutive pairs (a 16 x 16 grid
    of (value, next value) counts)."""
    del field
    rows, columns = 256, 1024
    like = jnp.zeros((rows, columns))
    for step in range(3):
        raw = np.asarray(_rounding_noise.bits(_rounding_noise.seed(jnp.int32(step), 1, 0), like))
        used = raw >> np.uint32(shift)
        width = 32 - shift
        for bit in range(width):
            assert abs(np.mean((used >> np.uint32(bit)) & 1) - 0.5) < 0.004  # ~4 sigma
        centred = used.astype(np.float64) / 2.0**width - 0.5
        flat = centred.reshape(-1)
        for lag in (1, 2, 3, 8, columns, columns + 1):
            correlation = np.mean(flat[lag:] * flat[:-lag]) / np.var(flat)
            assert abs(correlation) < 0.006, (lag, correlation)  # ~4 sigma
        cells = np.floor((flat + 0.5) * 16).astype(np.int64)
        counts = np.bincount(cells[:-1] * 16 + cells[1:], minlength=256)
        expected = (flat.size - 1) / 256
        chi_square = np.sum((counts - expected) ** 2 / expected)
        assert chi_square < 360  # 255 degrees of freedom: above 360 has probability < 1e-5.


def test_rounding_noise_differs_between_leaves_and_streams():
    like = jnp.zeros((64, 64))
    seeds = [
        _rounding_noise.seed(jnp.int32(5), leaf, stream) for leaf in (0, 1) for stream in (0, 1)
    ]
    draws = [np.asarray(_rounding_noise.bits(s, like)) for s in seeds]
    for i in range(len(draws)):
        for j in range(i):
            assert np.mean(draws[i] == draws[j]) < 0.01
