"""Per-example gradients against JAX: ``python -m fbackprop bench --per-example``.

Four per-example losses (one example in, a scalar out), each at several batch
sizes, float32:

* ``mlp``: 784-512-512-10, tanh, softmax cross-entropy;
* ``cnn``: 28x28x1, conv3x3 16 + relu, conv3x3/2 32 + relu, conv3x3/2 32 + relu,
  dense 10;
* ``transformer``: 2 pre-norm blocks (LayerNorm, causal 4-head attention, GELU
  MLP), width 128, sequence 64, vocabulary 512, the token embedding tied with
  the output projection, mean next-token cross-entropy;
* ``rnn``: tanh RNN by ``lax.scan`` over 32 steps, input 32, hidden 256, dense
  10 on the last state.

The steps compared, each ``jax.jit``-compiled:

* ``jax.grad``: ``jax.grad`` of the mean loss over the batch (no per-example
  quantity; the floor);
* ``fb.clipped_grad``: ``fb.clipped_grad(loss, C)`` (default method: the
  clipped sum by a second backward sweep that sums each use over the examples
  where it is made), and with ``method="reuse"`` (the first sweep's factors
  kept and weighted);
* ``fb.norms``: ``fb.per_example_grad_norms(loss)`` alone;
* ``vmap+clip``: ``jax.vmap(jax.grad(loss))`` then the norms, the weights and
  the weighted sum (what optax's DP aggregator is given).

Figures: the largest relative error of the norms and of the clipped gradient
against ``vmap+clip`` (max |difference| over max |reference|); compiled temp
bytes (``memory_analysis().temp_size_in_bytes``) and temp + output bytes (XLA
places temporaries in the output buffers when their lifetimes allow, which
lowers the temp bytes of a step whose outputs are parameter-sized); step time,
median of interleaved runs in one process (``vmap+clip`` is not run where its
temp bytes exceed ``--run-limit``); and, per step, the largest batch whose
compiled temp bytes fit in ``--budget`` (2 GiB), by bisection over compiled
memory analyses only (nothing runs). Goals (from the issue): temp bytes of
``fb.clipped_grad`` at most 1.1x and step time at most 1.3x those of
``jax.grad``.
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

CLIP = 1.0
GIB = 2 ** 30


# ------------------------------------------------------------------ models
def _init(key, shapes):
    keys = jax.random.split(key, len(shapes))
    return {name: jax.random.normal(k, s, jnp.float32) / np.sqrt(max(1, s[0] if len(s) > 1 else 1))
            for k, (name, s) in zip(keys, shapes.items())}


def mlp(quick):
    d_in, width = (64, 64) if quick else (784, 512)
    params = _init(jax.random.key(0), {"w1": (d_in, width), "b1": (width,), "w2": (width, width),
                                       "b2": (width,), "w3": (width, 10), "b3": (10,)})

    def loss(p, x, y):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        h = jnp.tanh(h @ p["w2"] + p["b2"])
        return -jax.nn.log_softmax(h @ p["w3"] + p["b3"])[y]

    def batch(n):
        return (jax.ShapeDtypeStruct((n, d_in), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32))
    return loss, params, batch, f"{d_in}-{width}-{width}-10 tanh"


def cnn(quick):
    side, c1, c2 = (12, 4, 8) if quick else (28, 16, 32)
    out_side = -(-(-(-side // 2)) // 2)
    params = _init(jax.random.key(1), {"k1": (3, 3, 1, c1), "b1": (c1,), "k2": (3, 3, c1, c2),
                                       "b2": (c2,), "k3": (3, 3, c2, c2), "b3": (c2,),
                                       "w": (out_side * out_side * c2, 10)})
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(p, x, y):
        h = x[None]
        h = jax.nn.relu(lax.conv_general_dilated(h, p["k1"], (1, 1), "SAME",
                                                 dimension_numbers=dn) + p["b1"])
        h = jax.nn.relu(lax.conv_general_dilated(h, p["k2"], (2, 2), "SAME",
                                                 dimension_numbers=dn) + p["b2"])
        h = jax.nn.relu(lax.conv_general_dilated(h, p["k3"], (2, 2), "SAME",
                                                 dimension_numbers=dn) + p["b3"])
        return -jax.nn.log_softmax(h.reshape(-1) @ p["w"])[y]

    def batch(n):
        return (jax.ShapeDtypeStruct((n, side, side, 1), jnp.float32),
                jax.ShapeDtypeStruct((n,), jnp.int32))
    return loss, params, batch, f"{side}x{side}x1, conv {c1}-{c2}-{c2}, dense 10"


def transformer(quick):
    vocab, d, seq, heads, blocks = (64, 32, 16, 2, 1) if quick else (512, 128, 64, 4, 2)
    shapes = {"emb": (vocab, d), "pos": (seq, d), "gf": (d,), "bf": (d,)}
    for i in range(blocks):
        shapes.update({f"g1_{i}": (d,), f"b1_{i}": (d,), f"qkv_{i}": (d, 3 * d), f"o_{i}": (d, d),
                       f"g2_{i}": (d,), f"b2_{i}": (d,), f"m1_{i}": (d, 4 * d),
                       f"m2_{i}": (4 * d, d)})
    params = _init(jax.random.key(2), shapes)
    for k in params:
        if k[0] == "g":
            params[k] = jnp.ones_like(params[k])
        elif k[0] == "b":
            params[k] = jnp.zeros_like(params[k])
    mask = np.tril(np.ones((seq, seq), bool))

    def norm(x, g, b):
        m = jnp.mean(x, -1, keepdims=True)
        v = jnp.mean((x - m) ** 2, -1, keepdims=True)
        return (x - m) * lax.rsqrt(v + 1e-5) * g + b

    def loss(p, tokens, targets):
        h = p["emb"][tokens] + p["pos"]
        for i in range(blocks):
            a = norm(h, p[f"g1_{i}"], p[f"b1_{i}"])
            q, k, v = jnp.split(a @ p[f"qkv_{i}"], 3, axis=-1)
            q, k, v = (t.reshape(seq, heads, d // heads) for t in (q, k, v))
            s = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(d // heads)
            s = jnp.where(mask, s, -1e9)
            o = jnp.einsum("hts,shd->thd", jax.nn.softmax(s, -1), v).reshape(seq, d)
            h = h + o @ p[f"o_{i}"]
            a = norm(h, p[f"g2_{i}"], p[f"b2_{i}"])
            h = h + jax.nn.gelu(a @ p[f"m1_{i}"]) @ p[f"m2_{i}"]
        logits = norm(h, p["gf"], p["bf"]) @ p["emb"].T
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, targets[:, None], 1))

    def batch(n):
        spec = jax.ShapeDtypeStruct((n, seq), jnp.int32)
        return spec, spec
    return loss, params, batch, (f"{blocks} blocks, width {d}, seq {seq}, {heads} heads, "
                                 f"vocab {vocab}, tied embedding")


def rnn(quick):
    d_in, hidden, steps = (8, 32, 8) if quick else (32, 256, 32)
    params = _init(jax.random.key(3), {"wx": (d_in, hidden), "wh": (hidden, hidden),
                                       "b": (hidden,), "wo": (hidden, 10)})

    def loss(p, xs, y):
        def step(h, x):
            return jnp.tanh(x @ p["wx"] + h @ p["wh"] + p["b"]), None
        h, _ = lax.scan(step, jnp.zeros(hidden), xs)
        return -jax.nn.log_softmax(h @ p["wo"])[y]

    def batch(n):
        return (jax.ShapeDtypeStruct((n, steps, d_in), jnp.float32),
                jax.ShapeDtypeStruct((n,), jnp.int32))
    return loss, params, batch, f"lax.scan over {steps} steps, input {d_in}, hidden {hidden}"


MODELS = {"mlp": mlp, "cnn": cnn, "transformer": transformer, "rnn": rnn}
BATCHES = {"mlp": (64, 256, 1024), "cnn": (32, 128, 512), "transformer": (8, 32, 128),
           "rnn": (32, 128, 512)}
QUICK_BATCHES = (8, 32)


def _data(specs, seed, vocab_bound):
    out = []
    for i, s in enumerate(specs):
        key = jax.random.key(seed + i)
        if jnp.issubdtype(s.dtype, jnp.integer):
            out.append(jax.random.randint(key, s.shape, 0, vocab_bound, s.dtype))
        else:
            out.append(jax.random.normal(key, s.shape, s.dtype))
    return out


# ------------------------------------------------------------------- steps
def steps(loss):
    """The compared steps, each ``step(params, *batch)``."""
    def mean_loss(p, *b):
        return jnp.mean(jax.vmap(loss, (None,) + (0,) * len(b))(p, *b))

    def vmap_clip(p, *b):
        g = jax.vmap(jax.grad(loss), (None,) + (0,) * len(b))(p, *b)
        leaves = jax.tree_util.tree_leaves(g)
        n = leaves[0].shape[0]
        norms = jnp.sqrt(sum(jnp.sum(jnp.reshape(x, (n, -1)) ** 2, axis=1) for x in leaves))
        w = jnp.minimum(1.0, CLIP / norms)
        return jax.tree_util.tree_map(lambda x: jnp.tensordot(w, x, 1), g), norms

    return {
        "jax.grad": lambda p, *b: jax.grad(mean_loss)(p, *b),
        "fb.clipped_grad": fb.clipped_grad(loss, CLIP),
        "fb.clipped_grad(reuse)": fb.clipped_grad(loss, CLIP, method="reuse"),
        "fb.clipped_grad(second_sweep)": fb.clipped_grad(loss, CLIP, method="second_sweep"),
        "fb.norms": fb.per_example_grad_norms(loss),
        "vmap+clip": vmap_clip,
    }


STEP_NAMES = ("jax.grad", "fb.clipped_grad", "fb.clipped_grad(reuse)",
              "fb.clipped_grad(second_sweep)", "fb.norms", "vmap+clip")
SHORT = {"jax.grad": "jax.grad", "fb.clipped_grad": "clipped", "fb.clipped_grad(reuse)": "reuse",
         "fb.clipped_grad(second_sweep)": "second", "fb.norms": "norms", "vmap+clip": "vmap+clip"}


def _memory(compiled) -> tuple[int, int]:
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes), int(m.temp_size_in_bytes + m.output_size_in_bytes)


def _rel(a, b) -> float:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb))
    den = max(float(jnp.max(jnp.abs(y))) for y in lb)
    return num / max(den, 1e-30)


def measure_batch(name, quick, n, reps, run_limit, log):
    loss, params, batch, _ = MODELS[name](quick)
    data = _data(batch(n), 100 + n, 10 if name != "transformer" else params["emb"].shape[0])
    fns = steps(loss)
    compiled, mem = {}, {}
    for key in STEP_NAMES:
        compiled[key] = jax.jit(fns[key]).lower(params, *data).compile()
        mem[key] = _memory(compiled[key])
    runnable = [k for k in STEP_NAMES if mem[k][0] <= run_limit]
    outs = {k: jax.block_until_ready(compiled[k](params, *data)) for k in runnable}
    row = {"batch": n, "temp": {k: mem[k][0] for k in STEP_NAMES},
           "temp_out": {k: mem[k][1] for k in STEP_NAMES}, "ran": runnable}
    if "vmap+clip" in outs:
        ref_g, ref_n = outs["vmap+clip"]
        row["err_norms"] = _rel(outs["fb.norms"], ref_n)
        row["err_clipped"] = _rel(outs["fb.clipped_grad"][0], ref_g)
        row["err_clipped_reuse"] = _rel(outs["fb.clipped_grad(reuse)"][0], ref_g)
        row["err_clipped_second"] = _rel(outs["fb.clipped_grad(second_sweep)"][0], ref_g)
        row["err_norms_clipped_grad"] = _rel(outs["fb.clipped_grad"][1], ref_n)
    # Interleaved timing: each round runs every step once, in a rotating order.
    times = {k: [] for k in runnable}
    for r in range(reps):
        order = runnable[r % len(runnable):] + runnable[:r % len(runnable)]
        for k in order:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[k](params, *data))
            times[k].append(time.perf_counter() - t0)
    row["seconds"] = {k: float(np.median(v)) for k, v in times.items()}
    print(f"  {name} batch {n}: " + ", ".join(
        f"{k} {row['seconds'][k] * 1e3:.1f} ms" for k in runnable), file=log, flush=True)
    return row


def max_batch(name, quick, key, budget, start, cap, log):
    """The largest batch whose compiled temp bytes fit in ``budget`` (doubling
    from ``start``, then bisection to within 1/16), and the compiles it took."""
    loss, params, batch, _ = MODELS[name](quick)
    fn = jax.jit(steps(loss)[key])
    cache: dict = {}

    def fits(n):
        if n not in cache:
            cache[n] = _memory(fn.lower(params, *batch(n)).compile())[0] <= budget
        return cache[n]

    if not fits(1):
        return {"max_batch": 0, "capped": False, "compiles": len(cache)}
    lo, hi = 1, start
    while fits(hi):
        lo = hi
        if hi >= cap:
            return {"max_batch": hi, "capped": True, "compiles": len(cache)}
        hi = min(2 * hi, cap)
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    print(f"  {name} {key}: max batch {lo} within {budget / GIB:.2f} GiB "
          f"({len(cache)} compiles)", file=log, flush=True)
    return {"max_batch": lo, "capped": False, "compiles": len(cache)}


# ----------------------------------------------------------------- report
def _fmt_bytes(b):
    return f"{b / 2 ** 20:.1f} MiB" if b >= 2 ** 20 else f"{b / 2 ** 10:.0f} KiB"


def table(result) -> str:
    names = STEP_NAMES[1:]
    lines = [f"**{result['name']}**: {result['description']}", "",
             "| batch | max rel. err: norms, clipped (auto / reuse / second) | temp bytes: "
             "jax.grad | " + " | ".join(SHORT[k] for k in names) + " | temp+out / jax.grad: "
             + ", ".join(SHORT[k] for k in names) + " |",
             "|---" * (4 + len(names)) + "|"]
    for row in result["rows"]:
        t, to = row["temp"], row["temp_out"]
        err = "-"
        if "err_clipped" in row:
            err = (f"{row['err_norms']:.1e}, {row['err_clipped']:.1e} / "
                   f"{row['err_clipped_reuse']:.1e} / {row['err_clipped_second']:.1e}")
        cells = [f"{_fmt_bytes(t[k])} ({t[k] / t['jax.grad']:.2f}x)" for k in names]
        lines.append(f"| {row['batch']} | {err} | {_fmt_bytes(t['jax.grad'])} | "
                     + " | ".join(cells) + " | "
                     + ", ".join(f"{to[k] / to['jax.grad']:.2f}" for k in names) + " |")
    lines += ["", "| batch | step time: jax.grad | " + " | ".join(SHORT[k] for k in names)
              + " | clipped / vmap+clip |", "|---" * (3 + len(names)) + "|"]
    for row in result["rows"]:
        s = row["seconds"]
        cells = [f"{s[k] / s['jax.grad']:.2f}x" if k in s else "not run" for k in names]
        vm = f"{s['fb.clipped_grad'] / s['vmap+clip']:.3f}" if "vmap+clip" in s else "-"
        lines.append(f"| {row['batch']} | {s['jax.grad'] * 1e3:.2f} ms | " + " | ".join(cells)
                     + f" | {vm} |")
    if result.get("max_batch"):
        mb = result["max_batch"]
        lines.append("")
        lines.append(f"largest batch within {result['budget'] / GIB:.2f} GiB of compiled temp "
                     "bytes: " + ", ".join(
                         f"{SHORT.get(k, k)} {'>=' if v['capped'] else ''}{v['max_batch']}"
                         for k, v in mb.items()))
    return "\n".join(lines)


def checks(result) -> list[tuple[str, bool]]:
    out = []
    for row in result["rows"]:
        t, s = row["temp"], row["seconds"]
        if "err_clipped" in row:
            err = max(row["err_norms"], row["err_clipped"], row["err_clipped_reuse"],
                      row["err_clipped_second"])
            out.append((f"{result['name']} batch {row['batch']}: errors {err:.1e} <= 1e-4",
                        err <= 1e-4))
        tr = t["fb.clipped_grad"] / t["jax.grad"]
        out.append((f"{result['name']} batch {row['batch']}: temp bytes fb.clipped_grad / "
                    f"jax.grad {tr:.2f} <= 1.1 (goal)", tr <= 1.1))
        sr = s["fb.clipped_grad"] / s["jax.grad"]
        out.append((f"{result['name']} batch {row['batch']}: time fb.clipped_grad / jax.grad "
                    f"{sr:.2f} <= 1.3 (goal)", sr <= 1.3))
    return out


def measure(name, quick, batches, reps, run_limit, budget, do_max, log):
    _, _, _, description = MODELS[name](quick)
    rows = [measure_batch(name, quick, n, reps, run_limit, log) for n in batches]
    result = {"name": name, "description": description, "rows": rows, "budget": budget}
    if do_max:
        cap = 1 << 14 if quick else 1 << 20
        result["max_batch"] = {k: max_batch(name, quick, k, budget, max(batches), cap, log)
                               for k in ("jax.grad", "fb.clipped_grad", "fb.clipped_grad(reuse)",
                                         "fb.clipped_grad(second_sweep)",
                                         "vmap+clip")}
    return result


def main(argv=None, prog: str = "python -m fbackprop bench --per-example") -> int:
    from fbackprop._src.cli import ArgumentParser, check_output_path
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small models and batches, few runs, no largest-batch search "
                             "(a smoke test)")
    parser.add_argument("--only", default=",".join(MODELS), metavar="NAME[,NAME]",
                        help=f"models, comma-separated ({', '.join(MODELS)})")
    parser.add_argument("--batches", default=None, metavar="N[,N]",
                        help="batch sizes (default: per model, 3 sizes)")
    parser.add_argument("--reps", type=int, default=None, metavar="N",
                        help="timed runs of each step (default 15; 3 with --quick)")
    parser.add_argument("--budget-gib", type=float, default=2.0, metavar="GIB",
                        help="the memory for the largest-batch search, in GiB of temp bytes")
    parser.add_argument("--no-max-batch", action="store_true",
                        help="skip the largest-batch search")
    parser.add_argument("--run-limit-gib", type=float, default=1.5, metavar="GIB",
                        help="do not run a step whose temp bytes exceed this")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="JSON output (default: benchmarks/results/per_example.json, or "
                             "per_example_quick.json with --quick)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    batches = None
    if args.batches:
        try:
            batches = [int(b) for b in args.batches.split(",") if b.strip()]
        except ValueError:
            parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
        if not batches or min(batches) < 1:
            parser.error(f"--batches must be positive integers, got {args.batches!r}")
    reps = args.reps if args.reps is not None else (3 if args.quick else 15)
    if reps < 1:
        parser.error(f"--reps must be at least 1, got {reps}")
    stem = "per_example_quick" if args.quick else "per_example"
    folder = os.path.join("benchmarks", "results") if os.path.isdir("benchmarks") else "out"
    json_path = args.json or os.path.join(folder, stem + ".json")
    check_output_path(parser, "--json", json_path)
    dev = jax.devices()[0]
    print(f"fbackprop {fb.__version__} per-example benchmark (jax {jax.__version__}); device: "
          f"{dev.platform} / {dev.device_kind} x{jax.device_count()}"
          f"{'; --quick' if args.quick else ''}", flush=True)
    budget = int(args.budget_gib * GIB)
    results = []
    for name in names:
        bs = batches or (QUICK_BATCHES if args.quick else BATCHES[name])
        res = measure(name, args.quick, bs, reps, int(args.run_limit_gib * GIB), budget,
                      not (args.quick or args.no_max_batch), sys.stderr)
        results.append(res)
        print()
        print(table(res))
        print()
        for text, ok in checks(res):
            print(f"  [{'ok' if ok else 'MISS'}] {text}")
    with open(json_path, "w") as f:
        json.dump({"command": " ".join([prog] + list(sys.argv[1:] if argv is None else argv)),
                   "jax": jax.__version__, "device": f"{dev.platform} / {dev.device_kind}",
                   "results": results}, f, indent=1)
    print(f"\nJSON: {json_path}")
    errors_ok = all(ok for res in results for text, ok in checks(res) if "errors" in text)
    return 0 if errors_ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
