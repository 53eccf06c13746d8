"""fbackprop: functional backpropagation for JAX with its own reverse-mode engine."""

from fbackprop import extend, precision
from fbackprop import nn, privacy, train
from fbackprop._src.api import grad, value_and_grad, vjp
from fbackprop._src.derivatives import (hessian, hvp, jacfwd, jacobian, jacrev, jvp,
                                        linearize)
from fbackprop._src.tools.gradcheck import GradCheckReport, check_grads
from fbackprop._src.trace import clear_cache
from fbackprop._src.engine import NonLinearRuleError
from fbackprop._src.registry import MissingRuleError
from fbackprop._src.remat import checkpoint, checkpoint_name, checkpoint_policies, remat
from fbackprop._src.planning.residual_rows import Residual
from fbackprop._src.tools.residuals import SavedResiduals, saved_residuals
from fbackprop._src.planning.memplan import BudgetPlan
from fbackprop._src.tools.memory_plan import MemoryPlan, PlanPoint, memory_plan
from fbackprop._src.tools.checked import checked_grad, checked_value_and_grad
from fbackprop._src.tools.nonfinite import NonFiniteError, NonFiniteReport
from fbackprop._src.tools.tags import grad_and_intermediates, tag
from fbackprop._src.tools.explain import Explanation, explain
from fbackprop._src.tools.flow import GradientFlow, gradient_flow
from fbackprop._src.tools.health import (HealthReport, gradient_health, gradient_stats,
                                         plot_gradient_norms)
from fbackprop._src.per_example.api import (PerExampleStats, clipped_grad,
                                            per_example_grad_norms, per_example_stats)

__version__ = "0.1.0"

__all__ = ["GradCheckReport", "MissingRuleError", "NonLinearRuleError", "check_grads", "clear_cache", "extend", "grad", "hessian", "hvp",
           "jacfwd", "jacobian", "jacrev", "jvp", "linearize", "precision", "value_and_grad", "vjp"]
__all__ += ["Explanation", "GradientFlow", "HealthReport", "NonFiniteError", "NonFiniteReport",
            "checked_grad", "checked_value_and_grad", "explain", "grad_and_intermediates",
            "gradient_flow", "gradient_health", "gradient_stats", "plot_gradient_norms", "tag"]
__all__ += ["BudgetPlan", "MemoryPlan", "PlanPoint", "Residual", "SavedResiduals", "checkpoint",
            "checkpoint_name", "checkpoint_policies", "memory_plan", "remat", "saved_residuals"]
__all__ += ["PerExampleStats", "clipped_grad", "per_example_grad_norms", "per_example_stats"]
__all__ += ["nn", "privacy", "train"]
