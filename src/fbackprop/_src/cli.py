"""What the ``python -m fbackprop`` subcommands share: their argument parser.

A user mistake on the command line (an unknown option, a bad value, an output
file that cannot be written) prints one line, ``<prog>: error: <what> (see
--help)``, and exits with status 2, as argparse does, but without the usage
block and never with a traceback. ``--help`` shows every option's default.
"""

from __future__ import annotations

import argparse
import os


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
