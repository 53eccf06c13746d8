from jax import lax
import jax.numpy as jnp

from .common import Spec

SPECS = [
    Spec("add", lax.add, shapes=((3, 4), (3, 4))),
    Spec("add_broadcast_inside", lambda x, y: lax.add(x, y), shapes=((3, 4), (1, 4))),
    Spec("sub", lax.sub, shapes=((3, 4), (3, 4))),
    Spec("neg", lax.neg),
    Spec("mul", lax.mul, shapes=((3, 4), (3, 4))),
    Spec("mul_scalar_literal", lambda x: x * 2.5),
    Spec("sin", lax.sin),
    Spec("cos", lax.cos),
    Spec("exp", lax.exp),
    Spec("log", lax.log, domain=(0.5, 3.0)),
    Spec("compare_where", lambda x, y: jnp.where(x > y, x, y) * lax.stop_gradient(x),
         shapes=((3, 4), (3, 4)), order=1),
]
