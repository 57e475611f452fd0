"""Compressed states of sharded parameters: sharded alike, no cross-shard blocks, same numbers."""

from __future__ import annotations

import itertools
from typing import Any

import jax
import numpy as np
import optax
from conftest import needs_simulated_devices
from helpers import needs_jax_0_10_placement
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import rmsprop_jax as rj


@needs_simulated_devices
@needs_jax_0_10_placement
def test_sharded_states_follow_their_parameters_and_equal_the_unsharded_run():

    SPECS = {
        "wide": ((256, 1024), P("data", "model")),  # blocks of 256, one per shard
        "tall": ((512, 768), P(None, "model")),  # blocks of 192: 768 / 4 shards = 192
        "bias": ((1024,), P("model")),
        "small": ((16, 16), P()),
    }
    rng = np.random.default_rng(0)
    host = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in SPECS.items()}
    grads = [
        {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in SPECS.items()} for _ in range(3)
    ]
    # Automatic sharding: parameters placed with NamedSharding, the compiler propagates.
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in SPECS.items()}

    def expected_specs(stored, spec):
        spec = tuple(spec) + (None,) * (2 - len(spec))
        if isinstance(stored, rj.QuantizedMoment):
            if stored.dense.shape != (1,):
                return rj.QuantizedMoment(codes=P(), scales=P(), dense=P(*spec))
            return rj.QuantizedMoment(codes=P(*spec), scales=P(*spec), dense=P())
        if isinstance(stored, rj.FactoredMoment):
            if stored.dense.shape != (1,):
                return rj.FactoredMoment(row=P(), col=P(), dense=P(*spec))
            return rj.FactoredMoment(row=P(*spec[:-1]), col=P(spec[-1]), dense=P())
        return P(*spec)

    def per_parameter(average):
        if isinstance(average, rj.QuantizedMoment | rj.FactoredMoment):
            return {name: type(average)(*(tree[name] for tree in average)) for name in SPECS}
        return average

    def check_placement(mesh, state, moment_storage):
        for field in ("mu", "variance"):
            for name, stored in per_parameter(getattr(state, field)).items():
                spec = SPECS[name][1]
                if name == "small" or len(SPECS[name][0]) == 1:
                    spec = P(*spec)
                wanted = expected_specs(stored, spec)
                wanted = jax.tree.leaves(wanted, is_leaf=lambda x: isinstance(x, P))
                for array, want in zip(jax.tree.leaves(stored), wanted, strict=True):
                    assert array.sharding.is_equivalent_to(NamedSharding(mesh, want), array.ndim), (
                        moment_storage,
                        field,
                        name,
                        array.sharding,
                        want,
                    )

    def run(tx, params, jitted_step):
        state = tx.init(params)
        for g in grads:
            params, state = jitted_step(params, state, g)
        return params, state

    # Centered with momentum; and with L2 weight decay on the matrices, which the
    # preconditioner computes from the gradient and the parameters in each of its readers.
    variants: list[dict[str, Any]] = [
        {"momentum": 0.9},
        {"weight_decay": 0.01, "weight_decay_mask": {k: len(s) > 1 for k, (s, _) in SPECS.items()}},
    ]
    for moment_storage, options in itertools.product(("bfloat16", "int8", "factored"), variants):
        tx = rj.rmsprop(1e-2, centered=True, moment_storage=moment_storage, **options)

        def step(params, state, g, tx=tx):
            updates, state = tx.update(g, state, params)
            return optax.apply_updates(params, updates), state

        params = jax.device_put(host, shardings)
        sharded_grads = [jax.device_put(g, shardings) for g in grads]
        state = tx.init(params)
        check_placement(mesh, state[2], moment_storage)
        jitted = (
            jax.jit(step, donate_argnums=(0, 1)).lower(params, state, sharded_grads[0]).compile()
        )
        if moment_storage != "factored":
            # Blocks within shards: the update needs no communication at all.
            hlo = jitted.as_text()
            assert hlo is not None
            for collective in ("all-reduce", "all-gather", "all-to-all", "collective-permute"):
                assert collective not in hlo, (moment_storage, collective)
        for g in sharded_grads:
            params, state = jitted(params, state, g)
        check_placement(mesh, state[2], moment_storage)

        plain_params, plain_state = host, tx.init(host)
        plain_step = jax.jit(step)
        for g in grads:
            plain_params, plain_state = plain_step(plain_params, plain_state, g)
        # The stored averages are bit for bit the same (elementwise work, exact block maxima),
        # except factored row / column means, which may be summed in another order across
        # shards; the parameters may differ by an ulp where the compiler fuses differently.
        state_tolerance = 1e-5 if moment_storage == "factored" else 0.0
        for name in SPECS:
            np.testing.assert_allclose(params[name], plain_params[name], rtol=1e-5, atol=1e-6)
        stored = jax.tree.leaves(state[2])
        for a, b in zip(stored, jax.tree.leaves(plain_state[2]), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(
                np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=state_tolerance, atol=0
            )
