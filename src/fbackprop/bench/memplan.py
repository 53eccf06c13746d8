"""Memory-budget plans against JAX's hand policies, in compiled figures.

``python -m fbackprop bench --memplan`` (``--quick`` for small sizes). Two
scan-over-layers models, the layers stacked on a leading axis and run by
``lax.scan`` (the standard way to build deep nets in JAX; on XLA:CPU the
forward and backward loops are separate there, so what is not kept is really
not kept - in one unrolled program XLA reschedules and checkpointing changes
nothing in compiled temp bytes):

* ``transformer``: 4 pre-norm causal transformer blocks (seq 256, width 256,
  4 heads, GELU MLP of width 1024);
* ``mlp``: 64 residual MLP blocks ``x + tanh(x W1 + b1) W2 + b2`` (width 64,
  hidden 256, batch 1024).

For each model the step is ``grad(mean(stack(params, x) ** 2))`` and the
table compares, all compiled with ``jax.jit``:

* plain: no checkpoint (``fb.grad`` and ``jax.grad``);
* JAX's hand policies under ``jax.grad``, placed on each block (the body of
  the scan): ``nothing_saveable``, ``dots_saveable``,
  ``dots_with_no_batch_dims_saveable``, and checkpoint-per-block (plain
  ``jax.checkpoint`` of the block, which saves only its inputs: the same
  program as ``nothing_saveable`` here); the same policies under ``fb.grad``;
* ``fb.checkpoint(stack, memory_budget=b)`` for budgets ``b`` of 25%, 50%
  and 75% of the plain residual bytes (the whole stack is the region: the
  planner decides which per-step values each step keeps).

Figures: kept residual bytes (fbackprop's plan), compiled temp bytes
(``memory_analysis().temp_size_in_bytes``) and compiled FLOPs, both
deterministic. XLA's ``cost_analysis()['flops']`` counts a while loop's body
once whatever its trip count (a 64-layer scan costs one layer there), which
would make a plan that runs a scan as two shorter scans look twice as
expensive; the FLOPs here are counted on the same compiled HLO with every
loop body times its trip count (:mod:`fbackprop.bench.hloflops`, which
reproduces ``cost_analysis`` when trip counts are taken as 1). XLA's own
figure is in the JSON too (``xla_flops``). The checks: gradients
equal ``jax.grad`` of the plain function; kept bytes within the budget;
compiled temp bytes fall with the budget; at each budget the compiled FLOPs
are no higher than those of the best JAX hand policy whose compiled temp
bytes fit in the plan's (strictly lower on at least one budget); at 50% the
recompute FLOPs are well below those of recomputing everything. The curve
(more budgets) is drawn next to the policies' points and written as a PNG.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import fbackprop as fb

from . import hloflops

P = jax.checkpoint_policies
BUDGETS = (0.25, 0.5, 0.75)
CURVE_BUDGETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
JAX_POLICIES = {
    "nothing_saveable": P.nothing_saveable,
    "dots_saveable": P.dots_saveable,
    "dots_with_no_batch_dims_saveable": P.dots_with_no_batch_dims_saveable,
    "checkpoint-per-block": None,
}


# ----------------------------------------------------------------- the models
def _normal(rng, *shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def mlp_params(layers=64, width=64, hidden=256, batch=1024, seed=0):
    """Residual MLP blocks stacked on a leading axis: ``(params, x)``."""
    rng = np.random.default_rng(seed)
    params = {"w1": _normal(rng, layers, width, hidden, scale=width ** -0.5),
              "b1": jnp.zeros((layers, hidden), jnp.float32),
              "w2": _normal(rng, layers, hidden, width, scale=hidden ** -0.5),
              "b2": jnp.zeros((layers, width), jnp.float32)}
    return params, _normal(rng, batch, width)


def mlp_block(x, p):
    return x + jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def transformer_params(blocks=4, seq=256, width=256, batch=1, seed=0):
    """Pre-norm causal transformer blocks stacked on a leading axis: ``(params, x)``."""
    rng = np.random.default_rng(seed)
    params = {"wqkv": _normal(rng, blocks, width, 3 * width, scale=width ** -0.5),
              "wo": _normal(rng, blocks, width, width, scale=width ** -0.5),
              "w1": _normal(rng, blocks, width, 4 * width, scale=width ** -0.5),
              "w2": _normal(rng, blocks, 4 * width, width, scale=(4 * width) ** -0.5),
              "g1": jnp.ones((blocks, width), jnp.float32),
              "g2": jnp.ones((blocks, width), jnp.float32)}
    return params, _normal(rng, batch, seq, width)


def _layer_norm(x, gain):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + 1e-5) * gain


def transformer_block(x, p, heads=4):
    seq, width = x.shape[-2:]

    def split_heads(t):
        return t.reshape(*t.shape[:-1], heads, width // heads).swapaxes(-2, -3)

    q, k, v = map(split_heads, jnp.split(_layer_norm(x, p["g1"]) @ p["wqkv"], 3, axis=-1))
    scores = q @ k.swapaxes(-1, -2) / float(np.sqrt(width // heads))
    scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, -1e9)
    attended = (jax.nn.softmax(scores, axis=-1) @ v).swapaxes(-2, -3).reshape(x.shape)
    x = x + attended @ p["wo"]
    return x + jax.nn.gelu(_layer_norm(x, p["g2"]) @ p["w1"]) @ p["w2"]


SIZES = {
    "transformer": {"full": dict(blocks=4, seq=256, width=256),
                    "quick": dict(blocks=4, seq=16, width=16)},
    "mlp": {"full": dict(layers=64, width=64, hidden=256, batch=1024),
            "quick": dict(layers=64, width=8, hidden=32, batch=16)},
}
MODELS = {"transformer": (transformer_params, transformer_block,
                          "4 pre-norm causal transformer blocks (4 heads), scan over blocks"),
          "mlp": (mlp_params, mlp_block, "64 residual MLP blocks, scan over layers")}


def stack_of(block):
    """``stack(params, x)``: the blocks run by ``lax.scan``."""
    def stack(params, x):
        y, _ = lax.scan(lambda h, p: (block(h, p), None), x, params)
        return y
    return stack


def per_block(block, policy):
    """The stack with ``jax.checkpoint(block, policy=policy)`` as the scan body."""
    body = jax.checkpoint(lambda h, p: (block(h, p), None), policy=policy)

    def stack(params, x):
        y, _ = lax.scan(body, x, params)
        return y
    return stack


def loss_of(stack):
    return lambda params, x: jnp.mean(stack(params, x) ** 2)


# ------------------------------------------------------------------ measuring
def compiled(fun, *args, executable: list | None = None) -> dict:
    """Temp bytes and FLOPs of ``jax.jit(fun)(*args)``, compiled: ``temp``,
    ``flops`` (every loop trip counted) and ``xla_flops`` (XLA's figure).
    ``executable``: a list to append the compiled program to."""
    c = jax.jit(fun).lower(*args).compile()
    if executable is not None:
        executable.append(c)
    cost = c.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return {"temp": int(c.memory_analysis().temp_size_in_bytes),
            "flops": hloflops.compiled_flops(c), "xla_flops": float(cost["flops"])}


def _max_abs_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y)))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def measure(name: str, quick: bool = False, budgets=BUDGETS, curve=(), sizes=None,
            log=None, policies=tuple(JAX_POLICIES), fb_policies: bool = True) -> dict:
    """All figures of one model (see the module docstring).

    Args:
      name: ``"transformer"`` or ``"mlp"``.
      quick: the small sizes (``SIZES[name]["quick"]``).
      budgets: the budgets of the table (fractions of the plain residual bytes).
      curve: more budgets, compiled for the curve only.
      sizes: override the model sizes.
      log: a stream for progress lines.
      policies: the names of :data:`JAX_POLICIES` to compile.
      fb_policies: also compile the policies under ``fb.grad``.

    Returns:
      A dict with ``rows`` (one per case: kind, engine, name, temp bytes,
      FLOPs, and for budgets the kept and budget bytes and planner figures),
      the plain residual bytes, sizes, and the trade-off curve from
      ``fb.memory_plan``.
    """
    make, block, description = MODELS[name]
    sizes = dict(sizes or SIZES[name]["quick" if quick else "full"])
    params, x = make(**sizes)
    stack = stack_of(block)
    plain_loss = loss_of(stack)

    def say(msg):
        if log is not None:
            print(msg, file=log, flush=True)

    rows = []
    t0 = time.perf_counter()
    rows.append(dict(kind="plain", engine="fb", name="plain",
                     **compiled(fb.grad(plain_loss), params, x)))
    exe: list = []
    rows.append(dict(kind="plain", engine="jax", name="plain",
                     **compiled(jax.grad(plain_loss), params, x, executable=exe)))
    reference = exe[0](params, x)
    say(f"  {name}: plain compiled ({time.perf_counter() - t0:.1f} s)")
    engines = (("jax", jax.grad), ("fb", fb.grad)) if fb_policies else (("jax", jax.grad),)
    for pname in policies:
        loss = loss_of(per_block(block, JAX_POLICIES[pname]))
        for engine, grad in engines:
            rows.append(dict(kind="policy", engine=engine, name=pname,
                             **compiled(grad(loss), params, x)))
    say(f"  {name}: policies compiled ({time.perf_counter() - t0:.1f} s)")
    curve_info = fb.memory_plan(stack, params, x, budgets=sorted(set(budgets) | set(curve)))
    for b in sorted(set(budgets) | set(curve)):
        loss = loss_of(fb.checkpoint(stack, memory_budget=b))
        exe = []
        figures = compiled(fb.grad(loss), params, x, executable=exe)
        plan = fb.saved_residuals(loss, params, x).plans[0]     # (planned once, cached)
        err = _max_abs_diff(exe[0](params, x), reference) if b in budgets else None
        rows.append(dict(kind="budget", engine="fb", name=f"{b:.0%}", budget=b,
                         **figures, kept_bytes=plan.kept_bytes,
                         budget_bytes=plan.budget_bytes, plain_bytes=plan.plain_bytes,
                         recompute_flops=plan.recompute_flops,
                         recompute_all_flops=plan.recompute_all_flops,
                         search_seconds=plan.search_seconds, plan_seconds=plan.seconds,
                         max_abs_err=err, in_table=b in budgets))
        say(f"  {name}: budget {b:.0%} compiled ({time.perf_counter() - t0:.1f} s)")
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(reference))
    return {"name": name, "description": description, "sizes": sizes, "rows": rows,
            "grad_scale": scale, "curve": curve_info.as_dicts(), "seconds":
            time.perf_counter() - t0}


def _row(result, kind, engine, name):
    for r in result["rows"]:
        if (r["kind"], r["engine"], r["name"]) == (kind, engine, name):
            return r
    raise KeyError((kind, engine, name))


def best_policy_that_fits(result, temp: int, engine: str = "jax"):
    """The JAX hand policy (under ``engine``) of fewest FLOPs whose compiled temp
    bytes are at most ``temp``, or None."""
    fits = [r for r in result["rows"] if r["kind"] == "policy" and r["engine"] == engine
            and r["temp"] <= temp]
    return min(fits, key=lambda r: r["flops"]) if fits else None


def checks(result, tol: float = 1e-4) -> list[tuple[str, bool]]:
    """The claims of the module docstring, as (description, passed) pairs."""
    rows = [r for r in result["rows"] if r["kind"] == "budget" and r["in_table"]]
    rows.sort(key=lambda r: r["budget"])
    out = []
    for r in rows:
        out.append((f"{r['name']}: gradient equals jax.grad of the plain function "
                    f"(max abs diff {r['max_abs_err']:.1e})",
                    r["max_abs_err"] <= tol * max(result["grad_scale"], 1.0)))
        out.append((f"{r['name']}: kept {r['kept_bytes']:,} <= budget {r['budget_bytes']:,} "
                    f"bytes", r["kept_bytes"] <= r["budget_bytes"]))
    temps = [r["temp"] for r in rows] + [_row(result, "plain", "fb", "plain")["temp"]]
    out.append(("compiled temp bytes fall with the budget "
                f"({', '.join(f'{t:,}' for t in temps)}; the last is plain)",
                all(a < b for a, b in zip(temps, temps[1:]))))
    strictly = False
    for r in rows:
        best = best_policy_that_fits(result, r["temp"])
        if best is None:
            out.append((f"{r['name']}: no JAX policy fits in {r['temp']:,} temp bytes", True))
            continue
        out.append((f"{r['name']}: FLOPs {r['flops']:,.0f} <= {best['flops']:,.0f} of "
                    f"{best['name']} (the best JAX policy within {r['temp']:,} temp bytes)",
                    r["flops"] <= best["flops"]))
        strictly = strictly or r["flops"] < best["flops"]
    out.append(("strictly fewer FLOPs than that policy on at least one budget", strictly))
    half = [r for r in rows if r["budget"] == 0.5]
    if half:
        r = half[0]
        out.append((f"50%: recomputes {r['recompute_flops'] / r['recompute_all_flops']:.1%} "
                    f"of the FLOPs of recomputing everything (at most 2/3)",
                    r["recompute_flops"] <= 2 / 3 * r["recompute_all_flops"]))
    return out


# ------------------------------------------------------------------- reports
def table(result) -> str:
    """The markdown table of one model."""
    plain_fb = _row(result, "plain", "fb", "plain")
    plain_jax = _row(result, "plain", "jax", "plain")
    policies = [r for r in result["rows"] if r["kind"] == "policy" and r["engine"] == "jax"]
    lines = [f"**{result['name']}**: {result['description']}; sizes {result['sizes']}", "",
             "| case | kept bytes | compiled temp bytes | temp / jax.grad plain | compiled FLOPs "
             "| FLOPs / jax.grad plain | " + " | ".join(f"FLOPs / {p['name']}" for p in policies)
             + " | best JAX policy within the temp |",
             "|---" * (7 + len(policies)) + "|"]

    def line(label, r, kept=""):
        best = best_policy_that_fits(result, r["temp"])
        ratios = " | ".join(f"{r['flops'] / p['flops']:.4f}" for p in policies)
        return (f"| {label} | {kept} | {r['temp']:,} | {r['temp'] / plain_jax['temp']:.3f} | "
                f"{r['flops']:,.0f} | {r['flops'] / plain_jax['flops']:.4f} | {ratios} | "
                f"{best['name'] if best else '-'} |")

    lines.append(line("jax.grad plain", plain_jax))
    lines.append(line("fb.grad plain", plain_fb))
    for r in policies:
        lines.append(line(f"jax.grad, {r['name']} per block", r))
    for r in result["rows"]:
        if r["kind"] == "policy" and r["engine"] == "fb":
            lines.append(line(f"fb.grad, {r['name']} per block", r))
    for r in sorted((r for r in result["rows"] if r["kind"] == "budget" and r["in_table"]),
                    key=lambda r: r["budget"]):
        kept = f"{r['kept_bytes']:,} of {r['budget_bytes']:,}"
        lines.append(line(f"fb.checkpoint(memory_budget={r['budget']})", r, kept))
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> str:
    """Draws, per model, compiled temp bytes against compiled FLOPs: the budget
    curve next to JAX's hand policies; and the planner's own curve."""
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    fig = Figure(figsize=(12.0, 4.8 * len(results)))
    mib = 2.0 ** 20
    for i, res in enumerate(results):
        ax = fig.add_subplot(len(results), 2, 2 * i + 1)
        plain = _row(res, "plain", "jax", "plain")
        budget_rows = sorted((r for r in res["rows"] if r["kind"] == "budget"),
                             key=lambda r: r["temp"])
        ax.plot([r["temp"] / mib for r in budget_rows],
                [r["flops"] / plain["flops"] for r in budget_rows], marker="o",
                label="fb.checkpoint(memory_budget=b)")
        for r in budget_rows:
            ax.annotate(r["name"], (r["temp"] / mib, r["flops"] / plain["flops"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        markers = iter("sD^vP*Xh")
        for r in res["rows"]:
            if r["kind"] == "policy" and r["engine"] == "jax":
                ax.scatter([r["temp"] / mib], [r["flops"] / plain["flops"]], s=70, zorder=3,
                           marker=next(markers, "o"), label=f"jax.grad, {r['name']}")
        for engine, marker in (("jax", "x"), ("fb", "+")):
            r = _row(res, "plain", engine, "plain")
            ax.scatter([r["temp"] / mib], [r["flops"] / plain["flops"]], marker=marker,
                       s=90, color="black", zorder=3, label=f"{engine}.grad, no checkpoint")
        ax.set_xlabel("compiled temp bytes (MiB)")
        ax.set_ylabel("compiled FLOPs / plain jax.grad")
        ax.set_title(f"{res['name']}: compiled step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax2 = fig.add_subplot(len(results), 2, 2 * i + 2)
        curve = res["curve"]
        pts = sorted((p for p in curve["points"] if p.get("feasible", True)),
                     key=lambda p: p["kept_bytes"])
        ax2.plot([p["kept_bytes"] / mib for p in pts],
                 [p["recompute_flops"] / 1e6 for p in pts], marker="o", drawstyle="steps-post",
                 label="fbackprop plan")
        hull = sorted(curve["hull"], key=lambda p: p["kept_bytes"])
        ax2.plot([p["kept_bytes"] / mib for p in hull], [p["recompute_flops"] / 1e6 for p in hull],
                 alpha=0.35, label="lower convex hull")
        markers = iter("sD^vP*Xh")
        for pname, p in curve["policies"].items():
            ax2.scatter([p["kept_bytes"] / mib], [p["recompute_flops"] / 1e6], s=70,
                        marker=next(markers, "o"), zorder=3, label=pname)
        ax2.set_xlabel("residual bytes kept (MiB)")
        ax2.set_ylabel("recompute FLOPs (M), fbackprop's estimate")
        ax2.set_title(f"{res['name']}: the planner's trade-off curve")
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return f"plot: {path}"


def main(argv=None, prog: str = "python -m fbackprop bench --memplan") -> int:
    from fbackprop._src.cli import ArgumentParser, check_output_dir
    parser = ArgumentParser(
        prog=prog, description="Memory-budget plans against JAX's hand policies: compiled "
        "temp bytes and FLOPs of scan-over-layers models, and the trade-off curve.")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, the policies under jax.grad only, and XLA_FLAGS+="
                             "--xla_backend_optimization_level=0 (LLVM's optimizations off: "
                             "the same temp bytes and FLOPs, compiled several times faster)")
    parser.add_argument("--only", default="transformer,mlp",
                        help="models, comma-separated (transformer, mlp)")
    parser.add_argument("--out", default="out", help="directory for the PNG and JSON")
    parser.add_argument("--no-curve", action="store_true",
                        help="compile only the table's budgets (no extra curve points)")
    args = parser.parse_args(argv)
    if args.quick:
        from .harness import _use_quick_compiler_flags
        _use_quick_compiler_flags()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    check_output_dir(parser, "--out", args.out)     # before minutes of compiling, not after
    print(f"fbackprop {fb.__version__} memory-budget benchmark (jax {jax.__version__}, "
          f"{jax.devices()[0].platform}){' --quick' if args.quick else ''}", flush=True)
    results = []
    for name in names:
        res = measure(name, args.quick, curve=() if args.no_curve else CURVE_BUDGETS,
                      log=sys.stderr, fb_policies=not args.quick)
        results.append(res)
        print()
        print(table(res))
        print()
        for text, ok in checks(res):
            print(f"  [{'ok' if ok else 'FAIL'}] {text}")
        plan_rows = [r for r in res["rows"] if r["kind"] == "budget"]
        print(f"  planning (search only): at most "
              f"{max(r['search_seconds'] for r in plan_rows) * 1e3:.0f} ms per region; "
              f"with both traces at most {max(r['plan_seconds'] for r in plan_rows):.2f} s")
    os.makedirs(args.out, exist_ok=True)
    stem = "memplan_quick" if args.quick else "memplan"
    json_path = os.path.join(args.out, stem + ".json")
    with open(json_path, "w") as f:
        json.dump({"command": " ".join([prog] + list(argv if argv is not None
                                                      else sys.argv[1:])),
                   "jax": jax.__version__, "results": results}, f, indent=1,
                  default=lambda o: float(o) if isinstance(o, (np.floating, np.integer))
                  else str(o))
    png = os.path.join(args.out, stem + "_curve.png")
    print(f"\nJSON: {json_path}")
    print(plot(results, png))
    failed = [t for res in results for t, ok in checks(res) if not ok]
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
