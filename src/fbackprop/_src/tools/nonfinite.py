"""The NaN/Inf report of :func:`fbackprop.checked_grad`: the error, the sites and
their statistics, and the hints shown for the primitives whose derivatives are
commonly non-finite."""

from __future__ import annotations

import collections
import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax, tree_util

from .. import compat
from .. import context


# ============================================================ 3. NaN/Inf provenance

# Why a primitive's derivative is commonly non-finite, shown under the report.
_BACKWARD_HINTS = {
    "sqrt": "d/dx sqrt(x) = 1/(2 sqrt(x)) is infinite at x = 0 (e.g. the norm of a zero "
            "vector). Use sqrt(x + eps), or a safe norm that avoids differentiating sqrt at 0 "
            "(jnp.where(x > 0, x, 1) inside, then where(x > 0, sqrt, 0) outside).",
    "rsqrt": "d/dx x^(-1/2) = -x^(-3/2)/2 is infinite at x = 0; add a small eps.",
    "log": "d/dx log(x) = 1/x is infinite at x = 0. If a jnp.where masks the log branch, "
           "the masked branch still gets 0 * inf = NaN: make its input safe too "
           "(log(where(x > 0, x, 1))).",
    "div": "d(x/y)/dy = -x/y^2 is infinite where y = 0 (also in a masked branch: "
           "guard the denominator, e.g. y = where(y == 0, 1, y)).",
    "pow": "d/dx x^y = y x^(y-1) is infinite at x = 0 for y < 1, and d/dy = log(x) x^y "
           "is NaN for x <= 0.",
    "integer_pow": "x^n with n < 0 has an infinite derivative at x = 0.",
    "atan2": "atan2 has no derivative at (0, 0).",
    "acos": "d/dx acos(x) = -1/sqrt(1 - x^2) is infinite at |x| = 1; clip x slightly inside.",
    "asin": "d/dx asin(x) = 1/sqrt(1 - x^2) is infinite at |x| = 1; clip x slightly inside.",
    "cbrt": "d/dx cbrt(x) is infinite at x = 0.",
}
_FORWARD_HINTS = {
    "log": "log(x) is -inf at x = 0 and NaN for x < 0.",
    "sqrt": "sqrt(x) is NaN for x < 0.",
    "div": "x / 0 is inf (0 / 0 is NaN).",
    "exp": "exp overflows to inf for large inputs (about x > 88 in float32); use "
           "jax.nn.logsumexp / log_softmax style formulations.",
    "pow": "x^y is NaN for x < 0 and non-integer y, inf for x = 0 and y < 0.",
    "rsqrt": "1/sqrt(x) is inf at x = 0 and NaN for x < 0.",
}


class NonFiniteError(FloatingPointError):
    """A NaN or Inf reached the loss or the gradient; the message says where it started."""

    def __init__(self, message, site=None):
        super().__init__(message)
        self.site = site


@dataclasses.dataclass(frozen=True)
class NonFiniteSite:
    """Where the first non-finite value that matters was produced.

    Attributes:
      primitive: the primitive's name (e.g. ``"sqrt"``).
      phase: ``"forward"``, ``"backward"`` (a VJP rule), ``"backward (re-running a
        custom rule)"`` (an operation of a custom_jvp rule or a custom_vjp bwd,
        evaluated for the backward pass) or ``"input"`` (the value came in
        through an argument).
      source: the user's ``file:line (function)`` that created the equation.
      code: that line's source text.
      produced: per output, ``(label, aval, n_nan, n_inf)`` of the non-finite ones.
      inputs: per input of the forward op / VJP rule, ``(label, aval, min, max,
        n_nan, n_inf)`` (min/max over finite elements).
      results: the affected results, e.g. ``("gradient args[0]",)``.
      batch_index: which example of a ``vmap`` batch this is (None otherwise).
      context: the enclosing loop steps and branches, outermost first, as
        ``("scan", step, "file:line")`` (the step reading ``xs[step]``),
        ``("cond", 1 or 0, "file:line")`` (``lax.cond``'s true or false branch)
        or ``("switch", branch, "file:line")``; ``()`` outside loops and branches.
    """
    primitive: str
    phase: str
    source: str
    code: str
    produced: tuple
    inputs: tuple
    results: tuple
    batch_index: tuple | None = None
    context: tuple = ()

    @property
    def steps(self) -> tuple:
        """Per enclosing scan, outermost first: ``(step, "file:line")``."""
        return tuple((i, w) for kind, i, w in self.context if kind == "scan")

    @property
    def where(self) -> str:
        """``source`` with its loop steps and branches, e.g.
        ``"m.py:12 (f) in step 37 of the scan at m.py:30"``."""
        def part(kind, i, w):
            if kind == "scan":
                return f" in step {i} of the scan at {w}"
            if kind == "cond":
                return f" in the {'true' if i else 'false'} branch of the cond at {w}"
            if kind == "switch":
                return f" in branch {i} of the switch at {w}"
            if kind == "while":
                return f" in iteration {i} of the while_loop at {w}"
            if kind == "custom_jvp rule":
                return f" in the JVP rule of the custom_jvp function called at {w}"
            if kind == "custom_vjp bwd":
                return f" in the bwd rule of the custom_vjp function called at {w}"
            return f" in the {kind} function called at {w}"
        return self.source + "".join(part(*c) for c in reversed(self.context))


