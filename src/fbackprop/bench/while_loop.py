"""Reverse mode through while loops: ``python -m fbackprop bench --while``.

For each solver loop (Newton's method, an implicit layer's fixed point, an
adaptive-step ODE integrator, power iteration and Sinkhorn, each stopping at a
tolerance) it reports:

* the trip count ``T`` the loop runs at the benchmark's inputs, the number of
  saved loop states ``S``, and max |fb - reference| of the gradient, eagerly and
  under ``jax.jit``: the reference is ``jax.grad`` of the same computation with
  the loop replaced by a ``lax.scan`` of ``T`` steps (JAX cannot reverse the
  while loop itself);
* the recompute ratio, body evaluations in the backward loop per iteration,
  counted in the compiled program, at ``T`` and at the forced trip counts
  below, with the lower bound any schedule with ``S`` slots needs and
  Equinox's count (a callback in its body) at the same trip counts;
* compiled temp bytes (``memory_analysis``) of the gradient with the loop forced
  to 100, 1,000 and 10,000 iterations, against ``jax.grad`` of a ``lax.scan`` of
  the same length (and Equinox's, in the JSON);
* the jitted gradient's step time against Equinox's checkpointed while loop
  (``eqx.internal.while_loop(kind="checkpointed", checkpoints=S)``) under
  ``jax.grad``, same body, same ``S`` (Equinox counts the initial state among
  its ``S``; fbackprop keeps it besides), interleaved, median of the repetitions,
  and Equinox's own body evaluations in its backward, counted by a callback in
  the body;
* eager gradient time of a call that runs op by op (a program's first calls,
  or programs that do not repeat; after warm-up), with the loop recorded
  iteration by iteration (the default for eager calls) and with the compiled
  checkpointed loops (traced and compiled again in each call, since the loss
  defines the loop's body afresh), and of repeated calls (fbackprop's eager
  engine compiles a program that repeats).
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import sys
import time

FORCED_TRIPS = (100, 1_000, 10_000)
QUICK_FORCED_TRIPS = (100, 1_000)


# ============================================================== the problems
def newton(theta, loop=None):
    """Roots of z**3 + a z - b = 0 (elementwise) by Newton's method, to 1e-6."""
    import jax.numpy as jnp
    from jax import lax
    loop = loop or lax.while_loop
    a, b = jnp.exp(theta[0]), theta[1:]

    def g(z):
        return z ** 3 + a * z - b

    def body(c):
        (z,) = c
        return (z - g(z) / (3 * z ** 2 + a),)

    (z,) = loop(lambda c: jnp.max(jnp.abs(g(c[0]))) > 1e-6, body, (jnp.zeros_like(b),))
    return jnp.sum(z ** 2)


def fixed_point(params, x, loop=None):
    """An implicit layer: iterate z = tanh(W z + U x + c) until it moves < 1e-5."""
    import jax.numpy as jnp
    from jax import lax
    loop = loop or lax.while_loop
    W, U, c = params

    def body(s):
        z, _ = s
        z2 = jnp.tanh(W @ z + U @ x + c)
        return z2, jnp.max(jnp.abs(z2 - z))

    z, _ = loop(lambda s: s[1] > 1e-5, body, (jnp.zeros(W.shape[0], x.dtype),
                                                jnp.asarray(jnp.inf, x.dtype)))
    return jnp.sum(z * jnp.arange(1, z.shape[0] + 1))


def adaptive_ode(params, y0, loop=None):
    """dy/dt = -k y + A sin(y) to t = 2, Heun-Euler with step-size control."""
    import jax.numpy as jnp
    from jax import lax
    loop = loop or lax.while_loop
    k, A = params
    t1, rtol, atol = 2.0, 1e-3, 1e-5

    def f(y):
        return -k * y + A @ jnp.sin(y)

    def body(s):
        t, y, dt = s
        dt = jnp.minimum(dt, t1 - t)
        k1 = f(y)
        k2 = f(y + dt * k1)
        y_new = y + dt * (k1 + k2) / 2
        err = jnp.max(jnp.abs(dt * (k2 - k1) / 2) / (atol + rtol * jnp.abs(y_new)))
        ok = err <= 1.0
        factor = jnp.clip(0.9 * lax.rsqrt(jnp.maximum(err, 1e-10)), 0.2, 5.0)
        return jnp.where(ok, t + dt, t), jnp.where(ok, y_new, y), dt * factor

    zero = jnp.zeros((), y0.dtype)
    _, y, _ = loop(lambda s: s[0] < t1, body, (zero, y0, zero + 0.01))
    return jnp.sum(y ** 2)


