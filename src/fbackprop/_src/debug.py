"""Seeing backprop: named intermediates, cotangent hooks, NaN/Inf provenance.

Everything here runs fbackprop's own sweeps (:func:`engine.sweeps.forward` and
:func:`engine.sweeps.backward`) with an observer attached; the observer sees every
equation with its values on the way forward and its cotangents on the way back.

* :func:`tag` names a value; :func:`grad_and_intermediates` returns the
  cotangent arriving at every named value next to the usual gradients.
* A tag's ``hook`` reads or replaces that cotangent during the backward sweep.
* :func:`checked_grad` / :func:`checked_value_and_grad` find the first equation,
  forward or backward, that produced a non-finite value which reaches the loss
  or the gradient, and report where it is in the user's code.

Inside loop, branch and checkpoint bodies: tags get perturbation inputs
(:mod:`fbackprop._src.perturb`), so their cotangents come out of the ordinary
control-flow rules, one per step; the checker swaps those rules, while it runs,
for sweeps that run each scan step, each cond branch, each checkpoint region
and custom-rule function in place (``stepping``), so the observer sees every
equation of a body with the step it ran in.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import linecache
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, tree_util

from . import api, compat, perturb, trace
from . import context
from .engine import recording, sweeps
from .registry import vjp_rules
from .rules import control
from .rules.debug import NAMED_PRIMITIVES, tag_p

# ============================================================ shared machinery


observing = context.observing


def _trace_state():
    """A comparable token for JAX's current trace (None if unavailable).

    Observers compare it with the token taken when they were created, so events
    from a sweep running inside another trace (e.g. a ``lax.scan`` body) are
    not mixed with values of the outer computation.
    """
    return compat.trace_state()


def inlined_jaxpr(eqn):
    """The sub-jaxpr the reverse engine sweeps in place for a call equation, or None."""
    name = eqn.primitive.name
    if name in compat.JIT_NAMES:
        return compat.jit_inner(eqn.params).jaxpr
    if name in compat.CALL_BODIES:
        # A call a define-by-run recording staged (core.call, shard_map, an
        # eager custom_jvp function): its body is swept in place.
        return compat.CALL_BODIES[name](eqn.params).jaxpr
    # Checkpoint regions, loops and custom rules run their own programs.
    return None


_sub_jaxprs = trace.sub_jaxprs


_SOURCE_RE = re.compile(r"^(?P<file>.*?):(?P<line>\d+)(?::\d+)?(?: \((?P<func>.*)\))?$")


def source_parts(eqn) -> tuple[str, int | None, str]:
    """(file, line, function) of the user code that created ``eqn``."""
    text = compat.source_line(eqn)
    m = _SOURCE_RE.match(text)
    if not m:
        return text, None, ""
    return m.group("file"), int(m.group("line")), m.group("func") or ""


def source_code(eqn) -> str:
    """The stripped source text of the line that created ``eqn`` ('' if unknown)."""
    file, line, _ = source_parts(eqn)
    if line is None:
        return ""
    return linecache.getline(file, line).strip()


def aval_str(x) -> str:
    try:
        aval = compat.typeof(x)
        return f"{np.dtype(aval.dtype).name}{list(aval.shape)}"
    except Exception:
        return type(x).__name__


def _short_dtype(dtype) -> str:
    name = np.dtype(dtype).name
    return {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16",
            "int32": "i32", "int64": "i64", "bool": "bool", "complex64": "c64",
            "complex128": "c128"}.get(name, name)


def short_aval(x) -> str:
    try:
        aval = compat.typeof(x)
    except Exception:
        return type(x).__name__
    return f"{_short_dtype(aval.dtype)}[{','.join(str(d) for d in aval.shape)}]"


def leaf_labels(args, kwargs, static) -> list[str]:
    """Labels like ``args[0]['w']`` for the non-static flat leaves of (args, kwargs)."""
    paths = [p for p, _ in tree_util.tree_flatten_with_path((tuple(args), kwargs))[0]]
    labels = []
    for path, s in zip(paths, static):
        if s:
            continue
        head = "args" if path[0].idx == 0 else "kwargs"
        labels.append(head + tree_util.keystr(path[1:]))
    return labels


# ================================================================= 1. tags


def tag(x, name: str, *, hook: Callable | None = None):
    """Names a value so its gradient can be read (and changed) during backprop.

    ``tag`` is the identity. :func:`grad_and_intermediates` returns the cotangent
    arriving at each tagged value (what PyTorch's ``retain_grad`` keeps), and a
    ``hook`` sees that cotangent during every fbackprop backward sweep through
    the value and may replace it (what ``register_hook`` does), e.g. to clip it.
    Tags work under ``jax.jit`` and ``jax.vmap`` (a hook then sees one example's
    cotangent) and in nested differentiation; JAX's own ``jax.grad`` treats a
    tag as the identity and ignores its hook. A tag may sit inside a
    ``lax.scan`` / ``fori_loop`` body (its cotangent is reported per step and
    its hook runs at every step), a ``lax.cond`` / ``switch`` branch (the same
    name in several branches is one tag, reported by the branch taken) or a
    checkpoint region (the cotangent of the recomputing backward).

    Args:
      x: an array, or a pytree of arrays; each leaf of a pytree is tagged as
        ``name + keystr(path)``, e.g. ``"h['w']"``.
      name: the name reported by :func:`grad_and_intermediates`; unique per call
        of the differentiated function.
      hook: optional ``hook(ct) -> new_ct | None``; it receives the cotangent of
        the tagged value and returns a replacement with the same shape and dtype,
        or ``None`` to keep it (a hook that only reads, e.g. ``jax.debug.print``).

    Returns:
      ``x`` unchanged.

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> def f(x):
      ...     h = fb.tag(x * 2.0, "h", hook=lambda ct: jnp.clip(ct, -1.0, 1.0))
      ...     return jnp.sum(h ** 2)
      >>> fb.grad(f)(jnp.array([0.1, 2.0]))   # d/dh = 2h = [0.4, 8] is clipped to [0.4, 1]
      Array([0.8, 2. ], dtype=float32)
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"fbackprop.tag: `name` must be a non-empty string, got {name!r}.")
    if hook is not None and not callable(hook):
        raise TypeError(f"fbackprop.tag: `hook` must be a callable ct -> ct (or None), got "
                        f"{type(hook).__name__}: {hook!r:.60}.")
    leaves_with_path, treedef = tree_util.tree_flatten_with_path(x)
    single = treedef.num_nodes == 1 and treedef.num_leaves == 1
    out = []
    for path, leaf in leaves_with_path:
        if not (isinstance(leaf, (bool, int, float, complex, np.ndarray, np.generic, jax.Array))
                or compat.is_tracer(leaf)):
            raise TypeError(
                f"fbackprop.tag('{name}'): leaf {tree_util.keystr(path) or '(root)'} is a "
                f"{type(leaf).__name__} ({leaf!r:.60}); only arrays and numbers can be tagged.")
        leaf_name = name if single else name + tree_util.keystr(path)
        out.append(tag_p.bind(jnp.asarray(leaf) if not compat.is_tracer(leaf) else leaf,
                              name=leaf_name, hook=hook, hook_batch_dims=()))
    return tree_util.tree_unflatten(treedef, out)


