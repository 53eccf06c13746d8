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
import contextlib
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
from .engine import sweeps
from .registry import vjp_rules
from .rules import while_loop
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


def _split_output(traced, has_aux: bool, api_name: str):
    """(main_tree, aux_tree) of a traced scalar-loss function, checked like fb.grad."""
    return api.split_scalar_output(traced.out_tree, traced.out_avals, has_aux, api_name)


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


def find_tags(jaxpr, names: Sequence[str] | None = None) -> list[TagSite]:
    """Every ``tag``/``checkpoint_name`` in ``jaxpr`` (and its sub-jaxprs), in order.

    The same name in different branches of one ``cond``/``switch`` is one tag.
    Raises ValueError when a selected name occurs more than once otherwise.
    """
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

    walk(jaxpr, None, ())
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


class _TagCollector:
    """Observer keeping the cotangent that arrives at each tagged value."""

    def __init__(self, sites):
        self.by_eqn = {id(s.eqn): s for s in sites}
        self.state = _trace_state()
        self.seen: set = set()
        self.cts: dict = {}

    def _here(self) -> bool:
        return self.state is None or _trace_state() == self.state

    def on_forward(self, eqn, invals, outvals):
        site = self.by_eqn.get(id(eqn))
        if site is not None and self._here():
            self.seen.add(site.name)

    def on_backward(self, eqn, cts_out, cts_in, record):
        site = self.by_eqn.get(id(eqn))
        if site is not None and self._here():
            self.cts[site.name] = cts_out[0]      # before the tag's hook, if any


# ------------------------------------- while loops: per-iteration tag cotangents
# (grad_and_intermediates of a tag in a while body: the loop is stepped with
# ``stepping="while"``, the stepping handler below, and this observer reads each
# iteration's cotangent off the enter/exit notices of rules.while_loop.stepped.)
class _IterationTags:
    """Observer keeping, per iteration, the cotangent arriving at each tag in
    the body of a while loop that is swept iteration by iteration."""

    def __init__(self, sites):
        self.by_eqn = {id(s.eqn): s for s in sites}
        self.context: list = []
        self.cts: dict = {s.name: {} for s in sites}
        self.counts: dict = {}

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


def _loop_line(jaxpr, site) -> str:
    for e in jaxpr.eqns:
        if id(e) == site.path[0][0]:
            return compat.source_line(e)
    return "?"
# ------------------------------------------------------------------------------


def _recorded_eqns(tape) -> set:
    ids, stack = set(), [tape]
    while stack:
        t = stack.pop()
        for rec in t.records:
            ids.add(id(rec.eqn))
            if hasattr(rec.sub, "records"):
                stack.append(rec.sub)
    return ids