def power_iteration(M, loop=None):
    """The top eigenvalue of M M^T + diag(0..n-1), iterating until v moves < 1e-6."""
    import jax.numpy as jnp
    from jax import lax
    loop = loop or lax.while_loop
    A = M @ M.T + jnp.diag(jnp.arange(M.shape[0], dtype=M.dtype))

    def body(s):
        v, _ = s
        w = A @ v
        w = w / jnp.linalg.norm(w)
        return w, jnp.max(jnp.abs(w - v))

    v0 = jnp.ones(M.shape[0], M.dtype) / math.sqrt(M.shape[0])
    v, _ = loop(lambda s: s[1] > 1e-6, body, (v0, jnp.asarray(jnp.inf, M.dtype)))
    return v @ A @ v


def sinkhorn(x, y, loop=None):
    """Entropic optimal transport cost (eps 0.5) between point clouds, to 1e-4."""
    import jax.numpy as jnp
    from jax import lax
    loop = loop or lax.while_loop
    C = jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, -1)
    K = jnp.exp(-C / 0.5)
    a = jnp.ones(x.shape[0], x.dtype) / x.shape[0]
    b = jnp.ones(y.shape[0], x.dtype) / y.shape[0]

    def body(s):
        u, v, _ = s
        u = a / (K @ v)
        v = b / (K.T @ u)
        return u, v, jnp.sum(jnp.abs(u * (K @ v) - a))

    u, v, _ = loop(lambda s: s[2] > 1e-4, body, (a, b, jnp.asarray(jnp.inf, x.dtype)))
    return jnp.sum(u[:, None] * K * v[None, :] * C)


def problems(size: int = 8) -> dict:
    """``name -> (function, args)``: the loss takes ``loop=`` (a ``while_loop``)."""
    import jax
    import jax.numpy as jnp
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    n = size
    return {
        "newton": (newton, (jnp.concatenate([jnp.array([0.3]),
                                             jnp.linspace(-2.0, 2.0, n)]),)),
        "fixed_point": (fixed_point, ((jax.random.normal(k[0], (n, n)) * 0.3 / math.sqrt(
            n / 5), jax.random.normal(k[1], (n, 3)), jax.random.normal(k[2], (n,)) * 0.1),
            jnp.array([0.5, -1.0, 2.0]))),
        "adaptive_ode": (adaptive_ode, ((jnp.asarray(0.7), jax.random.normal(k[0], (n, n))
                                         * 0.5 / math.sqrt(n / 3)),
                                        jnp.linspace(-1.0, 1.0, n))),
        "power_iteration": (power_iteration, (jax.random.normal(k[1], (n, n)),)),
        "sinkhorn": (sinkhorn, (jax.random.normal(k[2], (n, 2)),
                                jax.random.normal(k[3], (n + 1, 2)))),
    }


# =========================================================== loop variants
def counting_loop():
    """A while loop that also counts its iterations (``cell["n"]``)."""
    from jax import lax
    cell: dict = {}

    def loop(cond, body, init):
        def counted(c):
            x, i = c
            return body(x), i + 1
        out, cell["n"] = lax.while_loop(lambda c: cond(c[0]), counted, (init, 0))
        return out
    return loop, cell


def trip_count(fn, args) -> int:
    loop, cell = counting_loop()
    fn(*args, loop=loop)
    return int(cell["n"])


def scan_loop(n: int):
    """The loop as a ``lax.scan`` of ``n`` steps (what ``jax.grad`` can reverse)."""
    from jax import lax

    def loop(cond, body, init):
        return lax.scan(lambda c, _: (body(c), None), init, None, length=n)[0]
    return loop


