"""fbackprop: functional backpropagation for JAX with its own reverse-mode engine."""

from fbackprop import extend, precision
from fbackprop._src.api import grad, value_and_grad, vjp
from fbackprop._src.derivatives import (hessian, hvp, jacfwd, jacobian, jacrev, jvp,
                                        linearize)
from fbackprop._src.gradcheck import GradCheckReport, check_grads
from fbackprop._src.trace import clear_cache

__version__ = "0.1.0"

__all__ = ["GradCheckReport", "check_grads", "clear_cache", "extend", "grad", "hessian", "hvp",
           "jacfwd", "jacobian", "jacrev", "jvp", "linearize", "precision", "value_and_grad", "vjp"]
