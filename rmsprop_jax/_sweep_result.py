"""`SweepResult`: the configurations of a sweep, what each returned, and the best of them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np


class Best(NamedTuple):
    """The best configuration of a sweep under one metric, from :meth:`SweepResult.best`.

    Attributes:
      index: the configuration's position along axis 0 of the sweep.
      hyperparameters: its hyperparameters, as Python numbers.
      value: its metric, as a Python number.
      results: what `train` returned for it (axis 0 removed).

    Examples:
      >>> r = rj.sweep.SweepResult({"lr": jnp.array([0.5, 0.25])}, {"loss": jnp.array([3.0, 1.0])})
      >>> best = r.best("loss")
      >>> best.index, best.hyperparameters, best.value
      (1, {'lr': 0.25}, 1.0)
    """

    index: int  # type: ignore[assignment]  # the field shadows tuple.index
    hyperparameters: dict[str, float]
    value: float
    results: Any


class SweepResult(NamedTuple):
    """The configurations of a sweep and what `train` returned for each, along axis 0.

    Returned by :func:`rmsprop_jax.sweep.run`; `hyperparameters` maps each name to one value
    per configuration and `results` is the pytree `train` returned, stacked along axis 0.

    Examples:
      >>> r = rj.sweep.SweepResult({"lr": jnp.array([0.5, 0.25])}, {"loss": jnp.array([3.0, 1.0])})
      >>> r.size, r.config(1), r.metric("loss")
      (2, {'lr': 0.25}, array([3., 1.], dtype=float32))
    """

    hyperparameters: dict[str, jax.Array]
    results: Any

    @property
    def size(self) -> int:
        """The number of configurations."""
        return int(next(iter(self.hyperparameters.values())).shape[0])

    def config(self, index: int) -> dict[str, float]:
        """The hyperparameters of configuration `index`, as Python numbers.

        Raises:
          IndexError: `index` lies outside [-size, size) (JAX indexing would clamp it and
            silently return the last or first configuration).
          TypeError: `index` is not an integer.

        Examples:
          >>> r = rj.sweep.SweepResult({"lr": jnp.array([0.5, 0.25])}, {"loss": jnp.ones(2)})
          >>> r.config(-1)
          {'lr': 0.25}
        """
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"`index` must be an integer, got {index!r}.")
        if not -self.size <= index < self.size:
            raise IndexError(
                f"`index` {index} is out of range for a sweep of {self.size} configurations."
            )
        return {name: values[index].item() for name, values in self.hyperparameters.items()}

    def metric(self, key: str | Callable[[Any], Any]) -> np.ndarray:
        """One number per configuration: `results[key]` (or attribute `key`), or `key(results)`.

        Raises:
          KeyError: the results have no entry `key`.
          ValueError: the metric is not one number per configuration.

        Examples:
          >>> r = rj.sweep.SweepResult({"lr": jnp.array([0.5, 0.25])}, {"loss": jnp.ones((2, 4))})
          >>> r.metric(lambda results: results["loss"][:, -1] * 2)
          array([2., 2.], dtype=float32)
        """
        if callable(key):
            values = key(self.results)
        elif isinstance(self.results, Mapping) and key in self.results:
            values = self.results[key]
        elif not isinstance(self.results, Mapping) and hasattr(self.results, key):
            values = getattr(self.results, key)
        else:
            raise KeyError(f"The results have no entry {key!r}; pass a name or a function.")
        values = np.asarray(values)
        if values.shape != (self.size,):
            raise ValueError(
                f"Metric {key!r} has shape {values.shape}, but needs one number per "
                f"configuration, shape ({self.size},). Reduce it first, e.g. "
                "`best(lambda r: r['loss'][:, -1])`."
            )
        return values

    def best(self, key: str | Callable[[Any], Any], mode: str = "min") -> Best:
        """The configuration with the lowest (`mode="min"`) or highest (`"max"`) metric.

        A configuration whose metric is NaN, or infinite in the direction being optimized
        (+inf for `"min"`, -inf for `"max"`), diverged: it is never the best one, even when
        every other configuration is worse. Ties go to the first configuration.

        Raises:
          ValueError: `mode` is neither "min" nor "max", the metric is not one real number per
            configuration, or no configuration is eligible (all NaN or diverged to inf).
          KeyError: the results have no entry `key`.

        Examples:
          >>> r = rj.sweep.SweepResult(
          ...     {"lr": jnp.array([0.5, 0.25])}, {"loss": jnp.array([3.0, 1.0])}
          ... )
          >>> r.best("loss").hyperparameters, r.best("loss", mode="max").value
          ({'lr': 0.25}, 3.0)
        """
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}.")
        values = self.metric(key)
        if values.dtype == object or np.iscomplexobj(values):
            raise ValueError(f"Metric {key!r} must be real numbers, got dtype {values.dtype}.")
        ranked = values.astype(np.float64)
        diverged = np.inf if mode == "min" else -np.inf
        eligible = ~np.isnan(ranked) & (ranked != diverged)
        if not np.any(eligible):
            raise ValueError(
                f"No configuration is eligible as the best under {key!r} (mode={mode!r}): every "
                f"value is NaN or {diverged}, the mark of a diverged run. Got {values.tolist()}."
            )
        # Ineligible values rank last; argmin/argmax then return the first of the best.
        if mode == "min":
            index = int(np.argmin(np.where(eligible, ranked, np.inf)))
        else:
            index = int(np.argmax(np.where(eligible, ranked, -np.inf)))
        return Best(
            index=index,
            hyperparameters=self.config(index),
            value=values[index].item(),
            results=jax.tree.map(lambda x: x[index], self.results),
        )