def forced_loop(n: int):
    """A while loop that runs ``n`` iterations of the body, whatever the cond says."""
    import jax.numpy as jnp
    from jax import lax

    def loop(cond, body, init):
        return lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, body(c[1])),
                              (jnp.int32(0), init))[1]
    return loop


def equinox_loop(S: int, counter=None):
    """Equinox's checkpointed while loop with ``S`` checkpoints; with ``counter``
    (a list), each body evaluation appends to it through a callback."""
    import jax
    import equinox.internal as eqxi

    def loop(cond, body, init):
        if counter is not None:
            def counted(c):
                jax.debug.callback(lambda: counter.append(1))
                return body(c)
        else:
            counted = body
        return eqxi.while_loop(cond, counted, init, kind="checkpointed", checkpoints=S)
    return loop


# ================================================================ measuring
def _max_err(a, b) -> float:
    import jax
    import numpy as np
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _temp_bytes(fn, *args) -> int:
    import jax
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def _time_pair(f, g, args, reps: int) -> tuple[float, float]:
    """Median seconds of two jitted functions, interleaved, after warm-up."""
    import jax
    jax.block_until_ready(f(*args))
    jax.block_until_ready(g(*args))
    tf, tg = [], []
    for r in range(reps):
        for which, fn, out in ((0, f, tf), (1, g, tg))[::1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out.append(time.perf_counter() - t0)
    return statistics.median(tf), statistics.median(tg)


def _with_slots(fn, S):
    from fbackprop._src import context

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with context.using(while_slots=("count", S)):
            return fn(*args, **kwargs)
    return wrapped


def measure_problem(name, fn, args, S, forced, reps, log=sys.stderr) -> dict:
    import jax

    import fbackprop as fb
    from fbackprop._src.registry import call_handlers_reverse
    from fbackprop._src.rules import while_loop as wl

    row: dict = {"problem": name, "slots": S}
    T = trip_count(fn, args)
    row["trip_count"] = T
    ref = jax.grad(functools.partial(fn, loop=scan_loop(T)))(*args)
    ours = _with_slots(fn, S)
    with wl.stats() as sink:
        g_jit = jax.block_until_ready(jax.jit(fb.grad(ours))(*args))
    g_eager = fb.grad(ours)(*args)
    row["max_err_jit"] = _max_err(g_jit, ref)
    row["max_err_eager"] = _max_err(g_eager, ref)
    row["scale"] = max(float(abs(x).max()) for x in jax.tree.leaves(ref))
    (st,) = sink
    assert st["trip_count"] == T, (st, T)
    row["backward_evals"] = st["backward_evals"]
    row["recompute"] = st["backward_evals"] / max(T, 1)
    sched = wl.reference_schedule(T, S)
    row["reference_evals"] = sched["backward_evals"]
    row["lower_bound"] = sched["lower_bound"] / max(T, 1)
    print(f"  {name}: T={T}, err {row['max_err_jit']:.1e}, recompute {row['recompute']:.2f}",
          file=log, flush=True)

    # Step time against Equinox, same body and checkpoints, at T and at 1,000.
    counter: list = []
    eqx_grad = jax.grad(functools.partial(fn, loop=equinox_loop(S, counter)))
    jax.block_until_ready(eqx_grad(*args))
    counter.clear()
    g_eqx = jax.block_until_ready(eqx_grad(*args))
    row["equinox_max_err"] = _max_err(g_eqx, ref)
    row["equinox_backward_evals"] = len(counter) - T
    ours_jit = jax.jit(fb.grad(ours))
    eqx_jit = jax.jit(jax.grad(functools.partial(fn, loop=equinox_loop(S))))
    row["fb_seconds"], row["equinox_seconds"] = _time_pair(ours_jit, eqx_jit, args, reps)
    row["time_vs_equinox"] = row["fb_seconds"] / row["equinox_seconds"]
    n = 1_000

    def eqx_forced_at(n, counter=None):
        def loop(c, b, i):
            return equinox_loop(S, counter)(lambda s: s[0] < n, lambda s: (s[0] + 1, b(s[1])),
                                            (0, i))[1]
        return functools.partial(fn, loop=loop)

    ours_n = jax.jit(fb.grad(_with_slots(functools.partial(fn, loop=forced_loop(n)), S)))
    eqx_n = jax.jit(jax.grad(eqx_forced_at(n)))
    row["fb_seconds_1000"], row["equinox_seconds_1000"] = _time_pair(ours_n, eqx_n, args, reps)
    row["time_vs_equinox_1000"] = row["fb_seconds_1000"] / row["equinox_seconds_1000"]

    # At forced trip counts: compiled memory against jax.grad of a scan, body
    # evaluations in the backward (ours counted in the compiled program,
    # Equinox's by a callback in its body).
    row["memory"] = []
    for n in forced:
        forced_fn = _with_slots(functools.partial(fn, loop=forced_loop(n)), S)
        fb_bytes = _temp_bytes(fb.grad(forced_fn), *args)
        scan_bytes = _temp_bytes(jax.grad(functools.partial(fn, loop=scan_loop(n))), *args)
        eqx_bytes = _temp_bytes(jax.grad(eqx_forced_at(n)), *args)
        with wl.stats() as sink:
            jax.block_until_ready(jax.jit(fb.grad(forced_fn))(*args))
        (st,) = sink
        counter.clear()
        jax.block_until_ready(jax.grad(eqx_forced_at(n, counter))(*args))
        sched = wl.reference_schedule(n, S)
        assert st["backward_evals"] == sched["backward_evals"], (st, sched)
        row["memory"].append({"trip_count": n, "fb_temp_bytes": fb_bytes,
                              "scan_temp_bytes": scan_bytes, "equinox_temp_bytes": eqx_bytes,
                              "recompute": st["backward_evals"] / n,
                              "equinox_recompute": (len(counter) - n) / n,
                              "lower_bound": sched["lower_bound"] / n})
        print(f"    T={n}: fb {fb_bytes:,} B, equinox {eqx_bytes:,} B, scan {scan_bytes:,} B, "
              f"recompute fb "
              f"{st['backward_evals'] / n:.2f}, equinox {(len(counter) - n) / n:.2f}",
              file=log, flush=True)

    # Eager. A program's first calls (and programs that do not repeat) run op by
    # op: measured with fbackprop's compiled eager programs off, after warm-up
    # calls (JAX compiles each primitive once per shape), the loop recorded
    # iteration by iteration (the default) or run by the compiled loops (whose
    # body is traced afresh in each call, as a loss defines it). Repeated calls
    # of one program then run a compiled program (the loops inside it traced).
    from fbackprop._src import context, eager
    handler = call_handlers_reverse["while"]
    grad_fn = fb.grad(ours)

    def eager_seconds(compiled: bool, calls: int, programs: bool) -> float:
        saved = handler.max_eqns
        handler.max_eqns = 0 if compiled else saved
        eager.clear()
        try:
            out = []
            with context.using(eager_programs=programs):
                for _ in range(calls):
                    t0 = time.perf_counter()
                    jax.block_until_ready(grad_fn(*args))
                    out.append(time.perf_counter() - t0)
            return statistics.median(out[2:])
        finally:
            handler.max_eqns = saved

    row["eager_recorded_seconds"] = eager_seconds(False, 5, programs=False)
    row["eager_compiled_seconds"] = eager_seconds(True, 5, programs=False)
    row["eager_repeated_seconds"] = eager_seconds(False, 8, programs=True)
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'problem':<16} {'T':>5} {'S':>3} {'max|fb-ref|':>11} {'recompute':>9} "
            f"{'bound':>5} {'eqx rec.':>8} {'temp B @100':>11} {'@1k':>9} {'@10k':>9} "
            f"{'scan @10k':>11} {'fb/eqx':>6} {'@1k':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = {m["trip_count"]: m for m in r["memory"]}

        def b(n, key="fb_temp_bytes"):
            return f"{mem[n][key]:,}" if n in mem else "-"
        eqx_rec = r["equinox_backward_evals"] / max(r["trip_count"], 1)
        lines.append(
            f"{r['problem']:<16} {r['trip_count']:>5} {r['slots']:>3} "
            f"{max(r['max_err_jit'], r['max_err_eager']):>11.1e} {r['recompute']:>9.2f} "
            f"{r['lower_bound']:>5.2f} {eqx_rec:>8.2f} {b(100):>11} {b(1000):>9} "
            f"{b(10000):>9} {b(10000, 'scan_temp_bytes'):>11} {r['time_vs_equinox']:>6.2f} "
            f"{r['time_vs_equinox_1000']:>5.2f}")
    lines.append("")
    lines.append(f"{'problem':<16} {'recompute fb/eqx @100':>21} {'@1k':>11} {'@10k':>11}   "
                 f"{'eager op by op: recorded':>24} {'compiled':>9}   "
                 f"{'repeated':>9}")
    for r in rows:
        rec = {m["trip_count"]: f"{m['recompute']:.2f}/{m['equinox_recompute']:.2f}"
               for m in r["memory"]}
        lines.append(
            f"{r['problem']:<16} {rec.get(100, '-'):>21} {rec.get(1000, '-'):>11} "
            f"{rec.get(10000, '-'):>11}   "
            f"{r['eager_recorded_seconds']:>22.3f} s {r['eager_compiled_seconds']:>7.3f} s"
            f"   {r['eager_repeated_seconds']:>7.3f} s")
    return "\n".join(lines)


