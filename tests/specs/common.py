"""The spec type: one row of the rule table the parametrized tests iterate over."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to test one primitive (or a small function built around it).

    Attributes:
      name: unique test id.
      fn: function of positional arrays, written with jax.lax/jax.numpy.
      shapes: shape of each positional input (float inputs unless ``make_args``).
      domain: (low, high) for uniform inputs, or one pair per input.
      dtypes: float dtypes to test in.
      make_args: optional ``(rng, dtype) -> tuple of inputs`` when uniform floats
        do not fit (integer indices, ties, sorted data...). Non-float inputs are
        not differentiated.
      order: highest derivative order checked (1 or 2).
      tol: {dtype name: (atol, rtol)} overrides of the default tolerance.
      modes: which of "rev", "fwd" apply.
    """
    name: str
    fn: Callable
    shapes: Sequence[tuple] = ((3, 4),)
    domain: tuple = (-2.0, 2.0)
    dtypes: Sequence[str] = ("float32", "float64")
    make_args: Callable | None = None
    order: int = 2
    tol: dict | None = None
    modes: Sequence[str] = ("rev", "fwd")

    def args(self, dtype: str, seed: int = 0) -> tuple:
        rng = np.random.default_rng(seed)
        if self.make_args is not None:
            return tuple(self.make_args(rng, np.dtype(dtype)))
        domains = self.domain if isinstance(self.domain[0], (tuple, list)) \
            else [self.domain] * len(self.shapes)
        return tuple(rng.uniform(lo, hi, size=s).astype(dtype)
                     for s, (lo, hi) in zip(self.shapes, domains))
