"""Specs for the marker primitives: fbackprop's tag and JAX's checkpoint_name.

Both are the identity, so fbackprop and JAX must agree to every order. (Hooks
are fbackprop-only and are tested in tests/test_debug.py.)
"""

import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import fbackprop as fb

from .common import Spec

SPECS = [
    Spec("tag", lambda x: lax.sin(fb.tag(x * x, "sq")) * x),
    Spec("tag_scalar", lambda x: fb.tag(jnp.exp(x), "e") ** 2, shapes=((),)),
    Spec("tag_pytree", lambda x, y: (lambda t: t["a"] * lax.cos(t["b"]))(
        fb.tag({"a": x, "b": y}, "pair")), shapes=((3, 4), (3, 4))),
    Spec("checkpoint_name", lambda x: lax.sin(checkpoint_name(x * 2.0, "h")) * x),
]