def _inner_origin(node, s, bad_finals, batch_index):
    """The operation of a ``while_loop`` body that first made its carry non-finite,
    from the body's statistics at that iteration (or None when no iteration did)."""
    inner = node["inner"]
    off, n = inner["offset"], len(inner["avals"])
    rows = s[off:off + n]
    iteration, found = s[off + n, 0], s[off + n, 1]
    if not found:
        return None
    bad = (rows[:, 2] + rows[:, 3]) > 0
    acc = np.zeros(n, bool)
    for o in inner["outvars"]:
        if o is not None and bad[o]:
            acc[o] = True
    hit = None
    for e in reversed(inner["eqns"]):
        if any(bad[o] and acc[o] for o in e["outs"]):
            hit = e
            for i in e["ins"]:
                if i is not None:
                    acc[i] = True
    if hit is None:
        return None
    produced = tuple((f"output {k}", inner["avals"][o], int(rows[o, 2]), int(rows[o, 3]))
                     for k, o in enumerate(hit["outs"]) if bad[o])
    inputs = tuple((f"input {k}", inner["avals"][i] if i is not None else "literal",
                    float(rows[i, 0]) if i is not None else np.nan,
                    float(rows[i, 1]) if i is not None else np.nan,
                    int(rows[i, 2]) if i is not None else 0,
                    int(rows[i, 3]) if i is not None else 0,
                    inner["labels"][i] if i is not None else "")
                   for k, i in enumerate(hit["ins"]))
    context = tuple(node.get("context", ())) + (("while", int(iteration), inner["where"]),)
    site = NonFiniteSite(hit["primitive"], "forward", hit["source"], hit["code"], produced,
                         tuple(x[:6] for x in inputs), tuple(bad_finals), batch_index, context)
    return site, inputs


def _fmt_num(v) -> str:
    v = float(v)
    if np.isnan(v):
        return "nan"
    return f"{v:.6g}"


def _fmt_range(mn, mx, n_nan, n_inf) -> str:
    parts = []
    if np.isfinite(mn) or np.isfinite(mx):
        parts.append(f"min {_fmt_num(mn)}, max {_fmt_num(mx)}" if mn != mx
                     else f"value {_fmt_num(mn)}")
    elif not (np.isnan(mn) and np.isnan(mx)):
        parts.append("no finite elements")
    if n_nan:
        parts.append(f"{int(n_nan)} NaN")
    if n_inf:
        parts.append(f"{int(n_inf)} inf")
    return "; ".join(parts) if parts else "(empty)"


