"""Measures fbackprop against JAX on the same functions, in one process.

For every workload both engines differentiate the same loss function:

* jitted step time: ``jax.jit(fb.value_and_grad(loss))`` vs
  ``jax.jit(jax.value_and_grad(loss))``, after warm-up, interleaved runs (the
  order alternates every round), median, ``block_until_ready`` after every call;
* compiled FLOPs (``cost_analysis``) and temp bytes (``memory_analysis``) of
  the compiled step: deterministic, machine noise does not touch them;
* trace time and trace + lower time: the cost of the first call, with a fresh
  function object each time and fbackprop's jaxpr cache cleared
  (``jax.jit(step).trace(...)`` runs fbackprop's own tracing and both sweeps, or
  JAX's linearize and transpose; ``.lower()`` then lowers the program);
* eager step time: ``fb.value_and_grad(loss)(...)`` vs
  ``jax.value_and_grad(loss)(...)`` without ``jax.jit``, after
  :data:`EAGER_WARMUP` warm-up calls (in a quick run too);
* fb gradient step / fb forward pass, next to the theoretical ~3x.

Run ``python -m fbackprop bench --help`` for the options.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import fbackprop as fb

from . import workloads as workloads_mod

# figure -> target fb/jax ratio; a ratio passes when, rounded to two decimals as
# printed, it is at most the target (for FLOPs: doing less work than JAX passes too).
TARGETS: dict[str, float] = {
    "jit_step": 1.03,
    "flops": 1.00,
    "temp_bytes": 1.00,
    "trace_only": 0.50,
    "trace_lower": 0.75,
    "eager": 0.70,
    "eager_closure": 0.70,
}
FIGURE_LABELS = {
    "jit_step": "jitted step",
    "flops": "FLOPs",
    "temp_bytes": "temp bytes",
    "trace_only": "trace only",
    "trace_lower": "trace+lower",
    "eager": "eager step",
    "eager_closure": "eager closure",
}
FIGURES = tuple(TARGETS)
# Figures that only some workload kinds have (absent elsewhere, not an error).
OPTIONAL_FIGURES = ("eager_closure",)

# LLVM's optimizations are most of XLA:CPU's compile time; a quick run compiles
# dozens of programs and hundreds of eager single-op kernels, and turning them
# off halves its run time. XLA's HLO passes still run, so the compiled FLOPs
# and temp bytes are the same as in a full run (only the step times change,
# for both engines alike).
QUICK_XLA_FLAG = "--xla_backend_optimization_level=0"

# Calls of an eager step before it is timed (see Settings.eager_warmup).
EAGER_WARMUP = 3

# A gradient that differs from JAX's by more than this (relative to the largest
# entry of JAX's) is flagged in the table: speed of a wrong answer is no speed.
AGREEMENT_TOL = 1e-3


class Settings:
    """How long to measure. ``quick`` trades precision for a run of seconds."""

    def __init__(self, quick: bool, reps: int | None = None):
        self.quick = quick
        self.step_reps = reps or (3 if quick else 21)
        self.trace_reps = 1 if quick else 15
        self.eager_reps = 1 if quick else 9
        self.min_reps = 1 if quick else 3
        # Stop adding rounds after this many seconds (once min_reps are done).
        self.step_budget = 2.0 if quick else 25.0
        self.trace_budget = 3.0 if quick else 40.0
        self.eager_budget = 2.0 if quick else 25.0
        # One sample repeats a call until it lasts this long (timer resolution).
        self.min_sample = 0.002 if quick else 0.1
        self.warmup = 1 if quick else 2
        # Eager calls reach their steady state on the fourth call: fbackprop's
        # first eager call runs op by op, the second notices the repeated
        # program, the third compiles its backward sweep (fbackprop/_src/eager.py);
        # JAX's first call compiles every op's kernel. Timing an earlier call
        # measures those one-off costs, not an eager step (in a quick run it read
        # like "20x slower"), so eager figures come after this many calls.
        self.eager_warmup = EAGER_WARMUP


# ------------------------------------------------------------------ differentiation
def differentiate(kind: str, engine: str, loss: Callable) -> Callable:
    """The step function of a workload kind, built with ``engine`` ("fb" or "jax").

    This is the code a user writes; everything else in the harness only times it.
    """
    if engine == "fb":
        value_and_grad, grad = fb.value_and_grad, fb.grad
    else:
        value_and_grad, grad = jax.value_and_grad, jax.grad
    if kind == "value_and_grad":
        return value_and_grad(loss)
    if kind == "per_example":
        return jax.vmap(grad(loss), in_axes=(None, 0))
    if kind == "hvp":
        if engine == "fb":
            def fb_hvp_step(params, tangent, batch):
                return fb.hvp(lambda p: loss(p, batch), (params,), (tangent,))
            return fb_hvp_step

        def jax_hvp_step(params, tangent, batch):
            return jax.jvp(jax.grad(lambda p: loss(p, batch)), (params,), (tangent,))[1]
        return jax_hvp_step
    raise ValueError(f"unknown workload kind {kind!r}; expected one of "
                     f"{workloads_mod.KINDS}.")


def forward_of(kind: str, loss: Callable) -> Callable:
    """The forward pass matching a step (for the gradient/forward time ratio)."""
    if kind == "per_example":
        return jax.vmap(loss, in_axes=(None, 0))
    if kind == "hvp":
        return lambda params, tangent, batch: loss(params, batch)
    return loss


def skip_reason(kind: str, aa: bool) -> str | None:
    if kind == "hvp" and not aa and not hasattr(fb, "hvp"):
        return "fbackprop.hvp does not exist yet"
    return None


def clear_fb_caches():
    """Forgets fbackprop's traced jaxprs, so the next call traces from scratch."""
    from fbackprop._src import trace
    trace.clear_cache()


