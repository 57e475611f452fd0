"""Train a Flax NNX CNN on scikit-learn's 8x8 digits with rmsprop_jax (or an optax baseline).

    python examples/train_digits.py                       # RMSprop, about 98% test accuracy
    python examples/train_digits.py --compare             # all optimizers, one figure + table
    python examples/train_digits.py --checkpoint-dir ckpt --checkpoint-every 100
    python examples/train_digits.py --checkpoint-dir ckpt --resume --epochs 60

Writes history_<optimizer>.json and .png (or compare.json, .md and .png) into --out.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import digits_common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class CNN(nnx.Module):
    """Two 3x3 convolutions, 2x2 average pooling, one hidden dense layer, 10 logits."""

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.hidden = nnx.Linear(4 * 4 * 64, hidden_size, rngs=rngs)
        self.out = nnx.Linear(hidden_size, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(-1, 8, 8, 1)  # the 64 features are an 8x8 image, one channel
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
        return self.out(jax.nn.relu(self.hidden(x)))


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    def loss_fn(model: CNN) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model: CNN, x: jax.Array) -> jax.Array:
    return model(x)


class NNXTrainer:
    """The model and its `nnx.Optimizer`, seen by the shared loop as plain arrays."""

    def __init__(self, args: argparse.Namespace):
        self.model = CNN(args.hidden_size, rngs=nnx.Rngs(args.seed))
        tx = digits_common.make_optimizer(
            args.optimizer,
            args.learning_rate,
            momentum=args.momentum,
            bias_correction=args.bias_correction,
        )
        self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> jax.Array:
        return train_step(self.model, self.optimizer, jnp.asarray(x), jnp.asarray(y))

    def logits(self, x: np.ndarray) -> jax.Array:
        return predict(self.model, jnp.asarray(x))

    def checkpoint_tree(self) -> dict[str, Any]:
        # nnx.as_pure strips the Variable wrappers: the optimizer state is then exactly the
        # optax state (rj.ScaleByRmsState, optax.TraceState, ...) with array leaves.
        return {
            "params": nnx.as_pure(nnx.state(self.model, nnx.Param)),
            "opt_state": nnx.as_pure(self.optimizer.opt_state),
            "step": self.optimizer.step[...],
        }

    def load_checkpoint_tree(self, tree: dict[str, Any]) -> None:
        nnx.update(self.model, tree["params"])
        nnx.update(self.optimizer.opt_state, nnx.state(tree["opt_state"]))
        self.optimizer.step[...] = tree["step"]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return digits_common.main(
        argv, NNXTrainer, __doc__.splitlines()[0], "Flax NNX", "outputs/train_digits"
    )


if __name__ == "__main__":
    digits_common.run_cli(main)
