"""``fbackprop.checked_grad`` / ``checked_value_and_grad``: NaN/Inf provenance.

The function is recorded as ``fb.grad`` records it, with an observer attached
to the sweeps; the observer sees every equation with its values on the way
forward and its cotangents on the way back, and the checker finds the first
equation, forward or backward, that produced a non-finite value which reaches
the loss or the gradient, and reports where it is in the user's code
(:mod:`fbackprop._src.tools.nonfinite` holds the report).

Inside loop, branch and checkpoint bodies the handlers' stepped paths run
(``stepping``: each scan step, each cond branch, each checkpoint region and
custom-rule function in place), so the observer sees every equation of a body
with the step it ran in.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from .. import api, compat, trace
from .. import context
from ..engine import recording, sweeps
from ..registry import vjp_rules
from ..rules import control
from ..rules.debug import NAMED_PRIMITIVES
from .common import (_short_dtype, _trace_state, fold_staged_away, inlined_jaxpr,
                     leaf_labels, observing, short_aval, source_code, stepping)
from .nonfinite import NonFiniteReport, _all_stats, _fmt_num


_rule_uses_cache: dict = {}


def _rule_uses(eqn, cts_out, record):
    """Which of (nonzero cotangents, forward inputs, forward outputs) a VJP rule reads.

    Traced once per primitive/params/shapes: a rule that ignores a value (log's
    rule never reads its -inf output) must not make that value a suspect.
    None when unknown (call primitives: every input counts).
    """
    rule = vjp_rules.get(eqn.primitive.name)
    if rule is None or record.sub is not None:
        return None
    cts_mask = tuple(c is not None for c in cts_out)
    if eqn.primitive.name in NAMED_PRIMITIVES:
        # Identities: the cotangent (and the hook) only; do not run a user's hook here.
        return (True,) * sum(cts_mask) + (False,) * (len(record.invals) + len(record.outvals))
    flat = [c for c in cts_out if c is not None] + list(record.invals) + list(record.outvals)
    try:
        avals = tuple((tuple(np.shape(x)), compat.typeof(x).dtype,
                       bool(getattr(compat.typeof(x), "weak_type", False))) for x in flat)
        key = (eqn.primitive.name, tuple(sorted(eqn.params.items())), avals, cts_mask,
               tuple(record.active))
        hash(key)
    except Exception:
        key = None
    if key is not None and key in _rule_uses_cache:
        return _rule_uses_cache[key]
    n_ct, n_in = sum(cts_mask), len(record.invals)

    def run(*xs):
        it = iter(xs[:n_ct])
        cts = [next(it) if m else None for m in cts_mask]
        cts_in = sweeps.rule_cotangents(eqn, list(xs[n_ct:n_ct + n_in]),
                                        list(xs[n_ct + n_in:]), record.active, cts)
        return [c for c in cts_in if c is not None]

    try:
        specs = [jax.ShapeDtypeStruct(shape, dtype, weak_type=weak)
                 for shape, dtype, weak in avals]
        jaxpr = jax.make_jaxpr(run)(*specs).jaxpr
    except Exception:
        return None
    needed = {v for v in jaxpr.outvars if type(v) is not compat.Literal}
    for e in reversed(jaxpr.eqns):
        if any(v in needed for v in e.outvars):
            needed.update(v for v in e.invars if type(v) is not compat.Literal)
    used = tuple(v in needed for v in jaxpr.invars)
    if key is not None:
        _rule_uses_cache[key] = used
    return used


class _FiniteWatch:
    """Observer recording a value-level dataflow graph of both sweeps.

    Nodes are equations (forward) and VJP-rule applications (backward); values
    are identified by object identity, and a cotangent the engine summed from
    several contributions (fan-out) becomes a "sum" event over them. Only the
    per-value statistics are computed in the traced program; the search for
    the origin runs on the host over this static graph.
    """

    def __init__(self, leaf_labels, leaves):
        self.state = _trace_state()
        self.context: list = []      # enclosing loop steps, outermost first
        self.extra: list = []        # [k, 4] rows of statistics kept by loop bodies
        self.n_extra = 0
        self.inner: dict = {}        # id(eqn) -> a while body's static description
        self.values: list = []
        self.value_meta: list = []
        self.index: dict = {}
        self.produced: set = set()
        self.nodes: list = []
        self.events: list = []
        self.pending: dict = collections.defaultdict(list)
        self.phase = "forward"
        self.skipped = 0
        self.alive: list = []        # values only aliased in ``index`` (kept alive)
        for label, x in zip(leaf_labels, leaves):
            if label is not None:
                self._value(x, label)

    def _here(self) -> bool:
        return self.state is None or _trace_state() == self.state

    def _value(self, x, label="") -> int:
        i = self.index.get(id(x))
        if i is None:
            i = len(self.values)
            self.values.append(x)
            self.value_meta.append({"label": label, "aval": short_aval(x)})
            self.index[id(x)] = i
        return i

    def _literal(self, v) -> int:
        return self._constant(v.val)

    def _constant(self, x) -> int:
        """A value no equation produced: a literal (a concrete scalar), or a
        constant the function captured, as in a staged program."""
        if np.shape(x) == () and not compat.is_tracer(x):
            val = np.asarray(x)
            text = _fmt_num(val) if val.size == 1 and np.isrealobj(val) else short_aval(x)
            return self._value(x, f"literal {text}")
        return self._value(x, "a constant captured by the function")

    def _operand(self, v, x) -> int:
        if type(v) is compat.Literal:
            return self._literal(v)
        i = self.index.get(id(x))
        return self._constant(x) if i is None else i

    def _staged_away(self, eqn, invals, outvals) -> bool:
        return fold_staged_away(self, self.index, eqn, invals, outvals)

    def _add_node(self, phase, eqn, inputs, outputs, deps=None):
        n = len(self.nodes)
        owned = []
        for label, o in outputs:
            mine = o not in self.produced and not self.value_meta[o]["label"]
            if mine:
                self.produced.add(o)
            owned.append((label, o, mine))
        self.nodes.append({
            "primitive": eqn.primitive.name, "phase": phase,
            "source": compat.source_line(eqn), "code": source_code(eqn),
            "context": tuple(self.context),
            "inner": self.inner.pop(id(eqn), None) if phase == "forward" else None,
            "inputs": tuple(inputs), "outputs": tuple(owned),
            "deps": tuple(i for _, i in inputs) if deps is None else tuple(deps)})
        self.events.append(("node", n))
        return n

    def _sum(self, total, var):
        parts = self.pending.pop(var, [])
        if parts:
            self.produced.add(total)
            self.events.append(("sum", total, tuple(parts)))

    # -- events of the handlers' stepped paths (rules/scan.py, cond.py, calls.py)
    def enter(self, kind, index, where):
        if self._here():
            self.context.append((kind, index, where))

    def exit(self):
        if self._here():
            self.context.pop()

    def link(self, total, parts):
        """``total`` is computed from ``parts`` outside any equation (a step's
        slice of ``xs``, the stacked ``ys``, summed cotangents)."""
        if not self._here():
            return
        t = self._value(total)
        ps = tuple(self._value(x) for x in parts)
        if t not in self.produced:
            self.produced.add(t)
            self.events.append(("sum", t, ps))

    def watch_while(self, eqn):
        """A ``while_loop`` nothing differentiates: its body's statistics at the
        first iteration whose carry turns non-finite (see ``WhileCall.evaluate``)."""
        return _WhileWatch(self, eqn) if self._here() else None

    def while_body(self, eqn, described, stats, tail):
        """A ``while_loop``'s body statistics at its first non-finite iteration."""
        self.inner[id(eqn)] = dict(described, offset=None, where=_short_where(eqn),
                                   extra=len(self.extra))
        self.extra.append(jnp.concatenate([stats, tail[None]]))

    def pick(self, total, parts, index):
        """``total`` is ``parts[index]``: a cond's output (or input cotangent) from
        the branch the runtime value ``index`` chose."""
        if not self._here():
            return
        t = self._value(total)
        ps = tuple(self._value(x) for x in parts)
        i = self._value(index)
        if t not in self.produced:
            self.produced.add(t)
            self.events.append(("pick", t, ps, i))

    def seed(self, outvars, cts):
        """The cotangents a body's backward sweep starts from, per output variable."""
        if not self._here():
            return
        for v, ct in zip(outvars, cts):
            if ct is not None and type(v) is not compat.Literal:
                self.pending[v].append(self._value(ct))

    def end_sweep(self, jaxpr, cts_in):
        """A body's backward sweep is over: its input cotangents are complete,
        and its variables start afresh in the next step."""
        if not self._here():
            return
        for v, ct in zip(jaxpr.invars, cts_in):
            if ct is not None:
                o = self._value(ct)
                if o not in self.produced and not self.value_meta[o]["label"]:
                    self._sum(o, v)
        for v in list(jaxpr.invars) + list(jaxpr.outvars) + [
                w for e in jaxpr.eqns for w in e.outvars]:
            self.pending.pop(v, None)

    def on_forward(self, eqn, invals, outvals):
        if not self._here():
            self.skipped += 1
            return
        if self._staged_away(eqn, invals, outvals):
            return
        inputs = [(f"input {k}", self._operand(v, x))
                  for k, (v, x) in enumerate(zip(eqn.invars, invals))]
        outputs = [(f"output {k}", self._value(x)) for k, x in enumerate(outvals)]
        phase = "forward" if self.phase == "forward" else "backward (re-running a custom rule)"
        self._add_node(phase, eqn, inputs, outputs)

    def on_backward(self, eqn, cts_out, cts_in, record):
        if not self._here():
            self.skipped += 1
            return
        inputs = []
        for k, (v, ct) in enumerate(zip(eqn.outvars, cts_out)):
            if ct is None:
                continue
            i = self._value(ct)
            if i not in self.produced and not self.value_meta[i]["label"]:
                self._sum(i, v)
            inputs.append((f"upstream cotangent of output {k}", i))
        for k, (v, x) in enumerate(zip(eqn.invars, record.invals)):
            inputs.append((f"forward input {k}", self._operand(v, x)))
        for k, x in enumerate(record.outvals):
            inputs.append((f"forward output {k}", self._value(x)))
        used = _rule_uses(eqn, cts_out, record)
        deps = None if used is None else [i for (_, i), u in zip(inputs, used) if u]
        if used is not None:
            inputs = [(label if u else f"{label} (unused by the rule)", i)
                      for (label, i), u in zip(inputs, used)]
        inner = _swept_in_place(eqn)
        outputs = []
        for k, (v, ct, a) in enumerate(zip(eqn.invars, cts_in, record.active)):
            if ct is None or not a:
                continue
            o = self._value(ct)
            if inner is not None:
                # The call's cotangent was summed inside its own sweep.
                inner_var = inner.invars[k]
                if o not in self.produced:
                    self._sum(o, inner_var)
                self.pending.pop(inner_var, None)
            outputs.append((f"cotangent of input {k}", o))
        # Mirror the engine's accumulation: these are contributions to the
        # cotangents of this equation's input variables.
        for v, ct, a in zip(eqn.invars, cts_in, record.active):
            if ct is not None and a and type(v) is not compat.Literal:
                self.pending[v].append(self._value(ct))
        self._add_node("backward", eqn, inputs, outputs, deps)

    def finish(self, fun_name, value, grads, top_invars, grad_labels):
        finals = [("the loss", self._value(value))]
        for v, g, label in zip(top_invars, grads, grad_labels):
            if g is None or label is None:
                continue
            i = self._value(g)
            if i not in self.produced and not self.value_meta[i]["label"]:
                self._sum(i, v)
            finals.append((f"gradient {label}", i))
        origin = {}
        for node in self.nodes:
            where = node["source"].split(" (")[0]
            where = where.rsplit("/", 1)[-1]
            for _, o, owned in node["outputs"]:
                if owned:
                    kind = "cotangent from" if node["phase"] == "backward" else "output of"
                    origin[o] = f"{kind} {node['primitive']} at {where}"
        values = tuple({"label": m["label"] or origin.get(i, ""), "aval": m["aval"],
                        "leaf": bool(m["label"])}
                       for i, m in enumerate(self.value_meta))
        stats = _all_stats(self.values) if self.values \
            else jnp.zeros((0, 4), jnp.result_type(float))
        # Loop bodies' own rows follow the values' rows.
        offsets, row = [], len(self.values)
        for block in self.extra:
            offsets.append(row)
            row += block.shape[0]
        for node in self.nodes:
            if node.get("inner") is not None:
                node["inner"]["offset"] = offsets[node["inner"]["extra"]]
        if self.extra:
            ft = stats.dtype
            stats = jnp.concatenate([stats] + [b.astype(ft) for b in self.extra])
        meta = _Meta(function=fun_name, values=values, nodes=tuple(self.nodes),
                     events=tuple(self.events), finals=tuple(finals), skipped=self.skipped,
                     rows=row)
        return NonFiniteReport(stats, meta)


