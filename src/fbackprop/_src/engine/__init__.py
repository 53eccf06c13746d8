"""fbackprop's engine core: records, the forward and backward sweeps, forward mode.

- :mod:`.tape`: :class:`Record` and :class:`Tape`.
- :mod:`.sweeps`: :func:`forward_eqn` (the one forward step, the only code that
  makes a record), :func:`forward` over a jaxpr, :func:`backward`.
- :mod:`.recording`: the define-by-run trace every reverse-mode front end
  records through (:func:`record`).
- :mod:`.tangents`: forward mode, over a jaxpr or define-by-run.
- :mod:`.linear`: the linearity check of sweeps that transpose a JVP rule.
- :mod:`.context`: the sweep context, which decides the path each step takes.

The engine reads the rule tables (:mod:`fbackprop._src.registry`), which the
rule modules fill; it never imports them, nor any front end or tool.
"""

from .. import context
from .linear import NonLinearRuleError
from .recording import Recording, RecordingTrace, record, recorded_jaxpr
from .sweeps import apply_rule, backward, forward, forward_eqn
from .tangents import jvp_eqn, jvp_jaxpr, push_tangents
from .tape import Record, Tape

__all__ = ["NonLinearRuleError", "Record", "Recording", "RecordingTrace", "Tape",
           "apply_rule", "backward", "context", "forward", "forward_eqn", "jvp_eqn",
           "jvp_jaxpr", "push_tangents", "record", "recorded_jaxpr"]