# ------------------------------------------------------------------------ timing
def _block(x):
    return jax.block_until_ready(x)


def _time_once(call: Callable[[], Any], repeat: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        _block(call())
    return (time.perf_counter() - t0) / repeat


def warm_up(calls: dict[str, Callable[[], Any]], warmup: int, min_sample: float) -> dict:
    """Calls each entry ``warmup`` times (untimed work: compiles, caches) and returns
    how many calls one sample of it repeats to last ``min_sample`` seconds."""
    repeat = {}
    for name, call in calls.items():
        if warmup == 0:   # every call does the same one-off work: time it as is
            repeat[name] = 1
            continue
        t = min(_time_once(call) for _ in range(warmup))
        repeat[name] = max(1, min(100, math.ceil(min_sample / max(t, 1e-9))))
    return repeat


def time_interleaved(calls: dict[str, Callable[[], Any]], reps: int, min_reps: int,
                     budget: float, min_sample: float, warmup: int = 2,
                     discard_round: bool = True) -> dict:
    """Median seconds per call of each entry, measured in alternating order.

    Every call is warmed up first. One sample repeats a call until it lasts
    ``min_sample`` seconds; a round takes one sample of every call, in forward
    order on even rounds and reversed on odd ones, so slow drifts of the
    machine hit all entries alike. With ``discard_round`` one round is run and
    thrown away first (the first samples after a pause are slow). Rounds stop after ``reps``, or once
    ``budget`` seconds have passed and ``min_reps`` rounds are done.

    Returns:
      ``{name: {"median": s, "min": s, "samples": [s, ...], "repeat": n}}``.
    """
    repeat = warm_up(calls, warmup, min_sample)
    samples: dict[str, list] = {name: [] for name in calls}
    names = list(calls)
    gc.collect()
    if discard_round:
        for name in names:
            _time_once(calls[name], repeat[name])
    start = time.perf_counter()
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name].append(_time_once(calls[name], repeat[name]))
        if r + 1 >= min_reps and time.perf_counter() - start > budget:
            break
    return {name: {"median": statistics.median(s), "min": min(s), "samples": s,
                   "repeat": repeat[name]} for name, s in samples.items()}


def time_fresh_interleaved(makers: dict[str, Callable[[], Any]], reps: int, min_reps: int,
                           budget: float) -> tuple[dict, dict]:
    """Like :func:`time_interleaved` for one-shot work (no warm-up, no repeats).

    A full garbage collection runs before every sample (not timed), so no sample
    pays for the garbage an earlier one left.

    Returns:
      ``(timings, last_results)``: the timings as above and each maker's last result.
    """
    samples: dict[str, list] = {name: [] for name in makers}
    last: dict[str, Any] = {}
    names = list(makers)
    gc.collect()
    start = time.perf_counter()
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            last.pop(name, None)
            gc.collect()
            t0 = time.perf_counter()
            last[name] = makers[name]()
            samples[name].append(time.perf_counter() - t0)
        if r + 1 >= min_reps and time.perf_counter() - start > budget:
            break
    return ({name: {"median": statistics.median(s), "min": min(s), "samples": s,
                    "repeat": 1} for name, s in samples.items()}, last)


