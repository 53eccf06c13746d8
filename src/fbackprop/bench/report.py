"""Presenting benchmark results: the header, the table, JSON values and the plot."""

from __future__ import annotations

import math

import numpy as np

from .harness import FIGURE_LABELS, FIGURES, OPTIONAL_FIGURES, TARGETS


def json_default(x):
    """``json.dump`` fallback for numpy scalars and arrays."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def header(meta: dict, quick: bool = False, aa: bool = False) -> str:
    mode = "quick" if quick else "full"
    lines = [
        (f"fbackprop {meta['fbackprop_version']} vs jax {meta['jax_version']} "
         f"(jaxlib {meta['jaxlib_version']}), {mode} run, {meta['date']}"),
        (f"device: {meta['platform']} / {meta['device_kind']} x{meta['device_count']}   "
         f"CPU: {meta['cpu_model']}, {meta['cpu_count']} CPUs "
         f"({meta['cpus_usable']} usable)   python {meta['python']}"),
    ]
    if meta.get("xla_flags"):
        lines.append(f"XLA_FLAGS={meta['xla_flags']}")
    if aa:
        lines.append("A/A run: the 'fb' column is jax itself; ratios show the noise floor.")
    if quick:
        lines.append(QUICK_NOTE)
    return "\n".join(lines)


QUICK_NOTE = ("quick run: a smoke test (tiny sizes, few repetitions, LLVM optimizations off). "
              "Its times (taken after warm-up calls, as in a full run) are smoke-test "
              "numbers, not measurements, and get no PASS/MISS; FLOPs and temp bytes are "
              "exact for its sizes. Run without --quick to measure.")


def _judged(doc: dict, fig: dict) -> bool:
    """Whether a figure gets a PASS/MISS verdict: not the times of a quick run."""
    return not (doc["meta"].get("quick") and fig.get("unit") == "s")


def _fmt_seconds(s):
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt_si(x, unit):
    if x is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def fmt_value(value, unit):
    if unit == "s":
        return _fmt_seconds(value)
    if unit == "B":
        if value is None:
            return "-"
        for scale, prefix in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
            if value >= scale:
                return f"{value / scale:.3g} {prefix}"
        return f"{value} B"
    return _fmt_si(value, "")


def fmt_ratio(r):
    if r is None:
        return "-"
    if math.isinf(r):
        return "inf"
    return f"{r:.2f}" if r < 100 else f"{r:.0f}"


def _target_text(figure):
    return f"{TARGETS[figure]:.2f}" if figure == "flops" else f"<= {TARGETS[figure]:.2f}"


_COLS = (("workload", 18), ("figure", 13), ("fb", 11), ("jax", 11), ("fb/jax", 7),
         ("target", 8), ("", 4))


def _row(*cells):
    out = []
    for (_, width), cell in zip(_COLS, cells):
        out.append(f"{cell:<{width}}")
    return " ".join(out).rstrip()


def table(doc: dict) -> str:
    """The results as a fixed-width text table (one block per workload)."""
    lines = [_row(*(name for name, _ in _COLS)), "-" * 80]
    n_pass = n_miss = n_err = 0
    for res in doc["workloads"]:
        name = res["name"]
        lines.append(_row(name, "", "", "", "", "", "").rstrip() +
                     (f"  ({res['sizes']})" if res.get("sizes") else ""))
        if res.get("status") == "skipped":
            lines.append(_row("", "SKIPPED", "", "", "", "", "") + "  " +
                         "; ".join(res["notes"]))
            lines.append("")
            continue
        for figure in FIGURES:
            label = FIGURE_LABELS[figure]
            fig = res["figures"].get(figure)
            if fig is None and figure in OPTIONAL_FIGURES and figure not in res["errors"]:
                continue
            if fig is None:
                err = res["errors"].get(figure, "not measured")
                lines.append(_row("", label, "ERROR", "", "", _target_text(figure), "") +
                             "  " + err[:110])
                n_err += 1
                continue
            verdict = "-" if fig["passed"] is None or not _judged(doc, fig) else \
                ("PASS" if fig["passed"] else "MISS")
            n_pass += verdict == "PASS"
            n_miss += verdict == "MISS"
            extra = ""
            if fig.get("min_ratio") is not None:
                extra = (f"  min {fmt_ratio(fig['min_ratio'])}, paired "
                         f"{fmt_ratio(fig['paired_ratio'])}, n={len(fig['samples']['fb'])}")
            lines.append(_row("", label, fmt_value(fig["fb"], fig["unit"]),
                              fmt_value(fig["jax"], fig["unit"]), fmt_ratio(fig["ratio"]),
                              _target_text(figure), verdict) + extra)
        if "fb_grad_over_fwd" in res:
            theory = res.get("theory_grad_over_fwd")
            lines.append(_row("", "step/forward", f"{res['fb_grad_over_fwd']:.2f}x",
                              f"{res['jax_grad_over_fwd']:.2f}x", "",
                              f"~{theory:g}" if theory else "-", "") +
                         f"  (forward {_fmt_seconds(res['forward_seconds'])})")
        if res.get("max_rel_err") is not None:
            flag = "" if res["max_rel_err"] <= 1e-3 else "  WRONG"
            lines.append(_row("", "max rel err", f"{res['max_rel_err']:.1e}", "", "", "",
                              "") + flag)
        for note in res.get("notes", []):
            lines.append(_row("", "note", "", "", "", "", "") + note)
        lines.append("")
    total = doc['meta'].get('total_seconds', 0.0)
    if doc["meta"].get("quick"):
        lines.append(f"{n_pass} PASS, {n_miss} MISS, {n_err} ERROR on FLOPs and temp bytes   "
                     f"(total {total:.0f} s)")
        lines.append(QUICK_NOTE)
    else:
        lines.append(f"{n_pass} PASS, {n_miss} MISS, {n_err} ERROR   (total {total:.0f} s)")
    return "\n".join(lines)


def markdown_table(doc: dict) -> str:
    """The results as a Markdown table: one row per workload, one column per figure."""
    head = ["workload"] + [f"{FIGURE_LABELS[f]} ({_target_text(f)})" for f in FIGURES] + \
        ["step/fwd fb (jax), ~3", "max rel err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in doc["workloads"]:
        cells = [res["name"]]
        if res.get("status") == "skipped":
            cells += ["skipped: " + "; ".join(res["notes"])] + [""] * (len(head) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        for figure in FIGURES:
            fig = res["figures"].get(figure)
            if fig is None and figure in OPTIONAL_FIGURES and figure not in res["errors"]:
                cells.append("-")
            elif fig is None:
                cells.append("ERROR")
            else:
                verdict = "" if fig["passed"] is None or not _judged(doc, fig) else \
                    (" PASS" if fig["passed"] else " **MISS**")
                cell = fmt_ratio(fig["ratio"]) + verdict
                if fig.get("paired_ratio") is not None:
                    cell += f" (paired {fmt_ratio(fig['paired_ratio'])})"
                cells.append(cell)
        if "fb_grad_over_fwd" in res:
            cells.append(f"{res['fb_grad_over_fwd']:.2f} ({res['jax_grad_over_fwd']:.2f})")
        else:
            cells.append("-")
        err = res.get("max_rel_err")
        cells.append("-" if err is None else f"{err:.0e}")
        lines.append("| " + " | ".join(cells) + " |")
    errors = [(res["name"], f, e) for res in doc["workloads"]
              for f, e in res.get("errors", {}).items()]
    seen = set()
    for name, _, err in errors:
        if (name, err) not in seen:
            seen.add((name, err))
            lines.append(f"\n{name}: `{err[:200]}`")
    return "\n".join(lines)


def plot(doc: dict, path: str) -> str:
    """Writes a PNG with one panel per figure (fb/jax ratio per workload, target line).

    Returns:
      A line saying where the plot went, or why there is none.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    import os
    names = [res["name"] for res in doc["workloads"]]
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(3.0 * len(FIGURES),
                                                       0.42 * len(names) + 1.5), sharey=True)
    y = np.arange(len(names))
    # Bars of log10(fb/jax) from 0 (equal to JAX): left of the line fbackprop
    # is better, right is worse; clipped at 1/16x and 16x.
    limit = math.log10(16.0)
    ticks = [0.1, 0.3, 1.0, 3.0, 10.0]
    for ax, figure in zip(axes, FIGURES):
        for yi, res in zip(y, doc["workloads"]):
            f = res["figures"].get(figure)
            r = None if f is None else f["ratio"]
            if r is None or not math.isfinite(r) or r <= 0:
                label = "skipped" if res.get("status") == "skipped" else (
                    "n/a" if f is None and figure in OPTIONAL_FIGURES
                    and figure not in res.get("errors", {}) else "error")
                ax.text(0.0, yi, label, va="center", ha="center", fontsize=7, color="gray")
                continue
            color = "tab:gray" if f["passed"] is None or not _judged(doc, f) else \
                ("tab:green" if f["passed"] else "tab:red")
            width = max(-limit, min(limit, math.log10(r)))
            ax.barh(yi, width, color=color, alpha=0.85)
            ax.text(width, yi, f" {r:.2f} " + ("+" if math.log10(r) > limit else ""),
                    va="center", ha="left" if width >= 0 else "right", fontsize=7)
        ax.axvline(math.log10(TARGETS[figure]), color="k", linestyle="--", linewidth=1)
        ax.axvline(0.0, color="k", linewidth=0.6)
        ax.set_xlim(-limit * 1.35, limit * 1.35)
        ax.set_xticks([math.log10(t) for t in ticks], [f"{t:g}" for t in ticks], fontsize=7)
        ax.set_title(f"{FIGURE_LABELS[figure]}: fb/jax\n(target {_target_text(figure)}, "
                     f"dashed)", fontsize=9)
    axes[0].invert_yaxis()
    axes[0].set_yticks(y, names, fontsize=8)
    meta = doc["meta"]
    fig.suptitle(f"fbackprop vs jax {meta['jax_version']} on {meta['platform']} "
                 f"({meta['device_kind']}), {meta['date']}; left of 1: fbackprop is "
                 f"faster / smaller", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"
