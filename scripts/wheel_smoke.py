"""Smoke test of an installed rmsprop-jax: run it in an environment holding only the wheel.

Imports the package from site-packages (refusing a source checkout), then makes one jitted
update with every variant, every `moment_storage` format and each framework preset, and checks
that each update is finite, nonzero and moves the parameters downhill on a quadratic
(`sum(p**2) / 2`, whose gradient is `p`). Exits non-zero on the first failure.

    python scripts/wheel_smoke.py
"""

from __future__ import annotations

import os
import sys

# Run from a directory without the source tree, so `import rmsprop_jax` finds the wheel.
sys.path = [p for p in sys.path if p not in ("", os.getcwd(), os.path.dirname(__file__))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import rmsprop_jax as rj  # noqa: E402

VARIANTS = {
    "plain": {},
    "centered": {"centered": True},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "bias_correction": {"bias_correction": True},
    "coupled_weight_decay": {"weight_decay": 1e-2},
    "decoupled_weight_decay": {"weight_decay": 1e-2, "decoupled_weight_decay": True},
}
STORAGES = ("float32", "bfloat16", "int8", "factored")


def presets() -> dict[str, optax.GradientTransformation]:
    return {
        "torch_rmsprop": rj.compat.torch_rmsprop(1e-2),
        "keras_rmsprop": rj.compat.keras_rmsprop(1e-2),
        "tf1_rmsprop": rj.compat.tf1_rmsprop(1e-2),
    }


def check(name: str, tx: optax.GradientTransformation) -> None:
    params = {"w": jnp.linspace(-1.0, 1.0, 256 * 64).reshape(256, 64), "b": jnp.ones((64,))}

    @jax.jit
    def step(params, state):
        updates, state = tx.update(params, state, params)  # gradient of sum(p**2)/2 is p
        return optax.apply_updates(params, updates), state

    new, _ = step(params, tx.init(params))
    for key in params:
        before, after = np.asarray(params[key]), np.asarray(new[key])
        if not np.all(np.isfinite(after)):
            raise SystemExit(f"{name}: non-finite parameters after one update ({key})")
        if not np.sum(after**2) < np.sum(before**2):
            raise SystemExit(f"{name}: one update did not decrease sum(p**2) ({key})")
    print(f"ok  {name}")


def main() -> None:
    where = os.path.dirname(rj.__file__)
    print(f"rmsprop_jax {rj.__version__} from {where}; jax {jax.__version__}")
    if "site-packages" not in where:
        raise SystemExit(f"imported rmsprop_jax from {where}, not from an installed wheel")
    for variant, options in VARIANTS.items():
        check(f"rmsprop {variant}", rj.rmsprop(1e-2, **options))
    for storage in STORAGES:
        check(f"rmsprop moment_storage={storage}", rj.rmsprop(1e-2, moment_storage=storage))
    for name, tx in presets().items():
        check(name, tx)
    print("wheel smoke test passed")


if __name__ == "__main__":
    main()
