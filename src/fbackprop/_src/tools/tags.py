"""Named intermediates: :func:`tag` and :func:`grad_and_intermediates`.

:func:`tag` names a value; :func:`grad_and_intermediates` returns the
cotangent arriving at every named value next to the usual gradients, and a
tag's ``hook`` reads or replaces that cotangent during the backward sweep.
Top-level tags are seen by the observer directly; tags inside loop, branch and
checkpoint bodies get perturbation inputs (:mod:`fbackprop._src.tools.perturb`),
so their cotangents come out of the ordinary control-flow rules, one per step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from .. import api, compat, trace
from .. import context
from ..engine import recording, sweeps
from ..rules.debug import NAMED_PRIMITIVES, tag_p
from . import perturb
from .common import _sub_jaxprs, _trace_state, inlined_jaxpr, observing


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
    at it (:mod:`fbackprop._src.tools.perturb`, applied to the one equation holding
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