@tree_util.register_pytree_node_class
class NonFiniteReport:
    """The result of a checked gradient: ok, or where a NaN/Inf started.

    A pytree (like ``checkify``'s error value), so it can be returned from
    ``jax.jit`` and ``jax.vmap``. Check it outside the transformation with
    :meth:`throw` (raises :class:`NonFiniteError`) or :meth:`get` (the message
    or ``None``).
    """

    def __init__(self, stats, meta):
        self.stats = stats          # [..., n_values, 4]: min, max, n_nan, n_inf
        self.meta = meta            # static description of the recorded graph

    def tree_flatten(self):
        return (self.stats,), self.meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(children[0], meta)

    # ------------------------------------------------------------ analysis
    def _concrete(self):
        if compat.is_tracer(self.stats):
            raise TypeError(
                "This NonFiniteReport holds traced values: return it from the jitted/"
                "vmapped function and call .throw() / .get() on the result outside.")
        return np.asarray(self.stats)

    def _analyze(self):
        stats = self._concrete()
        n_values = len(self.meta["values"])
        n_rows = self.meta.get("rows", n_values)
        flat = stats.reshape(-1, n_rows, 4) if n_rows else stats.reshape(-1, 0, 4)
        batch_shape = stats.shape[:-2]
        finals = self.meta["finals"]
        for b in range(flat.shape[0]):
            s = flat[b]
            bad = (s[:n_values, 2] + s[:n_values, 3]) > 0
            bad_finals = [label for label, i in finals if bad[i]]
            if bad_finals:
                index = tuple(int(i) for i in np.unravel_index(b, batch_shape)) \
                    if batch_shape else None
                return self._origin(s, bad, bad_finals, index)
        return None

    def _origin(self, s, bad, bad_finals, batch_index):
        meta = self.meta
        nodes, events = meta["nodes"], meta["events"]
        acc = np.zeros(len(bad), bool)
        for _, i in meta["finals"]:
            acc[i] |= bad[i]
        reach = np.zeros(len(nodes), bool)
        # Backwards over the recorded events: a node matters if one of its
        # non-finite outputs flows (through non-finite values) into a result.
        for ev in reversed(events):
            if ev[0] == "node":
                n = ev[1]
                if any(bad[o] and acc[o] for _, o, owned in nodes[n]["outputs"] if owned):
                    reach[n] = True
                    for i in nodes[n]["deps"]:
                        acc[i] = True
            elif ev[0] == "pick":
                # A cond's result: only the branch taken (its index's value) counts.
                _, total, parts, index = ev
                if bad[total] and acc[total]:
                    b = int(np.clip(s[index, 0], 0, len(parts) - 1))
                    acc[parts[b]] = True
            else:
                _, total, parts = ev
                if bad[total] and acc[total]:
                    for p in parts:
                        acc[p] = True
        hits = np.flatnonzero(reach)
        values = meta["values"]
        if len(hits) == 0:
            # No equation made it non-finite: it came in through an input.
            leaves = [values[i]["label"] for _, i in meta["finals"] if bad[i]]
            return NonFiniteSite("(input)", "input", "", "", (), (), tuple(bad_finals),
                                 batch_index), leaves
        node = nodes[int(hits[0])]
        from_inputs = [values[i]["label"] for i in node["deps"]
                       if bad[i] and values[i]["leaf"]]
        if from_inputs:
            # The first operation that matters was handed a non-finite input.
            return NonFiniteSite("(input)", "input", node["source"], node["code"], (), (),
                                 tuple(bad_finals), batch_index), from_inputs
        if node.get("inner") is not None:
            found = _inner_origin(node, s, bad_finals, batch_index)
            if found is not None:
                return found
        produced = tuple((label, values[o]["aval"], int(s[o, 2]), int(s[o, 3]))
                         for label, o, _ in node["outputs"] if bad[o])
        inputs = tuple((label, values[i]["aval"], float(s[i, 0]), float(s[i, 1]),
                        int(s[i, 2]), int(s[i, 3]), values[i]["label"])
                       for label, i in node["inputs"])
        site = NonFiniteSite(node["primitive"], node["phase"], node["source"], node["code"],
                             produced, tuple(x[:6] for x in inputs), tuple(bad_finals),
                             batch_index, node.get("context", ()))
        return site, inputs

    def first(self) -> NonFiniteSite | None:
        """The first equation whose non-finite output matters, or None if all is finite."""
        found = self._analyze()
        return None if found is None else found[0]

    @property
    def ok(self) -> bool:
        """True when the loss and every gradient are finite."""
        return self._analyze() is None

    def get(self) -> str | None:
        """The report's message, or None when everything is finite."""
        found = self._analyze()
        return None if found is None else self._message(*found)

    def throw(self):
        """Raises :class:`NonFiniteError` with the report if something is non-finite."""
        found = self._analyze()
        if found is not None:
            raise NonFiniteError(self._message(*found), found[0])

    def _message(self, site, extra) -> str:
        lines = [f"Non-finite value in the gradient computation of "
                 f"'{self.meta['function']}': {', '.join(site.results)} "
                 f"{'is' if len(site.results) == 1 else 'are'} NaN/Inf."]
        if site.batch_index is not None:
            lines.append(f"(first affected example of the vmapped batch: index "
                         f"{site.batch_index})")
        if site.phase == "input":
            where = f" (first used at {site.source})" if site.source else ""
            lines.append(f"No equation produced it: the non-finite value comes straight from "
                         f"the inputs: {', '.join(dict.fromkeys(extra))}{where}. Check the "
                         f"data passed in.")
            return "\n".join(lines)
        in_rule = site.phase == "backward (re-running a custom rule)"
        what = ("evaluated in the backward pass, by a custom rule" if in_rule
                else "its VJP rule, in the backward pass" if site.phase.startswith("backward")
                else "the forward pass")
        lines.append(f"The first operation producing a non-finite value that reaches "
                     f"{'it' if len(site.results) == 1 else 'them'}:")
        lines.append(f"  {site.primitive}  ({what})")
        lines.append(f"  at {site.where}")
        if site.code:
            lines.append(f"      {site.code}")
        for label, aval, n_nan, n_inf in site.produced:
            counts = ", ".join(c for c in (f"{n_nan} NaN" if n_nan else "",
                                           f"{n_inf} inf" if n_inf else "") if c)
            lines.append(f"  produced: {label} {aval}: {counts}")
        rule_phase = site.phase.startswith("backward") and not in_rule
        title = "inputs of the VJP rule" if rule_phase else "inputs"
        lines.append(f"  {title}:")
        for label, aval, mn, mx, n_nan, n_inf, origin in extra:
            note = f"  ({origin})" if origin else ""
            if n_nan or n_inf:
                note = "  <- already non-finite" + note
            lines.append(f"    {label:<32} {aval:<12} {_fmt_range(mn, mx, n_nan, n_inf)}{note}")
        hints = _BACKWARD_HINTS if rule_phase else _FORWARD_HINTS
        if site.primitive in hints:
            lines.append(f"  hint: {hints[site.primitive]}")
        if self.meta.get("skipped"):
            lines.append(f"  note: {self.meta['skipped']} equations inside loop/branch bodies "
                         f"were checked only as a whole (their enclosing operation).")
        return "\n".join(lines)

    def __repr__(self):
        if compat.is_tracer(self.stats):
            return "NonFiniteReport(<traced>)"
        msg = self.get()
        return "NonFiniteReport(ok)" if msg is None else f"NonFiniteReport(\n{msg}\n)"