# ----------------------------------------------------------------------- figures
def _ratio(fb_value, jax_value):
    if fb_value is None or jax_value is None:
        return None
    if jax_value == 0:
        return 1.0 if fb_value == 0 else math.inf
    return fb_value / jax_value


def _figure(name: str, fb_value, jax_value, unit: str, **extra) -> dict:
    ratio = _ratio(fb_value, jax_value)
    target = TARGETS[name]
    passed = None if ratio is None else bool(round(ratio, 2) <= target)
    return dict(fb=fb_value, jax=jax_value, unit=unit, ratio=ratio, target=target,
                passed=passed, **extra)


def _timed_figure(name: str, timings: dict) -> dict:
    """A time figure: the ratio of medians, plus two noise-robust cross-checks.

    ``min_ratio`` compares the fastest samples (contention only ever adds time);
    ``paired_ratio`` is the median of per-round ratios (rounds are adjacent in
    time, so a slow phase of the machine hits both sides of one round).
    """
    fb, jx = timings["fb"], timings["jax"]
    return _figure(name, fb["median"], jx["median"], "s",
                   min_ratio=_ratio(fb["min"], jx["min"]),
                   paired_ratio=statistics.median(
                       f / j for f, j in zip(fb["samples"], jx["samples"])),
                   samples={k: v["samples"] for k, v in timings.items()},
                   repeat={k: v["repeat"] for k, v in timings.items()})


def _flops_of(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):   # some JAX versions return one dict per device
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _temp_bytes_of(compiled) -> int | None:
    stats = compiled.memory_analysis()
    return None if stats is None else int(stats.temp_size_in_bytes)


def max_relative_error(fb_out, jax_out) -> float | None:
    """max |fb - jax| / max |jax| over all leaves (None if the structures differ)."""
    fb_leaves = jax.tree_util.tree_leaves(fb_out)
    jax_leaves = jax.tree_util.tree_leaves(jax_out)
    if len(fb_leaves) == 2 * len(jax_leaves):   # e.g. an hvp that also returns the gradient
        fb_leaves = fb_leaves[len(jax_leaves):]
    if len(fb_leaves) != len(jax_leaves) or any(
            np.shape(a) != np.shape(b) for a, b in zip(fb_leaves, jax_leaves)):
        return None
    worst, scale = 0.0, 0.0
    for a, b in zip(fb_leaves, jax_leaves):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.size:
            worst = max(worst, float(np.max(np.abs(a - b))))
            scale = max(scale, float(np.max(np.abs(b))))
    return worst / scale if scale else worst


