"""Two small training tasks that tell whether a `moment_storage` format changes what RMSprop learns.

- digits: scikit-learn's 8x8 digits, a fixed stratified 80/20 split, an MLP 64-256-256-10 with
  ReLU, minibatches of 64, cross-entropy. The two 256-wide layers are what int8 (>= 4096
  elements) and factored (both axes >= 128) compress; the output layer stays float32.
- least squares: min_W ||X W - Y||^2 / (2n) with X (2048 x 256) of condition number 1000 (its
  singular values log-spaced from 10 to 0.01), W (256 x 128), Y = X W* + noise of std 0.01;
  full batch, so the only noise is the optimizer's.

Both train with a cosine-decayed learning rate, so the final loss is a converged figure and not
the level of a constant-step oscillation. A seed fixes the initialization and the minibatch
order (digits) or the data (least squares); the split, the model and the steps are the same for
every format, so differences between formats are paired.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DIGITS_HIDDEN = (256, 256)
DIGITS_BATCH = 64


def digits_data() -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Standardized (with training statistics) train and test features, and their labels."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-3
    as_f32 = lambda a: jnp.asarray((a - mean) / std, jnp.float32)  # noqa: E731
    return as_f32(x_train), jnp.asarray(y_train), as_f32(x_test), jnp.asarray(y_test)


def _init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> list[dict[str, jax.Array]]:
    layers = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        key, subkey = jax.random.split(key)
        weight = jax.random.normal(subkey, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in)
        layers.append({"w": weight, "b": jnp.zeros(fan_out)})
    return layers


def _mlp(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def _cross_entropy(params: list[dict[str, jax.Array]], x: jax.Array, y: jax.Array) -> jax.Array:
    logits = _mlp(params, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def make_digits_run(
    optimizer: Callable[[optax.Schedule], optax.GradientTransformation], steps: int
) -> Callable[[ArrayLike], dict[str, jax.Array]]:
    """A jitted `run(seed) -> {"train_loss", "test_accuracy"}` after `steps` minibatch steps."""
    x_train, y_train, x_test, y_test = digits_data()
    sizes = (x_train.shape[1], *DIGITS_HIDDEN, 10)
    tx = optimizer(optax.cosine_decay_schedule(1.0, steps))

    @jax.jit
    def run(seed: jax.Array) -> dict[str, jax.Array]:
        key = jax.random.key(seed)
        params = _init_mlp(jax.random.fold_in(key, 0), sizes)
        batch_key = jax.random.fold_in(key, 1)

        def step(carry, index):
            params, state = carry
            rows = jax.random.randint(
                jax.random.fold_in(batch_key, index), (DIGITS_BATCH,), 0, x_train.shape[0]
            )
            grads = jax.grad(_cross_entropy)(params, x_train[rows], y_train[rows])
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
        predictions = jnp.argmax(_mlp(params, x_test), axis=-1)
        return {
            "train_loss": _cross_entropy(params, x_train, y_train),
            "test_accuracy": jnp.mean(predictions == y_test),
        }

    return run


def least_squares_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2048, 256)) * np.logspace(-2, 1, 256)
    w_true = rng.normal(size=(256, 128))
    y = x @ w_true + 0.01 * rng.normal(size=(2048, 128))
    return x.astype(np.float32), y.astype(np.float32)


def make_least_squares_run(
    optimizer: Callable[[optax.Schedule], optax.GradientTransformation], steps: int
) -> Callable[[Any, Any], dict[str, jax.Array]]:
    """A jitted `run(x, y) -> {"train_loss"}` after `steps` full-batch steps from W = 0."""
    tx = optimizer(optax.cosine_decay_schedule(1.0, steps))

    def loss(w, x, y):
        return 0.5 * jnp.mean(jnp.sum((x @ w - y) ** 2, axis=-1))

    @jax.jit
    def run(x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        w = jnp.zeros((x.shape[1], y.shape[1]))

        def step(carry, _):
            w, state = carry
            updates, state = tx.update(jax.grad(loss)(w, x, y), state, w)
            return (optax.apply_updates(w, updates), state), None

        (w, _), _ = jax.lax.scan(step, (w, tx.init(w)), length=steps)
        return {"train_loss": loss(w, x, y)}

    return run
