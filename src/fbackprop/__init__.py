"""fbackprop: functional backpropagation for JAX with its own reverse-mode engine."""

from fbackprop._src.api import grad, value_and_grad, vjp

__version__ = "0.1.0"

__all__ = ["grad", "value_and_grad", "vjp"]
