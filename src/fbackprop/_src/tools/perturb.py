"""Tags inside loop, branch and checkpoint bodies: cotangents by perturbation inputs.

A tagged value ``h`` inside a ``lax.scan`` body has one cotangent per step, and
the sweep that produces them runs inside the scan's own backward loop. Rather
than thread extra outputs through every control-flow rule, the function is
rewritten once, before differentiation, into one that takes a *perturbation*
input per tag and adds it at the tag: ``h -> tag(h) + eps``. Inside a scan
body the perturbation is one more ``xs`` input (stacked over the steps), inside
a ``cond`` branch one more operand (shared by the branches that use the name),
inside a checkpoint region one more region input. With ``eps = 0`` nothing
changes, and ``d loss / d eps`` - computed by the unchanged rules for scan,
cond and checkpoint, eagerly or under ``jit``/``vmap`` - is the cotangent
arriving at the tag, with the steps axis in front. A tag's hook stays on the
tag, so it runs at every step and changes what flows on to earlier values
(the reported cotangent is the one before the hook, as for any tag).

Equations without a selected tag inside them are bound unchanged.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .. import compat, residuals, trace
from .. import context
from ..rules.debug import NAMED_PRIMITIVES


@dataclasses.dataclass(frozen=True)
class Eps:
    """One perturbation input: the tag it belongs to and its (stacked) type."""
    name: str
    aval: Any
    steps: tuple       # per stacking axis, from the outermost: (source line of the loop, length)


def _inexact(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def has_tag(jaxpr, wanted) -> bool:
    """Whether a selected tag occurs anywhere in ``jaxpr`` (sub-jaxprs included)."""
    stack = [jaxpr]
    while stack:
        j = stack.pop()
        for eqn in j.eqns:
            if eqn.primitive.name in NAMED_PRIMITIVES and eqn.params["name"] in wanted:
                return True
            stack.extend(trace.sub_jaxprs(eqn))
    return False


def _stacked(aval, length):
    return compat.ShapedArray((length,) + tuple(aval.shape), aval.dtype)


class _Body:
    """A rewritten sub-jaxpr: an open jaxpr ``(*consts, *inputs, *eps) -> outs``."""

    def __init__(self, jaxpr, consts, eps):
        self.jaxpr = jaxpr
        self.consts = consts          # values for the leading inputs
        self.eps = eps                # list of Eps, in the order of the trailing inputs


def _trace_body(jaxpr, consts, plan, eps_avals):
    """Traces the evaluation of ``jaxpr`` under ``plan`` to an open jaxpr."""
    n = len(jaxpr.invars)

    def run(*args):
        return evaluate(jaxpr, consts, args[:n], args[n:], plan)

    specs = [residuals.spec_of(v.aval) for v in jaxpr.invars] + \
        [residuals.spec_of(a, False) for a in eps_avals]
    closed = jax.make_jaxpr(run)(*specs)
    open_jaxpr, new_consts = compat.constvars_to_invars(closed)
    return open_jaxpr, new_consts


class Plan:
    """How to rewrite each equation of one jaxpr level, and its perturbation inputs."""

    def __init__(self):
        self.by_eqn: dict = {}       # id(eqn) -> (kind, data, eps indices)
        self.eps: list = []          # Eps, in input order

    def add(self, eps) -> int:
        self.eps.append(eps)
        return len(self.eps) - 1


def make_plan(jaxpr, wanted, top: bool) -> Plan:
    """The rewrite of one jaxpr level for the tags named in ``wanted``.

    ``top``: this is the differentiated function itself (or a ``jit`` inlined
    into it), whose tags the engine reports directly; only tags in bodies get
    perturbation inputs.
    """
    plan = Plan()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in NAMED_PRIMITIVES:
            aval = eqn.outvars[0].aval
            if not top and eqn.params["name"] in wanted and _inexact(aval):
                plan.by_eqn[id(eqn)] = ("tag", None, [plan.add(Eps(eqn.params["name"], aval,
                                                                  ()))])
            continue
        subs = list(trace.sub_jaxprs(eqn))
        if not subs or not any(has_tag(s, wanted) for s in subs):
            continue
        where = compat.source_line(eqn)
        if name in compat.JIT_NAMES or name == compat.CLOSED_CALL:
            inner = compat.jit_inner(eqn.params) if name in compat.JIT_NAMES \
                else eqn.params["call_jaxpr"]
            sub = make_plan(inner.jaxpr, wanted, top)
            idx = [plan.add(e) for e in sub.eps]
            plan.by_eqn[id(eqn)] = ("inline", (inner, sub), idx)
        elif name == "scan":
            p = eqn.params
            body = p["jaxpr"]
            sub = make_plan(body.jaxpr, wanted, False)
            length = p["length"]
            steps = (where, length)
            idx = [plan.add(Eps(e.name, _stacked(e.aval, length), (steps,) + e.steps))
                   for e in sub.eps]
            jaxpr_b, consts_b = _trace_body(body.jaxpr, body.consts, sub,
                                            [e.aval for e in sub.eps])
            plan.by_eqn[id(eqn)] = ("scan", _Body(jaxpr_b, consts_b, sub.eps), idx)
        elif name == "cond":
            branches = eqn.params["branches"]
            subs_b = [make_plan(b.jaxpr, wanted, False) for b in branches]
            union: dict = {}
            for sb in subs_b:
                for e in sb.eps:
                    prev = union.get(e.name)
                    if prev is not None and (tuple(prev.aval.shape) != tuple(e.aval.shape)
                                             or prev.aval.dtype != e.aval.dtype):
                        raise ValueError(
                            f"Tag name '{e.name}' is used in two branches of the cond at "
                            f"{where} for values of different types ({prev.aval.str_short()} "
                            f"and {e.aval.str_short()}). The same name in two branches is "
                            f"one tag, so its values must have one shape and dtype; give "
                            f"them different names.")
                    union.setdefault(e.name, e)
            order = list(union.values())
            idx = [plan.add(e) for e in order]
            traced = []
            for b, sb in zip(branches, subs_b):
                # This branch's evaluation takes every perturbation of the cond
                # and uses those of its own tags.
                local = {e.name: k for k, e in enumerate(sb.eps)}
                jaxpr_b, consts_b = _trace_body(
                    b.jaxpr, b.consts, _Remapped(sb, [local.get(e.name) for e in order]),
                    [e.aval for e in order])
                traced.append((jaxpr_b, consts_b))
            const_avals = [[compat.typeof(c) for c in cs] for _, cs in traced]
            new_branches = []
            for k, (jaxpr_b, _) in enumerate(traced):
                before = [a for j, avs in enumerate(const_avals) if j < k for a in avs]
                after_consts = [a for j, avs in enumerate(const_avals) if j > k for a in avs]
                # Inputs: all branches' consts (in branch order), operands, eps.
                n_own = len(const_avals[k])
                own, rest = jaxpr_b.invars[:n_own], jaxpr_b.invars[n_own:]
                pre = [compat.Var(a) for a in before]
                post = [compat.Var(a) for a in after_consts]
                j2 = compat.new_jaxpr([], pre + list(own) + post + list(rest),
                                      list(jaxpr_b.outvars), list(jaxpr_b.eqns))
                new_branches.append(compat.ClosedJaxpr(j2, ()))
            all_consts = [c for _, cs in traced for c in cs]
            plan.by_eqn[id(eqn)] = ("cond", (tuple(new_branches), all_consts), idx)
        elif name in compat.REMAT_NAMES:
            inner, _ = compat.remat_inner(eqn.params)
            sub = make_plan(inner, wanted, False)
            idx = [plan.add(e) for e in sub.eps]
            jaxpr_b, consts_b = _trace_body(inner, [], sub, [e.aval for e in sub.eps])
            plan.by_eqn[id(eqn)] = ("remat", _Body(jaxpr_b, consts_b, sub.eps), idx)
        elif name in (compat.CUSTOM_JVP_CALL, compat.CUSTOM_VJP_CALL) or "custom" in name:
            raise NotImplementedError(
                f"grad_and_intermediates: a tag is inside the custom-derivative function "
                f"called at {where} ('{name}'). Its custom rule replaces the derivative of "
                f"that code, so the backward sweep never passes through the tagged value "
                f"and it has no cotangent of its own. Tag the custom function's inputs or "
                f"outputs instead.")
        elif name == "while":
            raise NotImplementedError(
                f"grad_and_intermediates: a tag is inside the lax.while_loop at {where}, "
                f"which is itself inside a loop, branch or checkpoint body (or the tag is "
                f"in a loop nested in the while loop). Per-iteration cotangents are "
                f"reported for tags directly in the body of a while loop of the "
                f"differentiated function itself, called eagerly; tag a value there, or "
                f"outside the loop.")
        else:
            raise NotImplementedError(
                f"grad_and_intermediates: a tag is inside a '{name}' computation (at "
                f"{where}); tags are reported in straight-line code, jax.jit functions, "
                f"lax.scan / fori_loop bodies, lax.cond / switch branches and checkpoint "
                f"regions. Tag a value outside it, or return the value from it.")
    return plan


class _Remapped:
    """A plan whose perturbation inputs are taken from a longer list (a cond
    branch receives the perturbations of every branch)."""

    def __init__(self, plan, positions):
        self.by_eqn = plan.by_eqn
        self.positions = positions    # per outer eps: the branch's local index, or None
        self.n_local = len(plan.eps)

    def local(self, eps_vals):
        out = [None] * self.n_local
        for v, k in zip(eps_vals, self.positions):
            if k is not None:
                out[k] = v
        return out


def evaluate(jaxpr, consts, args, eps_vals, plan):
    """Evaluates ``jaxpr`` in the current trace with the perturbations of ``plan`` added."""
    if isinstance(plan, _Remapped):
        eps_vals = plan.local(list(eps_vals))
    env: dict = {}

    def read(v):
        return v.val if type(v) is compat.Literal else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        entry = plan.by_eqn.get(id(eqn))
        if entry is None:
            outs = compat.bind_eqn(eqn, invals)
        else:
            kind, data, idx = entry
            eps = [eps_vals[i] for i in idx]
            outs = _rewritten(eqn, kind, data, invals, eps)
        for v, x in zip(eqn.outvars, outs):
            if type(v) is not compat.DropVar:
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _rewritten(eqn, kind, data, invals, eps):
    if kind == "tag":
        (out,) = compat.bind_eqn(eqn, invals)
        weak = bool(getattr(eqn.outvars[0].aval, "weak_type", False))
        with compat.user_context(eqn):
            return [compat.with_weak_type(lax.add(out, eps[0].astype(out.dtype)), weak)]
    if kind == "inline":
        inner, sub = data
        return evaluate(inner.jaxpr, inner.consts, invals, eps, sub)
    p = eqn.params
    if kind == "scan":
        body = data
        nc = p["num_consts"]
        params = dict(p, jaxpr=compat.ClosedJaxpr(body.jaxpr, ()),
                      num_consts=len(body.consts) + nc)
        args = list(body.consts) + list(invals) + list(eps)
        with compat.user_context(eqn):
            return list(eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(params)))
    if kind == "cond":
        branches, consts = data
        params = dict(p, branches=branches)
        args = [invals[0]] + list(consts) + list(invals[1:]) + list(eps)
        with compat.user_context(eqn):
            return list(eqn.primitive.bind(*args, **params))
    if kind == "remat":
        body = data
        params = dict(p, jaxpr=body.jaxpr)
        args = list(body.consts) + list(invals) + list(eps)
        with compat.user_context(eqn):
            return list(eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(params)))
    raise AssertionError(kind)


_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def perturbed(closed, wanted):
    """``(closed_jaxpr, eps)``: ``closed`` with one extra trailing input per
    perturbation (``eps``: a list of :class:`Eps`), or ``(closed, [])`` when no
    selected tag is inside a body.

    Cached per traced function (its jaxpr and the selected names) when its
    constants are concrete, so repeated eager calls rewrite it once.
    """
    key = (frozenset(wanted), bool(jax.config.jax_enable_x64))
    cacheable = context.current().cache and not any(compat.is_tracer(c) for c in closed.consts)
    per = _cache.setdefault(closed.jaxpr, {}) if cacheable else {}
    hit = per.get(key)
    if hit is not None and hit[0] is closed:
        return hit[1], hit[2]
    plan = make_plan(closed.jaxpr, set(wanted), True)
    if not plan.eps:
        result = closed, []
    else:
        n = len(closed.jaxpr.invars)

        def run(*args):
            return evaluate(closed.jaxpr, closed.consts, args[:n], args[n:], plan)

        specs = [residuals.spec_of(v.aval) for v in closed.jaxpr.invars] + \
            [residuals.spec_of(e.aval, False) for e in plan.eps]
        result = jax.make_jaxpr(run)(*specs), plan.eps
    if cacheable and not any(compat.is_tracer(c) for c in result[0].consts):
        per[key] = (closed,) + result
    return result