@dataclasses.dataclass
class TagSite:
    """One tagged value in a traced function."""
    name: str
    eqn: Any
    blocked_by: str | None   # enclosing primitive the engine does not sweep in place
    path: tuple = ()         # enclosing equations: (id(eqn), branch index or None)

    @property
    def where(self) -> str:
        return compat.source_line(self.eqn)


def _alternatives(a: TagSite, b: TagSite) -> bool:
    """Whether two sites sit in different branches of one cond (one tag, one report)."""
    for x, y in zip(a.path, b.path):
        if x != y:
            return x[0] == y[0] and x[1] is not None and y[1] is not None
    return False


def tag_sites(jaxpr, blocked_by=None, path=()) -> list[TagSite]:
    """Every ``tag``/``checkpoint_name`` in ``jaxpr`` and its sub-jaxprs, in order."""
    sites: list[TagSite] = []

    def walk(j, blocked_by, path):
        for eqn in j.eqns:
            if eqn.primitive.name in NAMED_PRIMITIVES:
                sites.append(TagSite(str(eqn.params["name"]), eqn, blocked_by, path))
            inner = inlined_jaxpr(eqn)
            if inner is not None:
                walk(inner, blocked_by, path)
            elif eqn.primitive.name == "cond":
                for k, b in enumerate(eqn.params["branches"]):
                    walk(b.jaxpr, blocked_by or "cond", path + ((id(eqn), k),))
            else:
                for sub in _sub_jaxprs(eqn):
                    walk(sub, blocked_by or eqn.primitive.name, path + ((id(eqn), None),))

    walk(jaxpr, blocked_by, path)
    return sites