def _collect(sites, collector, tape) -> dict:
    recorded = None
    out = {}
    for s in sites:
        aval = s.eqn.outvars[0].aval
        if not jnp.issubdtype(aval.dtype, jnp.inexact):
            continue                      # integer/bool values carry no cotangent
        if s.name in collector.cts:
            out[s.name] = collector.cts[s.name]
            continue
        if s.name not in collector.seen:
            raise NotImplementedError(
                f"grad_and_intermediates: tag '{s.name}' (at {s.where}) was not reached by "
                f"fbackprop's forward sweep, so its cotangent is not available.")
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
        nums = api._normalize_argnums(argnums, len(args), api_name)
        prog = api._Program(fun, args, kwargs, nums, api_name)
        traced = prog.traced
        main_tree, aux_tree = _split_output(traced, has_aux, api_name)
        closed = traced.closed
        sites = find_tags(closed.jaxpr, names)
        # Tags in the body of a while loop of the function itself: the loop is
        # swept iteration by iteration, and their cotangents are read off each
        # iteration's sweep (the trip count is known only when it runs).
        in_while = [s for s in sites if s.blocked_by == "while" and len(s.path) == 1]
        if in_while and any(compat.is_tracer(x) for x in prog.dyn):
            raise NotImplementedError(
                f"grad_and_intermediates: tag '{in_while[0].name}' is inside the "
                f"lax.while_loop at {_loop_line(closed.jaxpr, in_while[0])}; its cotangent "
                f"has one entry per iteration, and the number of iterations is known only "
                f"when the loop runs. Call grad_and_intermediates eagerly (outside jax.jit "
                f"and jax.vmap), or tag a value outside the loop.")
        # Tags inside loop, branch and checkpoint bodies are read off the
        # gradients of perturbation inputs (see fbackprop._src.perturb); the
        # others straight off the sweep.
        nested = [s.name for s in sites if s.blocked_by is not None and s not in in_while]
        closed_p, eps = perturb.perturbed(closed, nested) if nested else (closed, [])
        top_names = [s.name for s in sites if s.blocked_by is None]
        top_sites = [s for s in find_tags(closed_p.jaxpr, top_names) if s.blocked_by is None] \
            if top_names else []
        # Every float input is active, so a tagged value that depends only on a
        # non-differentiated argument is on the tape too.
        active = tuple(jnp.issubdtype(api._dtype_of(x), jnp.inexact) for x in prog.dyn)
        n_dyn = len(prog.dyn)

        def make_run():
            def run(dyn):
                collector = _TagCollector(top_sites)
                per_iteration = _IterationTags(in_while)
                zeros = [jnp.zeros(e.aval.shape, e.aval.dtype) for e in eps]
                # While loops swept iteration by iteration, whatever their length.
                stepped = context.using(stepping="while") if in_while \
                    else contextlib.nullcontext()
                with observing(collector), observing(per_iteration), stepped:
                    outs, tape = sweeps.forward(closed_p.jaxpr, closed_p.consts,
                                                 list(dyn) + zeros,
                                                 active + (True,) * len(eps))
                    one = jnp.ones((), api._dtype_of(outs[0]))
                    cts = sweeps.backward(tape, [one] + [None] * (len(outs) - 1))
                found = _collect(top_sites, collector, tape)
                found.update(per_iteration.stacked())
                for e, zero, ct in zip(eps, zeros, cts[n_dyn:]):
                    found[e.name] = ct if ct is not None else zero
                inter = {s.name: found[s.name] for s in sites if s.name in found}
                return outs, cts[:n_dyn], inter
            return run

        outs, cts, inter = make_run()(prog.dyn)
        cts = [ct if d else None for ct, d in zip(cts, prog.dyn_diff)]
        grads = prog.diff_cts_to_tree(cts, args, nums)
        grads = grads[0] if isinstance(argnums, (int, np.integer)) else tuple(grads)
        if has_aux:
            return grads, inter, tree_util.tree_unflatten(aux_tree, outs[1:])
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

    def __init__(self, leaf_labels, dyn, consts):
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
        for label, x in zip(leaf_labels, dyn):
            self._value(x, label)
        for k, c in enumerate(consts):
            self._value(c, f"constant {k} captured by the function")

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
        val = np.asarray(v.val)
        text = _fmt_num(val) if val.size == 1 and np.isrealobj(val) else short_aval(v.val)
        return self._value(v.val, f"literal {text}")

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

    # -- called by the stepped scan (_SteppedScan) around each step's sweeps
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

    def while_body(self, eqn, described, stats, tail):
        """A ``while_loop``'s body statistics at its first non-finite iteration."""
        if not self._here():
            return
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
        inputs = []
        for k, (v, x) in enumerate(zip(eqn.invars, invals)):
            i = self._literal(v) if type(v) is compat.Literal else self._value(x)
            inputs.append((f"input {k}", i))
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
            i = self._literal(v) if type(v) is compat.Literal else self._value(x)
            inputs.append((f"forward input {k}", i))
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
# checked_grad sweeps each step of a lax.scan in place (and a checkpoint region
# like a jit), so every equation of a body is watched at every step, forward and
# backward, with the step it ran in. Unrolling costs compile time in proportion
# to steps x body size, so larger scans are checked as a whole.
UNROLL_LIMIT = 20_000          # equations (body size x steps) a checked scan may unroll to


