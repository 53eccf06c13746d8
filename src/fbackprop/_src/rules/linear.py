"""Which primitives are linear in which inputs (checked when a custom JVP rule is transposed).

Reverse mode of a ``jax.custom_jvp`` function runs fbackprop's sweeps over the
user's JVP rule as a function of its tangents; that gives the transpose only
when the rule is linear in them. While such a sweep runs, every equation that
reads a tangent must be listed here: ``True`` when it is linear in all its
inputs, or a predicate over which inputs carry a tangent (a product is linear
when one factor is a constant, a quotient when the tangent is the numerator,
a gather when the tangent is the operand and not the indices).
"""

from __future__ import annotations

from .. import compat
from ..registry import linear_primitives


def _at_most_one(active, **_) -> bool:
    return sum(bool(a) for a in active) <= 1


def _only(*positions):
    allowed = set(positions)

    def pred(active, **_) -> bool:
        return all(i in allowed for i, a in enumerate(active) if a)
    return pred


def _all_but(*positions):
    banned = set(positions)

    def pred(active, **_) -> bool:
        return not any(a for i, a in enumerate(active) if i in banned)
    return pred


# Linear in every input.
for _name in [
        "add", "add_any", "sub", "neg", "convert_element_type", "copy", "reduce_sum",
        "broadcast_in_dim", "reshape", "squeeze", "transpose", "rev", "slice", "pad",
        "concatenate", "split", "stack", "unstack", "tile", "real", "imag", "complex",
        "conj", "fft", "cumsum", "reduce_window_sum", "reduce_precision",
        "psum", "psum_invariant", "pvary", "all_gather", "reduce_scatter", "ppermute",
        "all_to_all", "sharding_constraint", "device_put", "optimization_barrier",
        "fbackprop_tag", "name",
        # Call primitives: their bodies are checked equation by equation.
        *compat.JIT_NAMES, *compat.REMAT_NAMES, *compat.CALL_BODIES, "scan", "cond", "while",
        compat.CUSTOM_JVP_CALL, compat.CUSTOM_VJP_CALL, "shard_map"]:
    linear_primitives[_name] = True

# Bilinear: linear when at most one operand is a tangent.
for _name in ["mul", "dot_general", "conv_general_dilated"]:
    linear_primitives[_name] = _at_most_one

linear_primitives["div"] = _only(0)                        # t / c
linear_primitives["select_n"] = _all_but(0)                # the predicate is a constant
linear_primitives["dynamic_slice"] = _only(0)              # operand, not the indices
linear_primitives["dynamic_update_slice"] = _only(0, 1)    # operand and update
linear_primitives["gather"] = _only(0)
linear_primitives["scatter-add"] = _only(0, 2)             # operand, indices, updates
linear_primitives["scatter-sub"] = _only(0, 2)
linear_primitives["scatter"] = _only(0, 2)
linear_primitives["select_and_scatter_add"] = _only(0)     # source, operand
linear_primitives["select_and_gather_add"] = _only(0)      # tangents, operand
linear_primitives["triangular_solve"] = _only(1)           # a, b: linear in b
linear_primitives["tridiagonal_solve"] = _only(3)          # dl, d, du, b


def _linear_solve(active, *, const_lengths, **_) -> bool:
    n_consts = sum(const_lengths)            # the operator's constants, then b
    return not any(active[:n_consts])


linear_primitives["custom_linear_solve"] = _linear_solve