def select_tags(sites: list[TagSite], names: Sequence[str] | None = None) -> list[TagSite]:
    """The sites of the selected names (default: all), one per name.

    The same name in different branches of one ``cond``/``switch`` is one tag.
    Raises ValueError when a selected name is not found, or occurs more than
    once otherwise.
    """
    if names is not None:
        wanted = set(names)
        missing = sorted(wanted - {s.name for s in sites})
        if missing:
            known = sorted({s.name for s in sites})
            raise ValueError(
                f"grad_and_intermediates: no tagged value named {missing} in the function "
                f"(tags found: {known}). Tag it with fbackprop.tag(x, name) or "
                f"jax.ad_checkpoint.checkpoint_name(x, name).")
        sites = [s for s in sites if s.name in wanted]
    by_name = collections.defaultdict(list)
    for s in sites:
        by_name[s.name].append(s)
    dups = {n: ss for n, ss in by_name.items()
            if any(not _alternatives(a, b) for i, a in enumerate(ss) for b in ss[i + 1:])}
    if dups:
        n, ss = next(iter(dups.items()))
        places = "\n".join(f"    {s.where}" for s in ss[:5])
        raise ValueError(
            f"Tag name '{n}' is used {len(ss)} times in the differentiated function:\n"
            f"{places}\nEach tagged value needs its own name so its gradient can be "
            f"reported (only the branches of one lax.cond/switch may share a name). If the "
            f"tag is in a layer or jitted function called several times, "
            f"put the call's index in the name, e.g. fb.tag(h, f'{n}{{i}}').")
    # One site per name: the first branch's stands for the others.
    seen, unique = set(), []
    for s in sites:
        if s.name not in seen:
            seen.add(s.name)
            unique.append(s)
    return unique


