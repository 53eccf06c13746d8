"""Per-example gradient quantities in one backward sweep (norms, clipping, variance).

* :mod:`.factored` -- a parameter's per-example cotangent kept as factors
  (``L^T R`` per use) and the algebra on it: norms, sums over examples, second
  moments.
* :mod:`.sweep` -- the per-example sweep: where the backward sweep makes and
  passes on factored cotangents, and the ``scan`` / checkpoint handlers that
  keep them factored through loops and recomputed regions.
* :mod:`.api` -- ``per_example_grad_norms``, ``clipped_grad``, ``per_example_stats``.

The engine (a lower layer) never imports this package: the sweep running now is
the ``per_example`` field of the sweep context (:mod:`fbackprop._src.context`),
and the engine calls its methods (``handler``, ``apply_rule``, ``symbolic``,
``add``).
"""
