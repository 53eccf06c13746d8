from jax import lax
import jax.numpy as jnp

from .common import Spec

SPECS = [
]
