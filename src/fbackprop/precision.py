"""Mixed precision: dtype policies and loss scaling that are safe under ``jax.jit``.

A :class:`Policy` says in which dtype parameters are stored, computations run and
outputs are returned. Loss scales are immutable pytrees: pass them into and out
of jitted steps like any other state. The scale is always kept in float32, whatever
the compute dtype, so growing it never overflows a float16 number.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from fbackprop import precision as mp
  >>> policy = mp.Policy.parse("p=f32,c=bf16,o=f32")
  >>> def loss(params, x):
  ...     return jnp.mean((x @ params["w"]) ** 2)
  >>> step = mp.value_and_grad(loss, policy)
  >>> params = {"w": jnp.ones((3, 2))}
  >>> scale = mp.DynamicLossScale.create(2.0 ** 15)
  >>> loss_value, grads, scale, finite = step(params, jnp.ones((4, 3)), loss_scale=scale)
  >>> grads["w"].dtype, bool(finite)
  (dtype('float32'), True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from fbackprop._src import api

_ALIASES = {
    "f16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "f32": "float32", "float32": "float32", "full": "float32", "single": "float32",
    "f64": "float64", "float64": "float64", "double": "float64",
}
_KEYS = {"p": "param", "params": "param", "param": "param",
         "c": "compute", "compute": "compute",
         "o": "output", "output": "output"}


def _parse_dtype(name: str):
    key = name.strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"Unknown dtype {name!r} in a precision policy; use one of "
                         f"{sorted(set(_ALIASES))}.")
    return jnp.dtype(_ALIASES[key])


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def cast_floating(tree, dtype):
    """Casts the floating-point leaves of ``tree`` to ``dtype``; ints/bools untouched."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        if isinstance(x, float):
            return jnp.asarray(x, dtype)
        return x.astype(dtype) if _is_float(x) and x.dtype != dtype else x
    return jax.tree_util.tree_map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtypes to keep parameters in, to compute in, and to return outputs in.

    Args:
      param_dtype: dtype of stored parameters (and of their gradients).
      compute_dtype: dtype the model computes in (activations, their cotangents).
      output_dtype: dtype of the model's outputs (the loss).
    """
    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32

    def __post_init__(self):
        for f in ("param_dtype", "compute_dtype", "output_dtype"):
            object.__setattr__(self, f, jnp.dtype(getattr(self, f)))

    @classmethod
    def parse(cls, spec: str) -> "Policy":
        """Parses ``"params=float32,compute=bfloat16,output=float32"`` (or ``p=f32,c=bf16,o=f32``).

        A single dtype name (``"bf16"``) means that dtype everywhere. Missing
        entries default to float32.
        """
        spec = spec.strip()
        if "=" not in spec:
            d = _parse_dtype(spec)
            return cls(d, d, d)
        fields = {}
        for part in spec.split(","):
            if "=" not in part:
                raise ValueError(f"Cannot parse {part!r} in precision policy {spec!r}: expected "
                                 f"key=dtype with key in params/compute/output (p/c/o).")
            key, value = part.split("=", 1)
            key = key.strip().lower()
            if key not in _KEYS:
                raise ValueError(f"Unknown key {key!r} in precision policy {spec!r}; use "
                                 f"params, compute or output (p, c, o).")
            fields[_KEYS[key] + "_dtype"] = _parse_dtype(value)
        return cls(**fields)

    def cast_to_param(self, tree):
        return cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree):
        return cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        return cast_floating(tree, self.output_dtype)

    def __str__(self):
        return (f"params={self.param_dtype.name},compute={self.compute_dtype.name},"
                f"output={self.output_dtype.name}")


def get_policy(spec: "str | Policy") -> Policy:
    """A :class:`Policy` from a string or a policy."""
    return spec if isinstance(spec, Policy) else Policy.parse(spec)


# ---------------------------------------------------------------- finiteness
def all_finite(tree) -> jax.Array:
    """A scalar bool: every floating leaf of ``tree`` is free of NaN and Inf."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if _is_float(x)]
    if not leaves:
        return jnp.array(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def select_tree(pred, on_true, on_false):
    """Leafwise ``where(pred, on_true, on_false)`` for two trees of one structure."""
    pred = jnp.asarray(pred)
    if pred.shape != () or pred.dtype != jnp.bool_:
        raise ValueError(f"select_tree: `pred` must be a scalar bool, got "
                         f"{pred.dtype}{list(pred.shape)}.")
    t1 = jax.tree_util.tree_structure(on_true)
    t2 = jax.tree_util.tree_structure(on_false)
    if t1 != t2:
        raise ValueError(f"select_tree: trees differ in structure:\n  on_true:  {t1}\n"
                         f"  on_false: {t2}")
    return jax.tree_util.tree_map(lambda a, b: jax.lax.select(pred, a, b), on_true, on_false)


# ---------------------------------------------------------------- loss scales
def _scale_tree(tree, factor):
    # Multiply in float32 (or wider), then cast back: a float16 leaf times a large
    # scale must not overflow on the way.
    def mul(x):
        if not _is_float(x):
            return x
        wide = jnp.promote_types(x.dtype, jnp.float32)
        return (x.astype(wide) * factor.astype(wide)).astype(x.dtype)
    return jax.tree_util.tree_map(mul, tree)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoOpLossScale:
    """No loss scaling (float32/bfloat16 training)."""

    @property
    def loss_scale(self):
        return jnp.float32(1.0)

    def scale(self, tree):
        return tree

    def unscale(self, tree):
        return tree

    def adjust(self, grads_finite) -> "NoOpLossScale":
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StaticLossScale:
    """Multiplies the loss by a fixed factor and divides gradients by it."""
    loss_scale: jax.Array

    @classmethod
    def create(cls, loss_scale: float) -> "StaticLossScale":
        return cls(jnp.asarray(loss_scale, jnp.float32))

    def scale(self, tree):
        return _scale_tree(tree, self.loss_scale)

    def unscale(self, tree):
        return _scale_tree(tree, 1.0 / self.loss_scale)

    def adjust(self, grads_finite) -> "StaticLossScale":
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    """A loss scale that grows after ``period`` finite steps and backs off on overflow.

    Attributes:
      loss_scale: current scale, float32 scalar.
      counter: finite steps since the last change, int32 scalar.
      period: finite steps before growing (static).
      factor: growth / back-off factor (static).
      min_loss_scale: the floor the scale never goes below (static).
    """
    loss_scale: jax.Array
    counter: jax.Array
    period: int = dataclasses.field(default=2000, metadata=dict(static=True))
    factor: float = dataclasses.field(default=2.0, metadata=dict(static=True))
    min_loss_scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))

    @classmethod
    def create(cls, loss_scale: float = 2.0 ** 15, period: int = 2000, factor: float = 2.0,
               min_loss_scale: float = 1.0) -> "DynamicLossScale":
        if period < 1 or factor <= 1.0 or min_loss_scale <= 0:
            raise ValueError(f"DynamicLossScale needs period >= 1, factor > 1 and "
                             f"min_loss_scale > 0; got period={period}, factor={factor}, "
                             f"min_loss_scale={min_loss_scale}.")
        return cls(jnp.asarray(loss_scale, jnp.float32), jnp.zeros((), jnp.int32),
                   period, float(factor), float(min_loss_scale))

    def scale(self, tree):
        return _scale_tree(tree, self.loss_scale)

    def unscale(self, tree):
        return _scale_tree(tree, 1.0 / self.loss_scale)

    def adjust(self, grads_finite) -> "DynamicLossScale":
        """The next loss scale after a step whose gradients were (not) finite."""
        grads_finite = jnp.asarray(grads_finite)
        grow = grads_finite & (self.counter + 1 >= self.period)
        grown = self.loss_scale * jnp.float32(self.factor)
        # Never grow into float32 infinity either.
        grown = jnp.where(jnp.isfinite(grown), grown, self.loss_scale)
        shrunk = jnp.maximum(self.loss_scale / jnp.float32(self.factor),
                             jnp.float32(self.min_loss_scale))
        new_scale = jnp.where(grads_finite, jnp.where(grow, grown, self.loss_scale), shrunk)
        new_counter = jnp.where(grads_finite & ~grow, self.counter + 1, 0).astype(jnp.int32)
        return dataclasses.replace(self, loss_scale=new_scale, counter=new_counter)