# ------------------------------------------------ looking inside loop bodies
# checked_grad steps the sweeps (context.steps: the handlers of rules/ run each
# step of a lax.scan, each branch of a cond, checkpoint regions and custom rules
# in place), so every equation of a body is watched at every step, forward and
# backward, with the step it ran in; larger bodies (rules/control.UNROLL_LIMIT)
# are checked as a whole.
_short_where = control.short_where


def _describe_body(body):
    index, avals, labels = {}, [], []

    def add(v, label):
        index[v] = len(avals)
        avals.append(f"{_short_dtype(v.aval.dtype)}[{','.join(map(str, v.aval.shape))}]")
        labels.append(label)

    for k, v in enumerate(body.invars):
        add(v, f"loop input {k}")
    eqns = []
    for e in body.eqns:
        ins = [index.get(v) if type(v) is not compat.Literal else None for v in e.invars]
        where = _short_where(e)
        for v in e.outvars:
            if type(v) is not compat.DropVar:
                add(v, f"output of {e.primitive.name} at {where}")
        eqns.append({"primitive": e.primitive.name, "source": compat.source_line(e),
                     "code": source_code(e), "ins": ins,
                     "outs": [index[v] for v in e.outvars if type(v) is not compat.DropVar]})
    outvars = [index.get(v) if type(v) is not compat.Literal else None
               for v in body.outvars]
    order = list(index)
    return {"eqns": tuple(eqns), "outvars": tuple(outvars), "avals": tuple(avals),
            "labels": tuple(labels)}, order