class _Tags:
    """Observer of :func:`grad_and_intermediates`: the cotangent arriving at each
    tagged value of the recording.

    A tag the recording binds itself (or sweeps in place, in a nested jit) is
    seen on the way forward and its cotangent read on the way back, before its
    hook. A tag inside a loop, branch or checkpoint body lives in a program the
    body's handler runs as a whole: :meth:`rewrite` adds a perturbation input
    at it (:mod:`fbackprop._src.perturb`, applied to the one equation holding
    the body) as an input of the recording, whose cotangent the backward sweep
    returns.
    """

    def __init__(self, names, parent):
        self.names = None if names is None else set(names)
        self.parent = parent                 # the trace the recording runs in
        self.state = _trace_state()
        self.sites: list[TagSite] = []       # every tag met, in order
        self.top: dict = {}                  # id(eqn) -> site: read off the sweeps
        self.cts: dict = {}
        self.eps: list = []                  # perturbation inputs (perturb.Eps), in order
        self.depth = 0                       # inside custom rules (their own code)
        self.rewriting = False
        self.recording = True
        self.per_iteration = _IterationTags()   # tags directly in while bodies

    def _here(self) -> bool:
        return self.state is None or _trace_state() == self.state

    def enter(self, kind, index, where):
        self.depth += 1

    def exit(self):
        self.depth -= 1

    def on_forward(self, eqn, invals, outvals):
        if eqn.primitive.name in NAMED_PRIMITIVES and not self.depth and self._here():
            site = TagSite(str(eqn.params["name"]), eqn, None)
            self.sites.append(site)
            self.top[id(eqn)] = site

    def on_backward(self, eqn, cts_out, cts_in, record):
        site = self.top.get(id(eqn))
        if site is not None and self._here():
            self.cts[site.name] = cts_out[0]      # before the tag's hook, if any

    def _wanted(self, sites) -> set:
        names = {s.name for s in sites}
        return names if self.names is None else names & self.names

    def rewrite(self, trace, prim, params, tracers):
        """A body holding selected tags gets their perturbation inputs."""
        if (self.rewriting or not self.recording or trace.parent is not self.parent
                or trace.linear is not None):
            return None
        if prim.name in (compat.CUSTOM_JVP_CALL, compat.CUSTOM_VJP_CALL):
            self._custom_call(trace, prim, params, tracers)
            return None
        if not any(True for _ in _sub_jaxprs(_ParamsOnly(params))):
            return None
        vals = trace.unpack(tracers)[0]
        invars = [compat.Var(compat.typeof(x)) for x in vals]
        eqn = compat.typed_eqn(prim, params, invars, compat.current_source_info())
        one = compat.new_jaxpr([], invars, list(eqn.outvars), [eqn])
        inside = [s for s in tag_sites(one) if s.blocked_by is not None]
        self.sites.extend(inside)
        wanted = self._wanted(inside)
        if not wanted:
            return None
        # Tags directly in the body of a while loop: the loop is swept iteration
        # by iteration (the trip count is known only when it runs), and their
        # cotangents are read off each iteration's sweep.
        direct = [s for s in inside if prim.name == "while" and s.blocked_by == "while"
                  and len(s.path) == 1 and s.name in wanted]
        if direct and wanted == {s.name for s in direct}:
            if not compat.is_eval_trace(trace.parent):
                raise NotImplementedError(
                    f"grad_and_intermediates: tag '{direct[0].name}' is inside the "
                    f"lax.while_loop at {compat.source_line(eqn)}; its cotangent has one "
                    f"entry per iteration, and the number of iterations is known only "
                    f"when the loop runs. Call grad_and_intermediates eagerly (outside "
                    f"jax.jit and jax.vmap), or tag a value outside the loop.")
            self.per_iteration.add(direct)
            self.rewriting = True
            try:
                with context.using(stepping="while"):
                    return trace.process_primitive(prim, tracers, params)
            finally:
                self.rewriting = False
        closed, eps = perturb.perturbed(compat.ClosedJaxpr(one, []), wanted)
        if not eps:
            return None
        with compat.set_current_trace(trace.parent):
            zeros = [jnp.zeros(e.aval.shape, e.aval.dtype) for e in eps]
        added = [trace.new_input(z) for z in zeros]
        self.eps += eps
        self.rewriting = True
        try:
            with compat.set_current_trace(trace):
                outs = compat.eval_jaxpr(closed.jaxpr, closed.consts, *tracers, *added)
        finally:
            self.rewriting = False
        return outs if prim.multiple_results else outs[0]

    def _custom_call(self, trace, prim, params, tracers):
        """A tag inside a custom_jvp / custom_vjp function has no cotangent of its
        own (the custom rule replaces that code's derivative): a clear error.
        The call is staged to look inside it (and its functions made ready to
        run again)."""
        subfuns = params["subfuns"]
        rest = {k: v for k, v in params.items() if k != "subfuns"}
        if prim.name == compat.CUSTOM_JVP_CALL:
            def process(t, xs):
                return t.process_custom_jvp_call(prim, *subfuns, xs, **rest)
        else:
            def process(t, xs):
                return t.process_custom_vjp_call(prim, *subfuns, xs, **rest)
        jaxpr = recording.stage_call(process, trace.unpack(tracers)[0])[0]
        for f in subfuns:
            compat.reset_stores(f)
        sites = tag_sites(jaxpr)
        self.sites.extend(s for s in sites if s.blocked_by is not None)
        wanted = self._wanted(sites)
        if wanted:
            perturb.make_plan(jaxpr, wanted, True)     # raises the error

    def intermediates(self, tape, eps_cts) -> dict:
        """Per selected tag name, its cotangent (checked by :func:`select_tags`)."""
        sites = select_tags(self.sites, self.names)
        found = _collect([s for s in sites if s.blocked_by is None], self, tape)
        found.update(self.per_iteration.stacked())
        for e, ct in zip(self.eps, eps_cts):
            found[e.name] = ct if ct is not None else jnp.zeros(e.aval.shape, e.aval.dtype)
        return {s.name: found[s.name] for s in sites if s.name in found}


