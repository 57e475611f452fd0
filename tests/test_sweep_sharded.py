"""Sweeps sharded over 8 simulated CPU devices give the results of the unsharded sweep."""

from __future__ import annotations

from conftest import SIMULATED_DEVICES as DEVICES
from conftest import needs_simulated_devices


def _report() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import rmsprop_jax as rj

    features = jax.random.normal(jax.random.key(0), (64, 5))
    labels = (features @ jnp.array([1.0, -2.0, 0.5, 0.0, 3.0]) > 0).astype(jnp.float32)
    traces = []

    def train(carry, x, y, learning_rate, decay, momentum):
        traces.append(1)
        optimizer = rj.rmsprop(learning_rate, decay, centered=True, momentum=momentum)

        def loss(w):
            return jnp.mean(optax.sigmoid_binary_cross_entropy(x @ w, y))

        def step(carry, _):
            w, state = carry
            updates, state = optimizer.update(jax.grad(loss)(w), state, w)
            return (optax.apply_updates(w, updates), state), None

        w = jnp.zeros(5) if carry is None else carry[0]
        state = optimizer.init(w) if carry is None else carry[1]
        (w, state), _ = jax.lax.scan(step, (w, state), length=10)
        return (w, state), loss(w)

    def first_chunk(x, y, **hyperparameters):
        return train(None, x, y, **hyperparameters)

    def relative_difference(a, b):
        diffs = jax.tree.map(lambda a, b: np.max(np.abs(a - b)) / np.max(np.abs(b)), a, b)
        return float(max(jax.tree.leaves(diffs)))

    grid = rj.sweep.grid(learning_rate=[1e-3, 1e-2, 3e-2, 0.1], decay=[0.5, 0.9, 0.99, 0.999],
                         momentum=[0.0])  # fmt: skip
    sharded = rj.sweep.run(first_chunk, grid, features, labels, shard=True)
    plain = rj.sweep.run(first_chunk, grid, features, labels)
    w = sharded.results[0][0]

    # Later chunks take the sharded state back in and leave it on its devices.
    carry_sharded, carry_plain = sharded.results[0], plain.results[0]
    traces.clear()
    for _ in range(3):
        carry_sharded, loss_sharded = rj.sweep.run(
            train, grid, carry_sharded, features, labels, in_axes=(0, None, None), shard=True
        ).results
        carry_plain, loss_plain = rj.sweep.run(
            train, grid, carry_plain, features, labels, in_axes=(0, None, None)
        ).results
    chunk_traces = len(traces)

    on_four = rj.sweep.run(
        first_chunk, rj.sweep.grid(learning_rate=[0.01, 0.1], decay=[0.9, 0.99], momentum=[0.5]),
        features, labels, shard=True, devices=jax.devices()[:4],
    )  # fmt: skip
    try:
        rj.sweep.run(first_chunk, rj.sweep.grid(learning_rate=[0.1] * 12), features, labels,
                     shard=True)  # fmt: skip
        indivisible_error = None
    except ValueError as error:
        indivisible_error = str(error)

    return {
        "device_count": jax.device_count(),
        "devices_holding_results": len(w.sharding.device_set),
        "shard_shapes": sorted({tuple(s.data.shape) for s in w.addressable_shards}),
        "partition_spec": list(w.sharding.spec),
        "first_chunk_difference": relative_difference(sharded.results, plain.results),
        "chunked_difference": relative_difference(
            (carry_sharded, loss_sharded), (carry_plain, loss_plain)
        ),
        "chunked_still_sharded": len(loss_sharded.sharding.device_set),
        "traces_over_six_chunked_runs": chunk_traces,
        "four_device_shards": len(on_four.results[1].sharding.device_set),
        "indivisible_error": indivisible_error,
        "losses_differ": bool(np.ptp(np.asarray(loss_plain)) > 0),
    }


@needs_simulated_devices
def test_sharded_sweep_on_eight_cpu_devices_equals_unsharded_sweep():
    report = _report()

    assert report["device_count"] == DEVICES
    assert report["devices_holding_results"] == DEVICES
    assert report["shard_shapes"] == [(2, 5)]  # 16 configurations, 2 per device
    assert report["partition_spec"] == ["sweep"]
    assert report["losses_differ"]
    assert report["first_chunk_difference"] <= 1e-6
    assert report["chunked_difference"] <= 1e-6
    assert report["chunked_still_sharded"] == DEVICES
    # Sharded and unsharded are two programs; each traced once for three chunks.
    assert report["traces_over_six_chunked_runs"] == 2
    assert report["four_device_shards"] == 4
    assert "12 configurations over 8 devices" in report["indivisible_error"]