def _swept_in_place(eqn):
    """The sub-jaxpr swept in place for a call equation while checking, or None."""
    inner = inlined_jaxpr(eqn)
    if inner is None and eqn.primitive.name in compat.REMAT_NAMES \
            and context.current().stepping == "all":
        return compat.remat_inner(eqn.params)[0]
    return inner


class _WhileWatch:
    """Carried through a while loop's iterations: the statistics of every body
    value at the first iteration whose carry turns non-finite."""

    def __init__(self, watch, eqn):
        self.watch, self.eqn = watch, eqn
        self.described, self.order = _describe_body(eqn.params["body_jaxpr"].jaxpr)
        self.out_idx = [i for i in self.described["outvars"] if i is not None]
        self.init = (jnp.array(False), jnp.int32(-1),
                     jnp.zeros((len(self.order), 4), jnp.result_type(float)))

    def step(self, state, i, env):
        found, first, stats = state
        st = _all_stats([env[v] for v in self.order])
        bad_out = jnp.any(st[jnp.array(self.out_idx, jnp.int32), 2:] > 0) if self.out_idx \
            else jnp.array(False)
        take = jnp.logical_and(jnp.logical_not(found), bad_out)
        return (jnp.logical_or(found, bad_out), jnp.where(take, i, first),
                jnp.where(take, st, stats))

    def finish(self, state):
        found, first, stats = state
        ft = jnp.result_type(float)
        tail = jnp.stack([first.astype(ft), found.astype(ft), jnp.zeros((), ft),
                          jnp.zeros((), ft)])
        self.watch.while_body(self.eqn, self.described, stats, tail)