class _ParamsOnly:
    """An object with an equation's ``params`` (to look for its sub-jaxprs)."""

    def __init__(self, params):
        self.params = params


class _IterationTags:
    """Observer keeping, per iteration, the cotangent arriving at each tag in
    the body of a while loop that is swept iteration by iteration (the while
    handler's observed path with ``stepping="while"``; each iteration's sweeps
    come between its ``enter("while", i, where)`` and ``exit()`` notices)."""

    def __init__(self):
        self.by_eqn: dict = {}
        self.context: list = []
        self.cts: dict = {}
        self.counts: dict = {}

    def add(self, sites):
        for s in sites:
            self.by_eqn[id(s.eqn)] = s
            self.cts.setdefault(s.name, {})

    def enter(self, kind, index, where):
        self.context.append((kind, index))

    def exit(self):
        self.context.pop()

    def on_forward(self, eqn, invals, outvals):
        site = self.by_eqn.get(id(eqn))
        if site is not None and self.context:
            self.counts[site.name] = max(self.counts.get(site.name, 0),
                                         self.context[-1][1] + 1)

    def on_backward(self, eqn, cts_out, cts_in, record):
        site = self.by_eqn.get(id(eqn))
        if site is not None and self.context and cts_out[0] is not None:
            self.cts[site.name][self.context[-1][1]] = cts_out[0]

    def stacked(self) -> dict:
        out = {}
        for site in self.by_eqn.values():
            aval = site.eqn.outvars[0].aval
            if not jnp.issubdtype(aval.dtype, jnp.inexact):
                continue
            per = self.cts[site.name]
            n = self.counts.get(site.name, 0)
            zero = jnp.zeros(aval.shape, aval.dtype)
            out[site.name] = jnp.stack([per.get(i, zero) for i in range(n)]) if n else \
                jnp.zeros((0,) + tuple(aval.shape), aval.dtype)
        return out




def _recorded_eqns(tape) -> set:
    ids, stack = set(), [tape]
    while stack:
        t = stack.pop()
        for rec in t.records:
            ids.add(id(rec.eqn))
            if hasattr(rec.sub, "records"):
                stack.append(rec.sub)
    return ids


def _collect(sites, tags, tape) -> dict:
    recorded = None
    out = {}
    for s in sites:
        aval = s.eqn.outvars[0].aval
        if not jnp.issubdtype(aval.dtype, jnp.inexact):
            continue                      # integer/bool values carry no cotangent
        if s.name in tags.cts:
            out[s.name] = tags.cts[s.name]
            continue
        if recorded is None:
            recorded = _recorded_eqns(tape)
        if id(s.eqn) not in recorded:
            raise ValueError(
                f"grad_and_intermediates: tag '{s.name}' (at {s.where}) marks a value that "
                f"does not depend on any array argument through differentiable operations "
                f"(it is computed from constants, or behind lax.stop_gradient), so the "
                f"backward sweep does not visit it. Tag a value computed from the "
                f"function's arguments.")
        out[s.name] = jnp.zeros(aval.shape, aval.dtype)    # does not reach the loss
    return out


