"""Reroutes JAX's differentiation entry points to fbackprop, for the test side only.

JAX's tests reach the entry points in three ways: ``jax.grad`` (attribute of the
``jax`` package), ``from jax import grad`` (a name bound when the test module is
imported) and ``api.grad`` with ``from jax._src import api``; ``check_grads`` in
``jax._src.public_test_util`` calls ``api.jvp``/``api.vjp``/``api.linearize``.
:func:`install` replaces the attribute on both ``jax`` and ``jax._src.api`` with a
*router* before any test module is imported, so all three routes reach it.

JAX itself also calls ``api.jvp`` and friends at run time (inside JVP rules of
``lax`` functions, ``jax.scipy.optimize``, ``custom_root``...). Those calls must stay
JAX's, so the router looks at who called it: code of a test module (or of JAX's
test helpers) goes to fbackprop, code inside ``jax``/``jaxlib``/``fbackprop`` goes
to JAX (see :func:`called_from_test_side` for functions handed to JAX as values).

Every call is counted (:data:`calls`), per entry point and per destination, so a
run can prove that fbackprop really was the one called.
"""

from __future__ import annotations

import collections
import functools
import sys
from typing import Callable

ENTRY_POINTS = ("grad", "value_and_grad", "vjp", "jvp", "linearize", "jacfwd", "jacrev",
                "jacobian", "hessian")

# JAX modules that act for the test: their calls are the test's calls.
TEST_SIDE_MODULES = frozenset({"jax._src.public_test_util", "jax._src.test_util",
                               "jax.test_util"})
LIBRARY_PACKAGES = frozenset({"jax", "jaxlib", "fbackprop"})

# calls[entry_point]["fbackprop" | "jax"] -> count, for the current test.
calls: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
originals: dict[str, Callable] = {}
_mode: str | None = None


def called_from_test_side(frame, name: str) -> bool:
    """Whether the call of entry point ``name`` made in ``frame`` is the test's.

    Test modules and JAX's test helpers are the test side. Library code (JAX,
    fbackprop) that calls the entry point *by name* (``api.jvp(...)`` in a JVP rule)
    is JAX's own use. Library code that calls it without naming it was handed the
    function as a value -- ``check_grads``'s ``partial(api.jvp, f)`` being traced,
    ``jax.tree.map(jax.grad, fs)`` -- and the value came from the test.
    """
    module = frame.f_globals.get("__name__", "") or ""
    if module in TEST_SIDE_MODULES:
        return True
    if module.split(".", 1)[0] not in LIBRARY_PACKAGES:
        return True
    return name not in frame.f_code.co_names


def _router(name: str, jax_fn: Callable, fb_fn: Callable | None) -> Callable:
    @functools.wraps(jax_fn)
    def route(*args, **kwargs):
        test_side = called_from_test_side(sys._getframe(1), name)
        if test_side and fb_fn is not None:
            calls[name]["fbackprop"] += 1
            return fb_fn(*args, **kwargs)
        calls[name]["jax (test side)" if test_side else "jax (internal)"] += 1
        return jax_fn(*args, **kwargs)

    route.__conformance_router__ = name
    return route


def install(mode: str) -> None:
    """Installs the routers. ``mode`` is ``"fbackprop"`` (reroute) or ``"jax"`` (count only).

    Must run before the test modules are imported (``from jax import grad`` binds the
    name at import time). Installing twice is an error: the first mode would stay.
    """
    global _mode
    if mode not in ("fbackprop", "jax"):
        raise ValueError(f"mode must be 'fbackprop' or 'jax', got {mode!r}")
    if _mode is not None:
        raise RuntimeError(f"conformance routers already installed (mode {_mode!r})")
    import jax
    from jax._src import api

    fb = None
    if mode == "fbackprop":
        import fbackprop as fb
    for name in ENTRY_POINTS:
        jax_fn = getattr(api, name)
        originals[name] = jax_fn
        route = _router(name, jax_fn, getattr(fb, name) if fb is not None else None)
        setattr(api, name, route)
        setattr(jax, name, route)
    _mode = mode


def uninstall() -> None:
    global _mode
    import jax
    from jax._src import api

    for name, jax_fn in originals.items():
        setattr(api, name, jax_fn)
        setattr(jax, name, jax_fn)
    originals.clear()
    _mode = None


def reset_counts() -> None:
    calls.clear()


def snapshot_counts() -> dict[str, dict[str, int]]:
    return {name: dict(counter) for name, counter in sorted(calls.items()) if counter}


def test_side_calls(counts: dict[str, dict[str, int]]) -> int:
    """Calls made by the test (routed to fbackprop, or would have been in a JAX run)."""
    return sum(c.get("fbackprop", 0) + c.get("jax (test side)", 0) for c in counts.values())
