"""What the ``python -m fbackprop`` subcommands share (their argument parser), and the
``explain`` subcommand.

A user mistake on the command line (an unknown option, a bad value, an output
file that cannot be written) prints one line, ``<prog>: error: <what> (see
--help)``, and exits with status 2, as argparse does, but without the usage
block and never with a traceback. ``--help`` shows every option's default.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Sequence


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written (paragraphs, lists); ``(default: ...)`` after each help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default is None or action.default is False or \
                action.default is argparse.SUPPRESS or action.default == [] or \
                not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with one-line errors and defaults in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        """Prints ``<prog>: error: <message> (see --help)`` to stderr and exits with 2."""
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')} (see --help)\n")


def check_output_path(parser: ArgumentParser, option: str, path: str) -> str:
    """Creates the folder of an output file; a path that cannot be written is a usage error.

    Writability is tried, not inferred from permission bits: ``os.access`` says
    yes to root everywhere, and special or read-only file systems (``/proc``, a
    read-only mount) refuse writes that the bits allow. An existing file is
    opened for appending (its content is left alone); a new one is created and
    removed again.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"{option} {path!r} is a folder; give a file name")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        parser.error(f"{option} {path!r}: cannot create its folder {folder!r} "
                     f"({exc.strerror or exc})")
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        parser.error(f"{option} {path!r}: cannot write this file ({exc.strerror or exc}); "
                     f"give a path in a writable folder")
    if not existed:
        os.remove(path)
    return path


def check_output_dir(parser: ArgumentParser, option: str, path: str) -> str:
    """Creates an output folder; one that cannot be made or written to is a usage error
    (tried by creating a temporary file in it, as :func:`check_output_path` does)."""
    import tempfile
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"{option} {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        parser.error(f"{option} {path!r}: cannot create the folder ({exc.strerror or exc})")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        parser.error(f"{option} {path!r}: cannot write in this folder "
                     f"({exc.strerror or exc}); give a writable folder")
    return path


# ------------------------------------------------- python -m fbackprop explain
# The graph every backprop tutorial starts with (loss 64, dloss/dx 64, dloss/dy 32
# at x=2, y=3). It is compiled from text under its own file name (registered with
# linecache) because source lines inside fbackprop itself are hidden from reports.
SEED_EXAMPLE_FILE = "seed_example.py"
SEED_EXAMPLE_SOURCE = """\
def seed_example(x, y):
    z = x * y
    w = z + x
    loss = w ** 2
    return loss
"""


def _make_seed_example():
    import linecache
    linecache.cache[SEED_EXAMPLE_FILE] = (len(SEED_EXAMPLE_SOURCE), None,
                                          SEED_EXAMPLE_SOURCE.splitlines(True),
                                          SEED_EXAMPLE_FILE)
    namespace: dict = {}
    exec(compile(SEED_EXAMPLE_SOURCE, SEED_EXAMPLE_FILE, "exec"), namespace)
    return namespace["seed_example"]


seed_example = _make_seed_example()


def explain_main(argv: Sequence[str] | None = None) -> int:
    """``python -m fbackprop explain``: render the seed example's backward pass."""
    from .tools.explain import explain
    from .tools.explanation import GRAPHVIZ_MISSING, PNG_NEEDS_GRAPHVIZ, output_format
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    if argv and argv[0] == "explain":
        argv = argv[1:]
    parser = ArgumentParser(
        prog="python -m fbackprop explain",
        description="Explain the backward pass of  z = x*y; w = z + x; loss = w**2  "
                    "(at x=2, y=3 unless given):\nprints a table of every operation's "
                    "upstream, local and downstream gradients and writes the graph to a "
                    "file.")
    parser.add_argument("--out", default=os.path.join("out", "fbackprop_explain.html"),
                        metavar="FILE",
                        help="output file, its folder created if missing; the suffix picks "
                             "the format: .html (graph and table), .svg, .dot, .txt, or .png "
                             "(needs Graphviz)")
    parser.add_argument("--x", type=float, default=2.0, help="value of x")
    parser.add_argument("--y", type=float, default=3.0, help="value of y")
    parser.add_argument("--engine", choices=("auto", "builtin", "graphviz"), default="auto",
                        help="graph layout for .html/.svg: Graphviz when installed (auto), "
                             "pure Python (builtin), or Graphviz only (graphviz)")
    opts = parser.parse_args(argv)
    try:
        fmt = output_format(opts.out)
    except ValueError:
        parser.error(f"--out {opts.out!r}: unknown format; use a .html, .svg, .dot, .txt or "
                     f".png file name")
    has_dot = shutil.which("dot") is not None
    if fmt == "png" and not has_dot:
        parser.error(f"--out {opts.out!r}: {PNG_NEEDS_GRAPHVIZ}")
    if opts.engine == "graphviz" and not has_dot:
        parser.error(f"--engine graphviz: {GRAPHVIZ_MISSING}; use --engine auto or builtin")
    check_output_path(parser, "--out", opts.out)
    ex = explain(seed_example, opts.x, opts.y)
    print(ex.table())
    path = ex.save(opts.out, engine=opts.engine)
    print(f"\nwrote {os.path.abspath(path)}")
    return 0
