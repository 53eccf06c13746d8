"""Elementwise primitives: VJP and JVP rules side by side.

Binary lax primitives broadcast inside the primitive (``add f32[3,4] f32[1,4]``,
``mul x 2.0:f32[]``), so every binary VJP sums its cotangent back to each
operand's shape with ``unbroadcast``.
"""

from __future__ import annotations

from jax import lax

from ..registry import defjvp, defnondiff, defvjp, unbroadcast


# ------------------------------------------------------------------ linear ops
defvjp(lax.add_p,
       lambda ct, out, x, y, **_: unbroadcast(ct, x),
       lambda ct, out, x, y, **_: unbroadcast(ct, y))
defjvp(lax.add_p, lambda t, out, x, y, **_: t, lambda t, out, x, y, **_: t)

defvjp(lax.sub_p,
       lambda ct, out, x, y, **_: unbroadcast(ct, x),
       lambda ct, out, x, y, **_: unbroadcast(lax.neg(ct), y))
defjvp(lax.sub_p, lambda t, out, x, y, **_: t, lambda t, out, x, y, **_: lax.neg(t))

defvjp(lax.neg_p, lambda ct, out, x, **_: lax.neg(ct))
defjvp(lax.neg_p, lambda t, out, x, **_: lax.neg(t))


# --------------------------------------------------------------- products
defvjp(lax.mul_p,
       lambda ct, out, x, y, **_: unbroadcast(lax.mul(ct, y), x),
       lambda ct, out, x, y, **_: unbroadcast(lax.mul(x, ct), y))
defjvp(lax.mul_p,
       lambda t, out, x, y, **_: lax.mul(t, y),
       lambda t, out, x, y, **_: lax.mul(x, t))


# ------------------------------------------------------ one-derivative functions
# d/dx sin x = cos x
defvjp(lax.sin_p, lambda ct, out, x, **_: lax.mul(ct, lax.cos(x)))
defjvp(lax.sin_p, lambda t, out, x, **_: lax.mul(t, lax.cos(x)))

# d/dx cos x = -sin x
defvjp(lax.cos_p, lambda ct, out, x, **_: lax.neg(lax.mul(ct, lax.sin(x))))
defjvp(lax.cos_p, lambda t, out, x, **_: lax.neg(lax.mul(t, lax.sin(x))))

# d/dx exp x = exp x (reuse the output)
defvjp(lax.exp_p, lambda ct, out, x, **_: lax.mul(ct, out))
defjvp(lax.exp_p, lambda t, out, x, **_: lax.mul(t, out))

# d/dx log x = 1/x
defvjp(lax.log_p, lambda ct, out, x, **_: lax.div(ct, x))
defjvp(lax.log_p, lambda t, out, x, **_: lax.div(t, x))


# ------------------------------------------------------------ no gradient
defnondiff(lax.eq_p, lax.ne_p, lax.lt_p, lax.le_p, lax.gt_p, lax.ge_p,
           lax.stop_gradient_p if hasattr(lax, "stop_gradient_p") else "stop_gradient")