def _all_stats(values):
    """Per value: (min, max over finite elements, #NaN, #inf), as an [n, 4] float array.

    Values are flattened, padded with +inf to the next power of two and stacked
    per padded size, so the checked program gains a few reductions per size
    class rather than several small ones per value (which compiles slowly).
    The padding is never finite and never NaN, and its count is taken off #inf.
    """
    ft = jnp.result_type(float)
    n = len(values)
    buckets: dict = collections.defaultdict(list)
    for i, x in enumerate(values):
        try:
            a = jnp.asarray(x)
            plain = jnp.issubdtype(a.dtype, jnp.number) or jnp.issubdtype(a.dtype, jnp.bool_)
        except (TypeError, ValueError):
            plain = False
        if not plain or a.size == 0:          # PRNG keys, float0, empty arrays
            continue
        if jnp.issubdtype(a.dtype, jnp.complexfloating):
            a = jnp.abs(a)                    # NaN/inf if either part is
        width = 1 << max(a.size - 1, 0).bit_length()
        buckets[width].append((i, a.reshape(-1).astype(ft)))
    rows, order = [], []
    for width, items in buckets.items():
        mat = jnp.stack([lax.pad(flat, jnp.array(np.inf, ft), [(0, width - flat.size, 0)])
                         for _, flat in items])
        padding = np.array([width - flat.size for _, flat in items], np.float64)
        is_nan, is_inf = jnp.isnan(mat), jnp.isinf(mat)
        finite = ~(is_nan | is_inf)
        rows.append(jnp.stack([
            jnp.min(jnp.where(finite, mat, jnp.inf), axis=1),
            jnp.max(jnp.where(finite, mat, -jnp.inf), axis=1),
            jnp.sum(is_nan, axis=1).astype(ft),
            jnp.sum(is_inf, axis=1).astype(ft) - padding.astype(ft)], axis=-1))
        order.extend(i for i, _ in items)
    empty_row = jnp.array([[np.nan, np.nan, 0, 0]], ft)
    table = jnp.concatenate(rows + [empty_row]) if rows else empty_row
    where = np.full(n, len(order), np.int32)       # values without stats -> the empty row
    where[np.asarray(order, np.int64)] = np.arange(len(order), dtype=np.int32)
    return table[where]


