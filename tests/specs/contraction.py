"""Specs for dot_general and conv_general_dilated.

Both are bilinear: the second-order specs multiply inputs together through the
contraction itself, so reverse-over-reverse runs the cotangent contractions'
own rules.
"""

from jax import lax
import jax.numpy as jnp
import numpy as np

from .common import Spec


def _uniform(rng, dtype, *shape):
    return rng.uniform(-2.0, 2.0, size=shape).astype(dtype)


def _dot(dimension_numbers, **kwargs):
    return lambda x, y: lax.dot_general(x, y, dimension_numbers, **kwargs)


def _attention(q, k, v):
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    return jnp.einsum("bhqk,bhkd->bhqd", jnp.sin(scores), v)


def _mixed_dtypes(rng, dtype):
    # A float16 operand with a wider one: the result takes the wider dtype and
    # each cotangent comes back in its own operand's dtype.
    return (_uniform(rng, np.float16, 3, 4), _uniform(rng, dtype, 4, 5))


def _conv(window_strides, padding, dimension_numbers=None, **kwargs):
    return lambda x, w: lax.conv_general_dilated(
        x, w, window_strides, padding, dimension_numbers=dimension_numbers, **kwargs)


_CONV_TOL = {"float32": (2e-4, 2e-4)}

SPECS = [
    # ------------------------------------------------------------ dot_general
    Spec("matmul", jnp.matmul, shapes=((3, 4), (4, 5))),
    Spec("matvec", jnp.dot, shapes=((3, 4), (4,))),
    Spec("vecdot", jnp.dot, shapes=((4,), (4,))),
    Spec("outer", jnp.outer, shapes=((3,), (4,))),
    Spec("matmul_transposed_operands", lambda x, y: x.T @ y.T, shapes=((4, 3), (5, 4))),
    Spec("matmul_batched_broadcast", jnp.matmul, shapes=((2, 3, 4), (4, 5))),
    Spec("matmul_batched", jnp.matmul, shapes=((2, 3, 4), (2, 4, 5))),
    Spec("einsum_attention", _attention, shapes=((2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 3))),
    Spec("einsum_bilinear_form", lambda x, a, y: jnp.einsum("i,ij,j->", x, a, y),
         shapes=((3,), (3, 4), (4,))),
    Spec("tensordot_two_axes", lambda x, y: jnp.tensordot(x, y, axes=([1, 2], [2, 0])),
         shapes=((2, 3, 4), (4, 5, 3))),
    Spec("dot_general_batch_dims_in_middle",
         _dot((((0, 3), (2, 0)), ((2,), (1,)))), shapes=((4, 2, 3, 5), (5, 3, 4, 2))),
    Spec("dot_general_contracting_unsorted",
         _dot((((2, 0), (0, 1)), ((), ()))), shapes=((3, 2, 4), (4, 3, 5))),
    Spec("dot_general_preferred_element_type",
         _dot((((1,), (0,)), ((), ())), preferred_element_type=jnp.float64),
         shapes=((3, 4), (4, 5))),
    Spec("dot_general_precision_highest",
         _dot((((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST),
         shapes=((3, 4), (4, 5))),
    Spec("dot_general_mixed_dtypes", _dot((((1,), (0,)), ((), ()))),
         make_args=_mixed_dtypes, tol={"float32": (1e-2, 1e-2), "float64": (1e-2, 1e-2)},
         order=1),
    Spec("dot_self_square", lambda x: x @ x, shapes=((3, 3),)),
    # --------------------------------------------------- conv_general_dilated
    Spec("conv1d_ncw_stride2_valid", _conv((2,), "VALID"), shapes=((2, 3, 9), (4, 3, 3)),
         tol=_CONV_TOL),
    Spec("conv1d_nwc_same_rhs_dilation",
         _conv((1,), "SAME", ("NWC", "WIO", "NWC"), rhs_dilation=(2,)),
         shapes=((2, 8, 3), (3, 3, 4)), tol=_CONV_TOL),
    Spec("conv1d_explicit_padding_lhs_dilation",
         _conv((1,), [(2, 1)], lhs_dilation=(2,)), shapes=((1, 2, 5), (3, 2, 3)),
         tol=_CONV_TOL),
    Spec("conv2d_nchw_stride2_explicit", _conv((2, 2), [(1, 0), (2, 1)]),
         shapes=((2, 3, 7, 6), (4, 3, 3, 2)), tol=_CONV_TOL),
    Spec("conv2d_nhwc_same_stride2", _conv((2, 2), "SAME", ("NHWC", "HWIO", "NHWC")),
         shapes=((2, 7, 6, 3), (3, 3, 3, 4)), tol=_CONV_TOL),
    Spec("conv2d_nhwc_valid_dilated_strided",
         _conv((2, 1), "VALID", ("NHWC", "HWIO", "NHWC"), rhs_dilation=(2, 2)),
         shapes=((1, 8, 7, 2), (2, 3, 2, 3)), tol=_CONV_TOL),
    Spec("conv2d_mixed_layouts", _conv((1, 2), "SAME", ("NHWC", "OIHW", "NCHW")),
         shapes=((2, 6, 5, 3), (4, 3, 2, 3)), tol=_CONV_TOL),
    Spec("conv2d_feature_groups", _conv((1, 1), "SAME", feature_group_count=2),
         shapes=((2, 4, 5, 5), (6, 2, 3, 3)), tol=_CONV_TOL),
    Spec("conv2d_depthwise_nhwc_stride2",
         _conv((2, 2), "SAME", ("NHWC", "HWIO", "NHWC"), feature_group_count=3),
         shapes=((2, 6, 6, 3), (3, 3, 1, 6)), tol=_CONV_TOL),
    Spec("conv2d_batch_groups", _conv((1, 1), "VALID", batch_group_count=2),
         shapes=((4, 3, 5, 5), (4, 3, 2, 2)), tol=_CONV_TOL),
    Spec("conv2d_transpose", lambda x, w: lax.conv_transpose(
        x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
         shapes=((1, 4, 3, 2), (3, 3, 2, 3)), tol=_CONV_TOL),
    Spec("conv2d_preferred_element_type_precision",
         _conv((1, 1), "VALID", precision=lax.Precision.HIGHEST,
               preferred_element_type=jnp.float64),
         shapes=((1, 2, 4, 4), (3, 2, 2, 2)), tol=_CONV_TOL),
]