class _Unmeasured(Exception):
    """A figure that could not be measured because an earlier stage failed."""


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, _Unmeasured):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def run_workload(workload, settings: Settings, aa: bool = False,
                 verbose: bool = False) -> dict:
    """Measures one workload; a failure becomes an error entry, never an exception."""
    result: dict[str, Any] = {"name": workload.name, "description": workload.description,
                              "figures": {}, "errors": {}, "notes": []}
    t_start = time.perf_counter()
    fb_engine = "jax" if aa else "fb"

    def record_error(figures, exc):
        if verbose:
            traceback.print_exc()
        for f in figures:
            result["errors"][f] = _error_text(exc)

    try:
        problem = workload.build(settings.quick)
    except Exception as exc:  # noqa: BLE001  (any failure becomes an error row)
        record_error(FIGURES, exc)
        result["status"] = "error"
        return result
    result.update(sizes=problem.sizes, kind=problem.kind,
                  theory_grad_over_fwd=problem.theory_grad_over_fwd)
    reason = skip_reason(problem.kind, aa)
    if reason:
        result["status"] = "skipped"
        result["notes"].append(reason)
        return result
    kind, args = problem.kind, problem.args
    # Wall and CPU seconds per stage: where a slow run spends its time.
    result["stage_seconds"] = {}
    current = [None, 0.0, 0.0]

    def stage(name):
        wall, cpu = time.perf_counter(), time.process_time()
        if current[0] is not None:
            result["stage_seconds"][current[0]] = {"wall": wall - current[1],
                                                   "cpu": cpu - current[2]}
        current[:] = [name, wall, cpu]

    stage("trace_lower")
    # Trace + lower: fresh function objects and cleared caches every time. The
    # tracing part alone (``jit(step).trace``: our sweeps, or JAX's linearize and
    # transpose) is kept too; lowering to StableHLO costs both sides about the
    # same per equation.
    lowered = {}
    trace_only: dict[str, list] = {"fb": [], "jax": []}
    try:
        def fresh_lower(engine, side):
            def lower():
                loss = problem.make_loss()
                if engine == "fb":
                    clear_fb_caches()
                t0 = time.perf_counter()
                traced = jax.jit(differentiate(kind, engine, loss)).trace(*args)
                trace_only[side].append(time.perf_counter() - t0)
                return traced.lower()
            return lower
        # The very first trace also pays for one-time imports and rule-table
        # set-up; run one of each before timing (a quick run only checks that
        # the figure works and skips this).
        if not settings.quick:
            fresh_lower(fb_engine, "fb")()
            fresh_lower("jax", "jax")()
            for samples in trace_only.values():
                samples.clear()
        timings, lowered = time_fresh_interleaved(
            {"fb": fresh_lower(fb_engine, "fb"), "jax": fresh_lower("jax", "jax")},
            settings.trace_reps, settings.min_reps, settings.trace_budget)
        result["figures"]["trace_only"] = _timed_figure("trace_only", {
            side: {"median": statistics.median(s), "min": min(s), "samples": s, "repeat": 1}
            for side, s in trace_only.items()})
        result["figures"]["trace_lower"] = _timed_figure("trace_lower", timings)
    except Exception as exc:  # noqa: BLE001
        record_error(["trace_only", "trace_lower"], exc)

    stage("compile")
    # Compiled FLOPs and temp bytes of the compiled step.
    compiled = {}
    if lowered:
        try:
            compile_time = {}
            for side in ("fb", "jax"):
                t0 = time.perf_counter()
                compiled[side] = lowered[side].compile()
                compile_time[side] = time.perf_counter() - t0
            result["compile_seconds"] = compile_time
            result["figures"]["flops"] = _figure(
                "flops", _flops_of(compiled["fb"]), _flops_of(compiled["jax"]), "flop")
            result["figures"]["temp_bytes"] = _figure(
                "temp_bytes", _temp_bytes_of(compiled["fb"]),
                _temp_bytes_of(compiled["jax"]), "B")
        except Exception as exc:  # noqa: BLE001
            compiled = {}
            record_error(["flops", "temp_bytes"], exc)
    else:
        for f in ("flops", "temp_bytes"):
            result["errors"].setdefault(f, result["errors"].get("trace_lower", "not lowered"))

    stage("jit_step")
    # Jitted step time, with the forward pass in the same interleaved rounds.
    # The executables are the ones compiled above: exactly what jax.jit(step)
    # runs, without compiling them a second time.
    try:
        if not compiled:
            raise _Unmeasured(result["errors"].get("flops", "the step did not compile"))
        fb_step, jax_step = compiled["fb"], compiled["jax"]
        forward = jax.jit(forward_of(kind, problem.make_loss())).lower(*args).compile()
        fb_out, jax_out = _block(fb_step(*args)), _block(jax_step(*args))
        err = max_relative_error(fb_out, jax_out)
        result["max_rel_err"] = err
        if err is None:
            result["notes"].append("fb and jax outputs have different structures")
        elif not err <= AGREEMENT_TOL:
            result["notes"].append(f"fb disagrees with jax: max relative error {err:.2e}")
        timings = time_interleaved(
            {"fb": lambda: fb_step(*args), "jax": lambda: jax_step(*args),
             "forward": lambda: forward(*args)},
            settings.step_reps, settings.min_reps, settings.step_budget, settings.min_sample,
            warmup=settings.warmup,
            discard_round=not settings.quick)
        fb_t, jax_t, fwd_t = (timings[k]["median"] for k in ("fb", "jax", "forward"))
        result["figures"]["jit_step"] = _timed_figure("jit_step", timings)
        result["forward_seconds"] = fwd_t
        result["fb_grad_over_fwd"] = fb_t / fwd_t
        result["jax_grad_over_fwd"] = jax_t / fwd_t
    except Exception as exc:  # noqa: BLE001
        record_error(["jit_step"], exc)

    stage("eager")
    # Eager (no jit): what a user sees in a notebook.
    try:
        eager_loss = problem.make_loss()
        timings = time_interleaved(
            {"fb": lambda: differentiate(kind, fb_engine, eager_loss)(*args),
             "jax": lambda: differentiate(kind, "jax", eager_loss)(*args)},
            settings.eager_reps, settings.min_reps, settings.eager_budget,
            settings.min_sample, warmup=settings.eager_warmup,
            discard_round=not settings.quick)
        result["figures"]["eager"] = _timed_figure("eager", timings)
    except Exception as exc:  # noqa: BLE001
        record_error(["eager"], exc)

    # Eager with a new closure on every call, e.g. in a notebook loop
    # ``fb.value_and_grad(lambda p: loss(p, batch))(params)``: no cache keyed on
    # the function object can help here. (The hvp step closes over its batch
    # this way already.)
    if kind == "value_and_grad":
        stage("eager_closure")
        try:
            params, *rest = args

            def closure_call(engine):
                def call():
                    return differentiate(kind, engine, lambda p: eager_loss(p, *rest))(params)
                return call
            timings = time_interleaved(
                {"fb": closure_call(fb_engine), "jax": closure_call("jax")},
                settings.eager_reps, settings.min_reps, settings.eager_budget,
                settings.min_sample, warmup=settings.eager_warmup,
                discard_round=False)
            result["figures"]["eager_closure"] = _timed_figure("eager_closure", timings)
        except Exception as exc:  # noqa: BLE001
            record_error(["eager_closure"], exc)

    stage(None)
    n_ok = len(result["figures"])
    result["status"] = "ok" if not result["errors"] else ("partial" if n_ok else "error")
    result["seconds"] = time.perf_counter() - t_start
    return result


