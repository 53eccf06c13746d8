"""Benchmarks of fbackprop against JAX: step time, FLOPs, memory, tracing, eager.

Run ``python -m fbackprop bench`` (or ``python benchmarks/run.py``); see
``benchmarks/README.md`` for what each figure means.
"""

from .cli import main
from .harness import TARGETS, run, run_workload
from .workloads import WORKLOADS, Problem, Workload

__all__ = ["TARGETS", "WORKLOADS", "Problem", "Workload", "main", "run", "run_workload"]
