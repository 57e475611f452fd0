"""Train a Flax Linen CNN on scikit-learn's 8x8 digits with a TrainState and rmsprop_jax.

    python examples/linen_trainstate.py                   # RMSprop, about 98% test accuracy
    python examples/linen_trainstate.py --checkpoint-dir ckpt --checkpoint-every 100
    python examples/linen_trainstate.py --checkpoint-dir ckpt --resume --epochs 40

Takes the flags of train_digits.py (--optimizer, --compare, ...) and writes the same files.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import digits_common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state


class CNN(nn.Module):
    """Two 3x3 convolutions, 2x2 average pooling, one hidden dense layer, 10 logits."""

    hidden_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(-1, 8, 8, 1)  # the 64 features are an 8x8 image, one channel
        x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(64, (3, 3), name="conv2")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden_size, name="hidden")(x))
        return nn.Dense(10, name="out")(x)


@jax.jit
def train_step(
    state: train_state.TrainState, x: jax.Array, y: jax.Array
) -> tuple[train_state.TrainState, jax.Array]:
    def loss_fn(params: Any) -> jax.Array:
        logits = state.apply_fn({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


@jax.jit
def predict(state: train_state.TrainState, x: jax.Array) -> jax.Array:
    return state.apply_fn({"params": state.params}, x)


class LinenTrainer:
    """A `TrainState` (parameters, optax state, step), replaced by each step."""

    def __init__(self, args: argparse.Namespace):
        model = CNN(args.hidden_size)
        params = model.init(jax.random.key(args.seed), jnp.zeros((1, 64)))["params"]
        tx = digits_common.make_optimizer(
            args.optimizer,
            args.learning_rate,
            momentum=args.momentum,
            bias_correction=args.bias_correction,
        )
        state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
        # TrainState.create starts from the Python int 0; an int32 array keeps the step's
        # type the same before and after a restore, so jit compiles the step once.
        self.state = state.replace(step=jnp.zeros((), jnp.int32))

    def train_step(self, x: np.ndarray, y: np.ndarray) -> jax.Array:
        self.state, loss = train_step(self.state, x, y)
        return loss

    def logits(self, x: np.ndarray) -> jax.Array:
        return predict(self.state, x)

    def checkpoint_tree(self) -> dict[str, Any]:
        return {
            "params": self.state.params,
            "opt_state": self.state.opt_state,
            "step": self.state.step,
        }

    def load_checkpoint_tree(self, tree: dict[str, Any]) -> None:
        self.state = self.state.replace(
            params=tree["params"], opt_state=tree["opt_state"], step=tree["step"]
        )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return digits_common.main(
        argv, LinenTrainer, __doc__.splitlines()[0], "Flax Linen", "outputs/linen_trainstate"
    )


if __name__ == "__main__":
    digits_common.run_cli(main)
