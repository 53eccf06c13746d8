"""Special functions (incomplete gamma/beta, zeta), gamma sampling, scatter-min/max.

JAX has no derivative of ``igamma_grad_a`` (the derivative of ``igamma`` in
``a``), so specs that differentiate ``igamma`` in ``a`` stop at first order,
and the spec of ``igamma_grad_a`` itself cannot be compared with JAX: its rule
(the derivative in ``x``) is checked against closed forms in its own test.
"""

import jax
import jax.numpy as jnp
import jax.scipy.special as jss
import numpy as np
from jax import lax

from .common import Spec

_A, _X = (0.5, 3.0), (0.3, 4.0)


def _scatter_args(rng, dtype):
    """Operand, repeated indices and updates with ties (operand/update, update/update)."""
    x = rng.uniform(-1, 1, (5, 3)).astype(dtype)
    idx = np.array([0, 0, 2, 4, 4, 1, 2], np.int32)
    u = rng.uniform(-2, 2, (7, 3)).astype(dtype)
    u[1] = u[0]              # two updates of row 0 tie with each other
    u[2, 0] = x[2, 0]        # an update ties with the operand
    u[6, 1] = x[2, 1]        # ... and a second one at a position a third update hits
    u[3, 2] = u[4, 2] = 5.0  # updates of row 4 tie above the operand
    u[5] = x[1]              # every element of row 1 ties with its operand
    return x, idx, u


SPECS = [
    # ------------------------------------------------------- incomplete gamma
    Spec("sp_igamma_x", lambda x: jss.gammainc(2.5, x), domain=_X),
    Spec("sp_igamma_a", lambda a: jss.gammainc(a, 1.7), domain=_A, order=1),
    # The primitive broadcasts a size-1 dimension inside.
    Spec("sp_igamma_both", lax.igamma, shapes=((1, 4), (3, 4)), domain=(_A, _X), order=1),
    Spec("sp_igammac_x", lambda x: jss.gammaincc(1.5, x), domain=_X),
    Spec("sp_igammac_both", lax.igammac, shapes=((3, 4), (3, 4)), domain=(_A, _X), order=1),
    # No JAX reference: JAX has no rule for igamma_grad_a.
    Spec("sp_igamma_grad_a", lambda a, x: lax.igamma_grad_a(a, x), shapes=((3, 4), (3, 4)),
         domain=(_A, _X), modes=()),
    # ---------------------------------------------------------- Hurwitz zeta
    # jax.scipy.special.zeta is a custom_jvp function around the zeta primitive.
    Spec("sp_zeta", jss.zeta, shapes=((3,), (3,)), domain=((2.0, 4.0), (0.5, 2.0)),
         tol={"float32": (1e-3, 1e-3)}),
    # -------------------------------------------------------- incomplete beta
    Spec("sp_betainc_x", lambda x: jss.betainc(2.0, 3.0, x), domain=(0.05, 0.95)),
    Spec("sp_betainc_x_broadcast",
         lambda a, x: (lambda a: a + jss.betainc(a, 1.5, x))(
             jnp.broadcast_to(lax.stop_gradient(a), x.shape)),
         shapes=((4,), (3, 4)), domain=((0.5, 3.0), (0.05, 0.95))),
    # --------------------------------------------------------- gamma sampling
    Spec("sp_random_gamma", lambda a: jax.random.gamma(jax.random.key(0), a), shapes=((6,),),
         domain=(0.5, 3.0), order=1, tol={"float32": (1e-3, 1e-3)}),
    Spec("sp_random_loggamma", lambda a: jax.random.loggamma(jax.random.key(1), a),
         shapes=((2, 3),), domain=(0.5, 3.0), order=1, tol={"float32": (1e-3, 1e-3)}),
    Spec("sp_random_beta", lambda a, b: jax.random.beta(jax.random.key(2), a, b),
         shapes=((4,), (4,)), domain=(1.0, 3.0), order=1, tol={"float32": (1e-3, 1e-3)}),
    # ------------------------------------------------------ scatter min / max
    Spec("sp_scatter_max", lambda x, idx, u: x.at[idx].max(u), make_args=_scatter_args),
    Spec("sp_scatter_min", lambda x, idx, u: (-x).at[idx].min(-u), make_args=_scatter_args),
    Spec("sp_scatter_max_columns", lambda x, idx, u: jnp.sin(x.T.at[:, idx].max(u.T)),
         make_args=_scatter_args),
]