def main(argv=None, prog: str = "python -m fbackprop bench --while", *,
         environment=None) -> int:
    """``python -m fbackprop bench --while`` (the benchmark harness calls it, with
    its ``environment()``, which describes the machine for the JSON)."""
    from fbackprop._src.cli import ArgumentParser, check_output_path

    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=None, metavar="S",
                        help="saved loop states per loop (default: fbackprop's default, 64)")
    parser.add_argument("--size", type=int, default=8, metavar="N",
                        help="problem size (state dimension)")
    parser.add_argument("--reps", type=int, default=None, metavar="N",
                        help="interleaved timing rounds (default 15, quick 3)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                        help="run only these problems (repeatable): newton, fixed_point, "
                             "adaptive_ode, power_iteration, sinkhorn")
    parser.add_argument("--quick", action="store_true",
                        help="forced trip counts 100 and 1,000 only, few repetitions")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="JSON output (default benchmarks/results/while.json, "
                             "while_quick.json with --quick)")
    args = parser.parse_args(argv)
    from fbackprop._src.rules import while_loop as wl
    S = args.slots if args.slots is not None else wl.DEFAULT_SLOTS
    if S < 1:
        parser.error(f"--slots must be >= 1, got {S}")
    if args.size < 2:
        parser.error(f"--size must be >= 2, got {args.size}")
    probs = problems(args.size)
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()] or \
        list(probs)
    unknown = [n for n in names if n not in probs]
    if unknown:
        parser.error(f"unknown problem(s) {', '.join(unknown)}; choose from {', '.join(probs)}")
    reps = args.reps or (3 if args.quick else 15)
    forced = QUICK_FORCED_TRIPS if args.quick else FORCED_TRIPS
    out = os.path.join("benchmarks", "results") if os.path.isdir("benchmarks") \
        else "bench_results"
    json_path = args.json or os.path.join(out, "while_quick.json" if args.quick
                                          else "while.json")
    check_output_path(parser, "--json", json_path)
    meta = environment() if environment is not None else {}
    meta.update(command=" ".join([prog] + list(sys.argv[1:] if argv is None else argv)),
                slots=S, size=args.size, reps=reps)
    print(f"while loops reversed on {meta.get('device_kind', '?')} "
          f"({meta.get('platform', '?')}), jax {meta.get('jax_version', '?')}, "
          f"S = {S} saved loop states", flush=True)
    rows = [measure_problem(n, *probs[n], S, forced, reps) for n in names]
    print(table(rows))
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {json_path}")
    return 0

