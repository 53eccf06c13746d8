"""Registering derivative rules for your own primitives.

fbackprop differentiates a jaxpr primitive by primitive. A primitive of your own
(``jax.extend.core.Primitive``) needs a reverse-mode rule (and, for forward mode,
a JVP rule) before fbackprop can differentiate through it.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jax.extend.core import Primitive
  >>> from jax.interpreters import mlir
  >>> import fbackprop as fb
  >>> from fbackprop import extend
  >>> cube_p = Primitive("my_cube")
  >>> cube_p.def_impl(lambda x: x ** 3)
  <function <lambda> at ...>
  >>> cube_p.def_abstract_eval(lambda x: x)
  <function <lambda> at ...>
  >>> mlir.register_lowering(cube_p, mlir.lower_fun(lambda x: x ** 3, multiple_results=False))
  >>> extend.defvjp(cube_p, lambda ct, out, x: ct * 3 * x ** 2)
  >>> extend.defjvp(cube_p, lambda t, out, x: t * 3 * x ** 2)
  >>> fb.grad(cube_p.bind)(2.0)
  Array(12., dtype=float32, weak_type=True)

Rule signatures (arrays positional, primitive parameters keyword-only):

* ``defvjp(prim, *per_input)``: one function per input,
  ``g(ct, out, *primals, **params) -> cotangent of that input``; ``None`` for an
  input without gradient.
* ``register_vjp(prim, rule)``: ``rule(cts, outs, *primals, **params)`` returns
  one cotangent per input (``None`` for zero); for ``multiple_results``
  primitives ``cts``/``outs`` are lists and a cotangent may be ``None``.
  ``register_vjp(prim, rule, fwd=fwd)`` also replaces the forward evaluation by
  ``fwd(*primals, **params) -> (outs, residuals)``; the rule then receives
  ``residuals=`` (for something the forward pass can produce cheaply, like a
  sort's permutation).
* ``defjvp(prim, *per_input)``: ``g(t, out, *primals, **params)`` is the
  contribution of that input's tangent ``t`` to the output tangent.
* ``register_jvp(prim, rule)``: ``rule(primals, tangents, **params) -> (outs,
  out_tangents)``, ``None`` tangents meaning zero.
* ``defnondiff(*prims)``: outputs carry no gradient (integer-valued ops etc.).

A cotangent must have its primal's shape and dtype; fbackprop checks it after
every rule and names the primitive when it does not.
"""

from fbackprop._src.registry import (MissingRuleError, defjvp, defnondiff, defvjp,
                                     register_jvp, register_vjp, unbroadcast)

__all__ = ["MissingRuleError", "defjvp", "defnondiff", "defvjp", "register_jvp",
           "register_vjp", "unbroadcast"]
