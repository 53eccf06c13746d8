"""One row per value the forward sweep keeps for the backward sweep: what produced
it and where in the user's code, looking through the loops the handlers emit.
:func:`fbackprop.saved_residuals` lists them for a function, and a memory-budget
plan (:class:`fbackprop.BudgetPlan`) for the values it keeps."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .. import compat, registry
from ..residuals import Split, _is_var


@dataclasses.dataclass(frozen=True)
class Residual:
    """One value the forward sweep keeps for the backward sweep.

    Attributes:
      shape: its shape (with the leading steps axis for values kept per step
        of a scan).
      dtype: its dtype.
      nbytes: its size in bytes.
      kind: ``"argument"``, ``"constant"`` or ``"intermediate"``.
      primitive: the primitive that produced it (``None`` for arguments).
      source: the user's ``file:line`` that produced it, or the argument's path.
      detail: e.g. ``"named 'h'"``, ``"per step of scan (length 64)"``.
    """
    shape: tuple
    dtype: np.dtype
    nbytes: int
    kind: str
    primitive: str | None
    source: str
    detail: str = ""

    def describe(self) -> str:
        """One line: what produced the value, where, and how it is kept."""
        if self.primitive is None:
            text = f"the {self.kind} {self.source}"
        else:
            text = f"{self.primitive} at {self.source}"
        return text + (f" ({self.detail})" if self.detail else "")




def _nbytes(aval) -> int:
    return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def _producers(jaxpr) -> dict:
    return {v: e for e in jaxpr.eqns for v in e.outvars if _is_var(v)}


def _describe_var(v, jaxpr, steps: list[str]) -> tuple[str | None, str, list[str]]:
    """(primitive, source line, details) of the equation that produced ``v``,
    looking through the loops our handlers emit to the per-step producer."""
    e = _producers(jaxpr).get(v)
    if e is None:
        return None, "<input>", steps
    name = e.primitive.name
    if name == "reduce_precision" and _is_var(e.invars[0]):
        # A checkpoint rounds what it saves (compat.round_residuals): the value
        # is its input's, as in JAX's report of saved residuals.
        return _describe_var(e.invars[0], jaxpr, steps)
    if name == "scan":
        k = list(e.outvars).index(v)
        num_carry = e.params["num_carry"]
        body = e.params["jaxpr"].jaxpr
        if k >= num_carry:
            inner = body.outvars[k]
            note = f"x{e.params['length']} steps of the scan at {compat.source_line(e)}"
            if _is_var(inner):
                prim, src, details = _describe_var(inner, body, steps + [note])
                if prim is not None:
                    return prim, src, details
                idx = list(body.invars).index(inner) if inner in body.invars else None
                if idx is not None and idx >= e.params["num_consts"] + num_carry:
                    return "scan", compat.source_line(e), steps + [
                        f"its xs slice, x{e.params['length']} steps"]
                if idx is not None:
                    return "scan", compat.source_line(e), steps + [
                        f"its carry, x{e.params['length']} steps"]
            return "scan", compat.source_line(e), steps + [note]
        return "scan", compat.source_line(e), steps + ["its final carry"]
    if name == "cond":
        k = list(e.outvars).index(v)
        found = []
        for b, branch in enumerate(e.params["branches"]):
            inner = branch.jaxpr.outvars[k]
            if _is_var(inner) and inner in _producers(branch.jaxpr):
                prim, src, _ = _describe_var(inner, branch.jaxpr, [])
                found.append((b, prim, src))
        if len(found) == 1:
            b, prim, src = found[0]
            where = f"in branch {b} of the cond at {compat.source_line(e)}"
            return prim, src, [*steps, where]
    details = list(steps)
    if name == "name":
        details.append(f"named {e.params['name']!r}")
    elif name in compat.JIT_NAMES and e.params.get("name") == "while_forward":
        details.append("kept by the lax.while_loop's forward loop for its backward "
                       "(loop states, their steps, the trip count)")
    elif name in compat.JIT_NAMES:
        details.append(f"output of jitted function {e.params.get('name', '?')!r}")
    owner = registry.rule_owner(e.primitive)
    if owner is not None:
        details.append(f"rule from {owner}")
    return name, compat.source_line(e), details


def report_split(split: Split, arg_names: Sequence[str]) -> tuple:
    """The :class:`Residual` rows of a split (``arg_names``: one per primal input)."""
    rows = []
    joint_jaxpr = split.joint.jaxpr
    for (kind, idx), v in zip(split.saved, split.saved_vars):
        aval = v.aval
        if kind == "input":
            rows.append(Residual(tuple(aval.shape), np.dtype(aval.dtype), _nbytes(aval),
                                 "argument", None, arg_names[idx]))
            continue
        prim, src, details = _describe_var(v, joint_jaxpr, [])
        rows.append(Residual(tuple(aval.shape), np.dtype(aval.dtype), _nbytes(aval),
                             "intermediate", prim, src, "; ".join(details)))
    return tuple(rows)
