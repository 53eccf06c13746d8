"""Call primitives: nested jit, closed_call, custom_jvp, custom_vjp."""

import jax
import jax.numpy as jnp

from .common import Spec


@jax.custom_jvp
def _softplus(x):
    return jnp.logaddexp(x, 0.0)


_softplus.defjvps(lambda t, ans, x: t * jax.nn.sigmoid(x))


@jax.custom_jvp
def _two_outputs(x, y):
    return x * y, jnp.sin(x)


@_two_outputs.defjvp
def _two_outputs_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    return _two_outputs(x, y), (tx * y + x * ty, jnp.cos(x) * tx)


@jax.custom_vjp
def _swish(x):
    return x * jax.nn.sigmoid(x)


def _swish_fwd(x):
    s = jax.nn.sigmoid(x)
    return x * s, (x, s)


def _swish_bwd(res, ct):
    x, s = res
    return (ct * (s + x * s * (1 - s)),)


_swish.defvjp(_swish_fwd, _swish_bwd)


@jax.custom_vjp
def _scaled_pair(x, y):
    return x * 2.0, x * y


def _scaled_pair_fwd(x, y):
    return _scaled_pair(x, y), (x, y)


def _scaled_pair_bwd(res, cts):
    x, y = res
    ct_a, ct_b = cts
    return ct_a * 2.0 + ct_b * y, ct_b * x


_scaled_pair.defvjp(_scaled_pair_fwd, _scaled_pair_bwd)


SPECS = [
    Spec("nested_jit", jax.jit(lambda x: jnp.sin(x) * jax.jit(jnp.exp)(x))),
    Spec("nested_jit_two_outputs", lambda x, y: jnp.sum(
        jnp.stack(jax.jit(lambda a, b: (a * b, a - b))(x, y))), shapes=((3, 4), (3, 4))),
    Spec("custom_jvp_relu", lambda x: jax.nn.relu(x) * x),
    Spec("custom_jvp_relu6", lambda x: jax.nn.relu6(x) * x, domain=(-2.0, 8.0)),
    Spec("custom_jvp_softplus", lambda x: _softplus(x) ** 2),
    Spec("custom_jvp_two_outputs", lambda x, y: _two_outputs(x, y)[0] + _two_outputs(x, y)[1],
         shapes=((3, 4), (3, 4))),
    Spec("custom_jvp_logsumexp", lambda x: jax.nn.logsumexp(x, axis=-1)),
    Spec("custom_vjp_swish", lambda x: _swish(x) * x, modes=("rev",)),
    Spec("custom_vjp_two_inputs", lambda x, y: _scaled_pair(x, y)[1] - _scaled_pair(x, y)[0],
         shapes=((3, 4), (3, 4)), modes=("rev",)),
]