def _unrolled_size(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        if eqn.primitive.name == "scan":
            n += eqn.params["length"] * _unrolled_size(eqn.params["jaxpr"].jaxpr)
        else:
            n += sum(_unrolled_size(sub) for sub in _sub_jaxprs(eqn))
    return n


_notify = context.notify


def _short_where(eqn) -> str:
    return compat.source_line(eqn).split(" (")[0].rsplit("/", 1)[-1]


class _SteppedScan:
    """Reverse mode of ``lax.scan`` as one in-place sweep of the body per step
    (same numbers as the scan rule; for watching each step)."""

    def __init__(self, whole):
        self.whole = whole

    @staticmethod
    def _small(eqn) -> bool:
        p = eqn.params
        return p["length"] > 0 and p["length"] * _unrolled_size(p["jaxpr"].jaxpr) <= UNROLL_LIMIT

    def evaluate(self, eqn, invals):
        if not self._small(eqn):
            return compat.bind_eqn(eqn, invals)
        return self.forward(eqn, invals, [False] * len(invals))[0]

    def forward(self, eqn, invals, active):
        p = eqn.params
        body = p["jaxpr"]
        nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
        if not self._small(eqn):
            outs, sub, out_act = self.whole.forward(eqn, invals, active)
            return outs, ("whole", sub), out_act
        consts, carry, xs = list(invals[:nc]), list(invals[nc:nc + nk]), list(invals[nc + nk:])
        c_act, k_act, x_act = list(active[:nc]), list(active[nc:nc + nk]), \
            list(active[nc + nk:])
        n_ys = len(eqn.outvars) - nk
        where = _short_where(eqn)
        order = range(length - 1, -1, -1) if p["reverse"] else range(length)
        steps, ys_at, y_act = [], {}, [False] * n_ys
        for t in order:
            with compat.user_context(eqn):
                x_t = [lax.index_in_dim(x, t, keepdims=False) for x in xs]
            for x, xt in zip(xs, x_t):
                _notify("link", xt, [x])
            _notify("enter", "scan", t, where)
            try:
                outs, tape = sweeps.forward(body.jaxpr, body.consts, consts + carry + x_t,
                                             c_act + k_act + x_act)
            finally:
                _notify("exit")
            carry = list(outs[:nk])
            k_act = list(tape.out_active[:nk])
            y_act = [a or b for a, b in zip(y_act, tape.out_active[nk:])]
            ys_at[t] = list(outs[nk:])
            steps.append((t, tape))
        ys = []
        for j in range(n_ys):
            parts = [ys_at[t][j] for t in range(length)]
            with compat.user_context(eqn):
                y = jnp.stack(parts)
            _notify("link", y, parts)
            ys.append(y)
        return carry + ys, ("steps", (steps, where)), k_act + y_act

    def backward(self, record, cts_out):
        kind, sub = record.sub
        if kind == "whole":
            return self.whole.backward(dataclasses.replace(record, sub=sub), cts_out)
        steps, where = sub
        p = record.eqn.params
        body = p["jaxpr"].jaxpr
        nc, nk = p["num_consts"], p["num_carry"]
        n_xs = len(record.invals) - nc - nk
        ct_carry, ct_ys = list(cts_out[:nk]), list(cts_out[nk:])
        const_parts = [[] for _ in range(nc)]
        xs_ct: dict = {}
        for t, tape in reversed(steps):
            cts_y = []
            for y in ct_ys:
                if y is None:
                    cts_y.append(None)
                    continue
                with compat.user_context(record.eqn):
                    yt = lax.index_in_dim(y, t, keepdims=False)
                _notify("link", yt, [y])
                cts_y.append(yt)
            _notify("enter", "scan", t, where)
            try:
                cts = ct_carry + cts_y
                _notify("seed", body.outvars, cts)
                cts_in = sweeps.backward(tape, cts)
                _notify("end_sweep", body, cts_in)
            finally:
                _notify("exit")
            for i in range(nc):
                if cts_in[i] is not None:
                    const_parts[i].append(cts_in[i])
            ct_carry = list(cts_in[nc:nc + nk])
            xs_ct[t] = cts_in[nc + nk:]
        result = []
        for parts in const_parts:
            total = None
            for c in parts:
                total = c if total is None else lax.add(total, c)
            if len(parts) > 1:
                _notify("link", total, parts)
            result.append(total)
        result += ct_carry
        in_avals = [v.aval for v in body.invars]
        for j in range(n_xs):
            per = [xs_ct[t][j] for t in range(len(steps))]
            if all(c is None for c in per):
                result.append(None)
                continue
            aval = in_avals[nc + nk + j]
            parts = [c if c is not None else jnp.zeros(aval.shape, aval.dtype) for c in per]
            stacked = jnp.stack(parts)
            _notify("link", stacked, parts)
            result.append(stacked)
        return [c if a else None for c, a in zip(result, record.active)]


class _AllBranchesCond:
    """Reverse mode of ``lax.cond``/``switch`` with every branch swept in place and
    the taken branch's results selected (same numbers as the cond rule; for
    watching the branch taken: a non-finite value in a branch not taken is
    never reported)."""

    def __init__(self, whole):
        self.whole = whole

    @staticmethod
    def _small(eqn) -> bool:
        branches = eqn.params["branches"]
        return not any(b.jaxpr.effects for b in branches) and \
            sum(_unrolled_size(b.jaxpr) for b in branches) <= UNROLL_LIMIT

    def evaluate(self, eqn, invals):
        if not self._small(eqn):
            return compat.bind_eqn(eqn, invals)
        return self.forward(eqn, invals, [False] * len(invals))[0]

    def forward(self, eqn, invals, active):
        branches = eqn.params["branches"]
        if not self._small(eqn):
            outs, sub, out_act = self.whole.forward(eqn, invals, active)
            return outs, ("whole", sub), out_act
        index, ops, act = invals[0], list(invals[1:]), list(active[1:])
        where = _short_where(eqn)
        kind = "cond" if len(branches) == 2 else "switch"
        per, tapes = [], []
        for b, branch in enumerate(branches):
            _notify("enter", kind, b, where)
            try:
                outs_b, tape = sweeps.forward(branch.jaxpr, branch.consts, ops, act)
            finally:
                _notify("exit")
            per.append(outs_b)
            tapes.append(tape)
        outs = []
        for k in range(len(eqn.outvars)):
            parts = [o[k] for o in per]
            with compat.user_context(eqn):
                out = lax.select_n(index, *[jnp.asarray(x) for x in parts]) \
                    if len(parts) > 1 else parts[0]
            _notify("pick", out, parts, index)
            outs.append(out)
        out_act = [any(t.out_active[k] for t in tapes) for k in range(len(eqn.outvars))]
        return outs, ("branches", (tapes, where)), out_act

    def backward(self, record, cts_out):
        kind, sub = record.sub
        if kind == "whole":
            return self.whole.backward(dataclasses.replace(record, sub=sub), cts_out)
        tapes, where = sub
        branches = record.eqn.params["branches"]
        kind = "cond" if len(branches) == 2 else "switch"
        index = record.invals[0]
        per = []
        for b, (branch, tape) in enumerate(zip(branches, tapes)):
            _notify("enter", kind, b, where)
            try:
                _notify("seed", branch.jaxpr.outvars, cts_out)
                cts_in = sweeps.backward(tape, list(cts_out))
                _notify("end_sweep", branch.jaxpr, cts_in)
            finally:
                _notify("exit")
            per.append(cts_in)
        in_avals = [v.aval for v in branches[0].jaxpr.invars]
        result = [None]
        for i, aval in enumerate(in_avals):
            parts = [c[i] for c in per]
            if all(c is None for c in parts):
                result.append(None)
                continue
            parts = [c if c is not None else jnp.zeros(aval.shape, aval.dtype) for c in parts]
            with compat.user_context(record.eqn):
                total = lax.select_n(index, *parts) if len(parts) > 1 else parts[0]
            _notify("pick", total, parts, index)
            result.append(total)
        return [c if a else None for c, a in zip(result, record.active)]


class _WatchedWhile:
    """``lax.while_loop`` while the tools step (one handler for every stepping
    kind, which it reads from the sweep context).

    A differentiated loop with concrete values is swept iteration by iteration
    in place (:func:`rules.while_loop.stepped`, with ``enter("while",
    i, where)`` notices): up to ``UNROLL_LIMIT`` body equations for the checker
    and ``fb.explain`` (``"all"``, ``"scan"``), without limit for tags in the
    body (``"while"``). For the checker (``"all"``) a loop nothing
    differentiates, and the forward of one with traced values (then reversed
    as a whole), run with the statistics of every body value kept at the first
    iteration whose carry turns non-finite.
    """

    def __init__(self):
        self.limited = while_loop.stepped(UNROLL_LIMIT, _short_where)
        self.unlimited = while_loop.stepped(None, _short_where)

    def forward(self, eqn, invals, active):
        stepping = context.current().stepping
        if stepping == "all" and (any(compat.is_tracer(x) for x in invals)
                                  or not compat.is_eager()):
            self.evaluate(eqn, invals)
        handler = self.unlimited if stepping == "while" else self.limited
        return handler.forward(eqn, invals, active)

    def backward(self, record, cts_out):
        # (The record says how its forward ran; the limit does not matter here.)
        return self.limited.backward(record, cts_out)

    @staticmethod
    def _describe(body):
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

    def evaluate(self, eqn, invals):
        p = eqn.params
        body_closed, cond_closed = p["body_jaxpr"], p["cond_jaxpr"]
        body = body_closed.jaxpr
        if context.current().stepping != "all":
            return compat.bind_eqn(eqn, invals)
        if body.effects or cond_closed.jaxpr.effects or _unrolled_size(body) > UNROLL_LIMIT:
            return compat.bind_eqn(eqn, invals)
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts = list(invals[:cn]), list(invals[cn:cn + bn])
        described, order = self._describe(body)
        n = len(order)
        out_idx = [i for i in described["outvars"] if i is not None]

        def body_fn(state):
            carry, i, found, first, stats = state
            env = dict(zip(body.constvars, body_closed.consts))
            env.update(zip(body.invars, bconsts + list(carry)))
            for e in body.eqns:
                ins = [v.val if type(v) is compat.Literal else env[v] for v in e.invars]
                for v, x in zip(e.outvars, compat.bind_eqn(e, ins)):
                    if type(v) is not compat.DropVar:
                        env[v] = x
            new = [v.val if type(v) is compat.Literal else env[v] for v in body.outvars]
            st = _all_stats([env[v] for v in order])
            bad_out = jnp.any(st[jnp.array(out_idx, jnp.int32), 2:] > 0) if out_idx \
                else jnp.array(False)
            take = jnp.logical_and(jnp.logical_not(found), bad_out)
            stats = jnp.where(take, st, stats)
            first = jnp.where(take, i, first)
            new = [compat.with_weak_type(x, bool(getattr(v.aval, "weak_type", False)))
                   if hasattr(x, "dtype") else x for x, v in zip(new, body.outvars)]
            return new, i + 1, jnp.logical_or(found, bad_out), first, stats

        def cond_fn(state):
            return compat.eval_jaxpr(cond_closed.jaxpr, cond_closed.consts, *cconsts,
                                     *state[0])[0]

        ft = jnp.result_type(float)
        carry0 = [compat.with_weak_type(jnp.asarray(x), bool(getattr(v.aval, "weak_type", False)))
                  for x, v in zip(invals[cn + bn:], body.invars[bn:])]
        init = (carry0, jnp.int32(0), jnp.array(False), jnp.int32(-1), jnp.zeros((n, 4), ft))
        with compat.user_context(eqn):
            carry, _, found, first, stats = lax.while_loop(cond_fn, body_fn, init)
        tail = jnp.stack([first.astype(ft), found.astype(ft), jnp.zeros((), ft),
                          jnp.zeros((), ft)])
        _notify("while_body", eqn, described, stats, tail)
        return list(carry)


def _remat_closed(params):
    return compat.ClosedJaxpr(compat.remat_inner(params)[0], ())


def _inline(get_closed):
    """A handler sweeping a call's jaxpr in place, also when nothing is differentiated."""
    from .rules.calls import InlineCall

    class Inline(InlineCall):
        def evaluate(self, eqn, invals):
            closed = self.get_closed(eqn.params)
            return sweeps.forward(closed.jaxpr, closed.consts, invals,
                                   [False] * len(invals))[0]
    return Inline(get_closed)


class _WatchedCustom:
    """A custom-rule call whose own code is swept in place on the way forward."""
    kind = ""

    def __init__(self, whole):
        self.whole = whole

    def evaluate(self, eqn, invals):
        call = eqn.params["call_jaxpr"]
        _notify("enter", self.kind, 0, _short_where(eqn))
        try:
            return sweeps.forward(call.jaxpr, call.consts, invals, [False] * len(invals))[0]
        finally:
            _notify("exit")


class _WatchedCustomJVP(_WatchedCustom):
    """``custom_jvp``: the function's own code swept in place when nothing is
    differentiated; otherwise its JVP rule, linearized and transposed as usual
    (its equations are seen as they run), inside a "custom_jvp" context."""
    kind = "custom_jvp"

    def forward(self, eqn, invals, active):
        _notify("enter", self.kind, 0, _short_where(eqn))
        try:
            return self.whole.forward(eqn, invals, active)
        finally:
            _notify("exit")

    def backward(self, record, cts_out):
        _notify("enter", "custom_jvp rule", 0, _short_where(record.eqn))
        try:
            return self.whole.backward(record, cts_out)
        finally:
            _notify("exit")


class _WatchedCustomVJP(_WatchedCustom):
    """``custom_vjp``: the user's fwd and bwd swept in place (bwd staged first)."""
    kind = "custom_vjp"

    def forward(self, eqn, invals, active):
        p = eqn.params
        nc = p["num_consts"]
        if any(active[:nc]):
            return self.whole.forward(eqn, invals, active)
        fwd_jaxpr, fwd_consts = p["fwd_jaxpr_thunk"].call_wrapped(*active[nc:])
        primals = list(invals[nc:])
        _notify("enter", "custom_vjp", 0, _short_where(eqn))
        try:
            outs = sweeps.forward(fwd_jaxpr, fwd_consts, primals, [False] * len(primals))[0]
        finally:
            _notify("exit")
        res, outs = compat.split_custom_vjp_fwd_outputs(outs, primals, p["out_trees"])
        _, _, bwd = compat.custom_vjp_parts(p)
        return outs, (res, bwd, [v.aval for v in eqn.outvars]), [True] * len(outs)

    def backward(self, record, cts_out):
        from .rules.calls import _as_cotangent
        res, bwd, out_avals = record.sub
        present = [k for k, c in enumerate(cts_out) if c is not None]
        cell = {}

        def staged(res, cts):
            full = [None] * len(cts_out)
            for k, c in zip(present, cts):
                full[k] = c
            out = bwd(list(res), full, out_avals)
            cell["where"] = [k for k, c in enumerate(out) if c is not None]
            return [out[k] for k in cell["where"]]

        present_cts = [cts_out[k] for k in present]
        closed = jax.make_jaxpr(staged)(res, present_cts)
        _notify("enter", "custom_vjp bwd", 0, _short_where(record.eqn))
        try:
            flat = list(res) + present_cts
            outs = sweeps.forward(closed.jaxpr, closed.consts, flat, [False] * len(flat))[0]
        finally:
            _notify("exit")
        cts = [None] * len(record.invals)
        for k, c in zip(cell["where"], outs):
            cts[k] = c
        return [_as_cotangent(ct, x) if a and ct is not None else None
                for ct, x, a in zip(cts, record.invals, record.active)]


def _swept_in_place(eqn):
    """The sub-jaxpr swept in place for a call equation while checking, or None."""
    inner = inlined_jaxpr(eqn)
    if inner is None and eqn.primitive.name in compat.REMAT_NAMES \
            and context.current().stepping == "all":
        return compat.remat_inner(eqn.params)[0]
    return inner


def stepping(checkpoints: bool = True):
    """Scans swept step by step (and, for checking, checkpoint regions swept in
    place and every branch of a cond): the stepping handlers registered below."""
    return context.using(stepping="all" if checkpoints else "scan")


def _register_stepping_handlers():
    from .registry import call_handlers_reverse, stepping_handlers
    stepping_handlers["scan"] = (_SteppedScan(call_handlers_reverse["scan"]), ("scan", "all"))
    stepping_handlers["cond"] = (_AllBranchesCond(call_handlers_reverse["cond"]), ("all",))
    for name in compat.REMAT_NAMES:
        stepping_handlers[name] = (_inline(_remat_closed), ("all",))
    stepping_handlers[compat.CUSTOM_JVP_CALL] = (
        _WatchedCustomJVP(call_handlers_reverse[compat.CUSTOM_JVP_CALL]), ("all",))
    stepping_handlers[compat.CUSTOM_VJP_CALL] = (
        _WatchedCustomVJP(call_handlers_reverse[compat.CUSTOM_VJP_CALL]), ("all",))
    stepping_handlers["while"] = (_WatchedWhile(), ("while", "scan", "all"))


_register_stepping_handlers()


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
        prog = api._Program(fun, args, kwargs, nums, api_name)
        traced = prog.traced
        main_tree, aux_tree = _split_output(traced, has_aux, api_name)
        closed = traced.closed
        active = tuple(prog.active)
        labels = leaf_labels(args, kwargs, prog.static)
        grad_labels = [label if a else None for label, a in zip(labels, active)]
        fun_name = getattr(fun, "__name__", "fun")

        def make_run():
            def run(dyn):
                watch = _FiniteWatch(labels, dyn, closed.consts)
                with observing(watch), stepping():
                    outs, tape = sweeps.forward(closed.jaxpr, closed.consts, dyn, active)
                    one = jnp.ones((), api._dtype_of(outs[0]))
                    watch._value(one, "the seed cotangent 1.0")
                    watch.phase = "backward"
                    cts = sweeps.backward(tape, [one] + [None] * (len(outs) - 1))
                report = watch.finish(fun_name, outs[0], cts, closed.jaxpr.invars, grad_labels)
                return report, outs, cts
            return run

        report, outs, cts = make_run()(prog.dyn)
        if not api._any_tracer(jax.tree_util.tree_leaves(report)):
            report.throw()
        grads = prog.diff_cts_to_tree(cts, args, nums)
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