# ------------------------------------------------------------ one way to use it
def value_and_grad(loss_fn: Callable, policy: "str | Policy",
                   argnums: int | Sequence[int] = 0, has_aux: bool = False) -> Callable:
    """Mixed-precision ``value_and_grad`` with loss scaling, differentiated by fbackprop.

    The returned function takes ``loss_fn``'s arguments plus a keyword
    ``loss_scale`` (a loss-scale object). It casts the differentiated arguments and
    the other floating arguments to the compute dtype, runs ``loss_fn``, casts the
    loss to the output dtype, scales it, differentiates, unscales the gradients
    in float32 and returns them in the parameters' dtype.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (or ``(scalar, aux)``).
      policy: a :class:`Policy` or a string for :meth:`Policy.parse`.
      argnums: which positional arguments to differentiate.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      ``f(*args, loss_scale) -> (loss, grads, new_loss_scale, grads_finite)``; with
      ``has_aux`` the loss is ``(loss, aux)``. ``loss`` is unscaled, in the output
      dtype. When ``grads_finite`` is false, skip the update (see :func:`select_tree`).
    """
    policy = get_policy(policy)

    def f(*args, loss_scale):
        nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
        param_dtypes = [jax.tree_util.tree_map(lambda x: getattr(x, "dtype", None), args[i])
                        for i in nums]

        def scaled_loss(*inner):
            out = loss_fn(*policy.cast_to_compute(inner))
            loss, aux = out if has_aux else (out, None)
            loss = policy.cast_to_output(loss)
            return loss_scale.scale(loss.astype(jnp.promote_types(loss.dtype, jnp.float32))), \
                (loss, aux)

        (_, (loss, aux)), grads = api.value_and_grad(scaled_loss, argnums=argnums,
                                                     has_aux=True)(*args)
        grads_t = (grads,) if isinstance(argnums, int) else grads
        unscaled = []
        for g, dts in zip(grads_t, param_dtypes):
            g = loss_scale.unscale(cast_floating(g, jnp.float32))
            unscaled.append(jax.tree_util.tree_map(
                lambda x, dt: x.astype(dt) if dt is not None else x, g, dts))
        grads = unscaled[0] if isinstance(argnums, int) else tuple(unscaled)
        finite = all_finite(grads)
        new_scale = loss_scale.adjust(finite)
        return ((loss, aux) if has_aux else loss), grads, new_scale, finite

    return f


__all__ = ["Policy", "get_policy", "cast_floating", "all_finite", "select_tree",
           "NoOpLossScale", "StaticLossScale", "DynamicLossScale", "value_and_grad"]