# -------------------------------------------------------------------------- meta
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Device, versions and machine, printed at the top and stored in the JSON."""
    import jaxlib
    devices = jax.devices()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "fbackprop_version": getattr(fb, "__version__", "?"),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "machine": f"{platform.system()} {platform.machine()}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


# ----------------------------------------------------------------- compiler flags
def _backend_started() -> bool:
    """Whether JAX has created its backend (after which XLA_FLAGS are ignored)."""
    try:   # private: JAX has no public query for this
        from jax._src import xla_bridge
        return bool(xla_bridge._backends)
    except (ImportError, AttributeError):
        return True   # unknown: assume too late, and leave XLA_FLAGS alone


def _use_quick_compiler_flags() -> bool:
    """Adds :data:`QUICK_XLA_FLAG` to ``XLA_FLAGS`` if no backend exists yet."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" in flags or _backend_started():
        return False
    os.environ["XLA_FLAGS"] = (flags + " " + QUICK_XLA_FLAG).strip()
    return True


def run(names: list[str] | None = None, quick: bool = False, reps: int | None = None,
        aa: bool = False, verbose: bool = False, log=sys.stderr,
        command: str | None = None) -> dict:
    """Runs the benchmark and returns the results (the JSON document as a dict).

    Args:
      names: workload names (all when empty).
      quick: tiny sizes and few repetitions.
      reps: interleaved rounds for the jitted step time.
      aa: time jax against itself (noise floor) instead of fbackprop against jax.
      verbose: print tracebacks of failures.
      log: where progress lines go.
      command: the command line to record (default: ``sys.argv``).

    Returns:
      ``{"meta": {...}, "targets": {...}, "workloads": [{...}, ...]}``.

    Example:
      >>> from fbackprop.bench import harness
      >>> doc = harness.run(["mlp"], quick=True)   # doctest: +SKIP
    """
    settings = Settings(quick, reps)
    selected = workloads_mod.get(names)
    meta = environment()
    meta.update(quick=quick, aa=aa, command=command or " ".join(sys.argv))
    results = []
    t0 = time.perf_counter()
    for i, workload in enumerate(selected, 1):
        print(f"[{i}/{len(selected)}] {workload.name} ...", end="", file=log, flush=True)
        res = run_workload(workload, settings, aa=aa, verbose=verbose)
        results.append(res)
        print(f" {res['status']} ({res.get('seconds', 0.0):.1f} s)", file=log, flush=True)
        gc.collect()
    meta["total_seconds"] = time.perf_counter() - t0
    return {"meta": meta, "targets": dict(TARGETS), "workloads": results}
