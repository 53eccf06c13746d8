"""Command line: ``python -m fbackprop demo | bench | explain [options]`` (or ``--version``).

Each subcommand lives in its own module, imported only when it is asked for, so
``python -m fbackprop bench`` does not pay for the demo's imports and the other
way round.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help)
SUBCOMMANDS = {
    "demo": ("fbackprop.demo", "main",
             "train a small MLP on scikit-learn's digits with fbackprop gradients"),
    "bench": ("fbackprop.bench.cli", "main",
              "benchmark fbackprop against jax (step time, FLOPs, memory, tracing, eager)"),
    "explain": ("fbackprop._src.cli", "explain_main",
                "show how a gradient is computed, equation by equation"),
}


def usage() -> str:
    lines = ["usage: python -m fbackprop {" + ",".join(SUBCOMMANDS) + "} [options]",
             "       python -m fbackprop --version", "", "subcommands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines.append("\nRun `python -m fbackprop <subcommand> --help` for its options.")
    return "\n".join(lines)


def version() -> str:
    """``fbackprop X (jax Y, jaxlib Z, python W)``: what a bug report needs."""
    import platform

    import jax
    import jaxlib

    import fbackprop
    return (f"fbackprop {fbackprop.__version__} (jax {jax.__version__}, jaxlib "
            f"{jaxlib.__version__}, python {platform.python_version()})")


def main(argv: list[str] | None = None) -> int:
    """Dispatches to a subcommand's ``main(argv)``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"python -m fbackprop: error: unknown subcommand {name!r}; choose from "
              f"{', '.join(SUBCOMMANDS)} (see --help)", file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing subcommand module is reported this way; a missing
        # dependency inside it keeps its own traceback.
        if exc.name != module_name:
            raise
        print(f"fbackprop: the '{name}' subcommand is not available in this version "
              f"(module {module_name} is missing).", file=sys.stderr)
        return 2
    func = getattr(module, func_name)
    prog = f"python -m fbackprop {name}"
    if name == "bench":
        code = func(rest, prog=prog)
    elif _takes_argument(func):
        code = func(rest)
    else:   # a main() that reads sys.argv itself
        saved, sys.argv = sys.argv, [prog] + rest
        try:
            code = func()
        finally:
            sys.argv = saved
    return int(code or 0)


def _takes_argument(func) -> bool:
    import inspect
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
               for p in params)


if __name__ == "__main__":
    sys.exit(main())