class _Meta(dict):
    """Static description of a checked program (hashable, for pytree aux data)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._key = id(self)

    def __hash__(self):
        return self._key

    def __eq__(self, other):
        return self is other


def _checked(fun, argnums, has_aux, api_name, with_value):
    api._check_callable(fun, api_name)

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        nums = api._normalize_argnums(argnums, len(args), api_name)
        inputs = api._Inputs(args, kwargs, nums, api_name)
        static = inputs.static()
        # The leaves as the function sees them (NumPy arrays as JAX arrays, as a
        # differentiated argument is given), so the watch knows them by identity.
        leaves = [jnp.asarray(x) if not s and isinstance(x, (np.ndarray, np.generic)) else x
                  for x, s in zip(inputs.leaves, static)]
        it = iter(leaf_labels(args, kwargs, static))
        labels = [None if s else next(it) for s in static]
        active = inputs.active()
        grad_labels = [label if a else None for label, a in zip(labels, active)]
        fun_name = getattr(fun, "__name__", "fun")
        watch = _FiniteWatch(labels, leaves)
        with observing(watch), stepping():
            run = recording.record(fun, inputs.in_tree, leaves, active)
            trace.check_outputs(run.out_tree, run.out_vals, fun_name)
            _, aux_tree = api.split_scalar_output(run.out_tree, run.out_vals, has_aux,
                                                  api_name)
            outs = run.out_vals
            one = jnp.ones((), api._dtype_of(outs[0]))
            watch._value(one, "the seed cotangent 1.0")
            watch.phase = "backward"
            cts = sweeps.backward(run.tape, [one] + [None] * (len(outs) - 1))
        report = watch.finish(fun_name, outs[0], cts, run.tape.jaxpr.invars, grad_labels)
        if not api._any_tracer(jax.tree_util.tree_leaves(report)):
            report.throw()
        grads = inputs.grads(cts, nums)
        grads = grads[0] if isinstance(argnums, (int, np.integer)) else tuple(grads)
        result = grads
        if with_value:
            value = outs[0]
            if has_aux:
                value = (value, tree_util.tree_unflatten(aux_tree, outs[1:]))
            result = (value, grads)
        elif has_aux:
            result = (grads, tree_util.tree_unflatten(aux_tree, outs[1:]))
        return report, result

    return wrapped


def checked_value_and_grad(fun: Callable, argnums: int | Sequence[int] = 0,
                           has_aux: bool = False) -> Callable:
    """:func:`fbackprop.value_and_grad` that finds where a NaN or Inf started.

    Every equation's outputs (forward) and every VJP rule's cotangents
    (backward) are checked. If the loss or a gradient is non-finite, the report
    names the first equation — in execution order, forward then backward —
    whose non-finite output reaches it, with the primitive, the pass, the
    ranges of its inputs and the user's source line. Non-finite values that
    do not reach the results (e.g. the masked branch of
    ``jnp.where(x > 0, jnp.log(x), 0.)``) are not reported.

    The check looks inside ``lax.scan`` / ``fori_loop`` bodies (each step is
    swept in place, and the report names the step: ``site.steps``, "in step
    37 of the scan at model.py:30"), ``lax.cond`` / ``switch`` branches (each
    branch is swept, the taken one's results are kept and only it is
    reported), checkpoint regions and custom_jvp / custom_vjp functions (their
    code on the way forward; the JVP rule or the bwd on the way back). A
    ``while_loop`` called eagerly is swept iteration by iteration, forward and
    backward, and the report names the iteration ("in iteration 12 of the
    while_loop at model.py:40", ``site.context``); under ``jax.jit`` (the trip
    count unknown) the report names the body's operation and the iteration that
    first made the loop's carry non-finite, or the loop as a whole for its
    backward. A loop or cond whose size exceeds
    20 000 equations (for a scan, steps x body size) and
    bodies with side effects are checked as a whole (the report then names
    the enclosing operation). The values and gradients are the same as
    :func:`fbackprop.value_and_grad`'s, but the compiled program differs (loop
    steps in sequence), so XLA may simplify it differently: in rare cases its
    rewrites of the unrolled steps remove a NaN that the plain program has
    (e.g. ``inf * mask`` with a 0/1 mask, rewritten as a select).

    Called eagerly, the function raises :class:`NonFiniteError`. Under
    ``jax.jit`` / ``jax.vmap`` it returns the report as a value, like
    ``checkify``: call ``report.throw()`` after the transformed call.

    Args:
      fun: scalar-valued function, as for :func:`fbackprop.value_and_grad`.
      argnums: which positional arguments to differentiate.
      has_aux: whether ``fun`` returns ``(loss, aux)``.

    Returns:
      A function returning ``(report, (value, grads))`` (``value`` is ``(loss,
      aux)`` with ``has_aux``); ``report`` is a :class:`NonFiniteReport`.

    Example:
      >>> import fbackprop as fb, jax, jax.numpy as jnp
      >>> norm = lambda x: jnp.sqrt(jnp.sum(x ** 2))
      >>> report, (value, g) = jax.jit(fb.checked_value_and_grad(norm))(jnp.zeros(3))
      >>> report.first().primitive, report.first().phase
      ('sqrt', 'backward')
    """
    return _checked(fun, argnums, has_aux, "checked_value_and_grad", True)


def checked_grad(fun: Callable, argnums: int | Sequence[int] = 0,
                 has_aux: bool = False) -> Callable:
    """:func:`fbackprop.grad` that finds where a NaN or Inf started.

    Like :func:`checked_value_and_grad` but returns ``(report, grads)`` (or
    ``(report, (grads, aux))`` with ``has_aux``).

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> report, g = fb.checked_grad(lambda x: jnp.sum(jnp.sin(x)))(jnp.ones(2))
      >>> report.ok
      True
    """
    return _checked(fun, argnums, has_aux, "checked_grad", False)