def run_intermediates(fun, argnums, has_aux, names, api_name, args, kwargs):
    """``(grads, intermediates, aux or None, tags)``: what
    :func:`grad_and_intermediates` returns, from one recording of ``fun``, and
    its tag observer (``tags.eps``: the tags inside loop bodies, with their
    steps)."""
    nums = api._normalize_argnums(argnums, len(args), api_name)
    inputs = api._Inputs(args, kwargs, nums, api_name)
    static = inputs.static()
    # Every float input is active, so a tagged value that depends only on a
    # non-differentiated argument is on the tape too.
    active = [not s and jnp.issubdtype(api._dtype_of(x), jnp.inexact)
              for x, s in zip(inputs.leaves, static)]
    tags = _Tags(names, compat.current_trace())
    with observing(tags), observing(tags.per_iteration):
        run = recording.record(fun, inputs.in_tree, inputs.leaves, active)
        tags.recording = False
        trace.check_outputs(run.out_tree, run.out_vals, getattr(fun, "__name__", "fun"))
        _, aux_tree = api.split_scalar_output(run.out_tree, run.out_vals, has_aux, api_name)
        outs = run.out_vals
        one = jnp.ones((), api._dtype_of(outs[0]))
        cts = sweeps.backward(run.tape, [one] + [None] * (len(outs) - 1))
    n = len(inputs.leaves)
    inter = tags.intermediates(run.tape, cts[n:])
    grads = inputs.grads([ct if d else None for ct, d in zip(cts[:n], inputs.diff)], nums)
    grads = grads[0] if isinstance(argnums, (int, np.integer)) else tuple(grads)
    aux = tree_util.tree_unflatten(aux_tree, outs[1:]) if has_aux else None
    return grads, inter, aux, tags


def grad_and_intermediates(fun: Callable, argnums: int | Sequence[int] = 0,
                           has_aux: bool = False, *,
                           names: str | Sequence[str] | None = None) -> Callable:
    """Creates a function returning the gradient and the cotangent of every tagged value.

    The cotangent of a tagged value ``h`` is ``d loss / d h``: what ``jax.grad``
    gives for the perturbation trick (compute ``h + eps`` at the tag and
    differentiate with respect to ``eps`` at 0), here read directly off
    fbackprop's backward sweep. Values are tagged with :func:`tag` or
    ``jax.ad_checkpoint.checkpoint_name``. A tag's hook, if any, changes what
    flows on to earlier values; the reported cotangent is the one arriving
    at the tag (before its own hook).

    Args:
      fun: scalar-valued function, as for :func:`fbackprop.grad`.
      argnums: which positional arguments to differentiate.
      has_aux: whether ``fun`` returns ``(loss, aux)``.
      names: optional name or names to report (default: every tag); only these
        names must be unique.

    Returns:
      A function returning ``(grads, intermediates)`` — or ``(grads,
      intermediates, aux)`` with ``has_aux`` — where ``intermediates`` maps each
      tag name to its cotangent (zeros if the value does not reach the loss).
      A tag inside ``lax.scan`` bodies gets one leading axis per enclosing
      scan, outermost first, indexed like the scan's ``xs`` (also with
      ``reverse=True``); a tag in an untaken branch reports zeros. A tag in
      the body of a ``lax.while_loop`` (of the function itself, called
      eagerly) gets a leading axis of the iterations it ran.

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> def f(x, y):
      ...     z = fb.tag(x * y, "z")
      ...     return (z + x) ** 2
      >>> grads, inter = fb.grad_and_intermediates(f, argnums=(0, 1))(2.0, 3.0)
      >>> [float(g) for g in grads], float(inter["z"])
      ([64.0, 32.0], 16.0)
    """
    api_name = "grad_and_intermediates"
    api._check_callable(fun, api_name)
    if names is not None:
        names = (names,) if isinstance(names, str) else tuple(names)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"{api_name}: `names` must be a string or a sequence of strings, "
                            f"got {names!r}.")

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        grads, inter, aux, _ = run_intermediates(fun, argnums, has_aux, names, api_name,
                                                 args, kwargs)
        if has_aux:
            return grads, inter, aux
        return grads, inter

    return wrapped


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
        """An equation a staged program would not hold (a Python scalar made an
        array, a no-op conversion): no node; its outputs are its operand or a
        constant."""
        away = compat.staged_away(eqn, invals)
        if away is None:
            return False
        for x, k in zip(outvals, away):
            if k is None:
                self._constant(x)
            else:
                self.index[id(x)] = self._operand(eqn.invars[k], invals[k])
                self.alive.append(x)
        return True

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


def stepping(checkpoints: bool = True):
    """Scans swept step by step (and, for checking, checkpoint regions swept in
    place, every branch of a cond, custom rules' own code): the handlers'
    stepped paths."""
    return context.using(stepping="all" if checkpoints else "scan")


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
