"""fbackprop: functional backpropagation for JAX with its own reverse-mode engine."""

from fbackprop import extend
from fbackprop._src.api import grad, value_and_grad, vjp
from fbackprop._src.trace import clear_cache

__version__ = "0.1.0"

__all__ = ["clear_cache", "extend", "grad", "value_and_grad", "vjp"]
