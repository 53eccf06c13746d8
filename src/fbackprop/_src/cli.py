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
    """Creates the folder of an output file; a path that cannot be written is a usage error."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"{option} {path!r} is a folder; give a file name")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        parser.error(f"{option} {path!r}: cannot create its folder {folder!r} "
                     f"({exc.strerror or exc})")
    if not os.access(folder, os.W_OK):
        parser.error(f"{option} {path!r}: the folder {folder!r} is not writable")
    return path


def check_output_dir(parser: ArgumentParser, option: str, path: str) -> str:
    """Creates an output folder; one that cannot be made is a usage error."""
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"{option} {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        parser.error(f"{option} {path!r}: cannot create the folder ({exc.strerror or exc})")
    if not os.access(path, os.W_OK):
        parser.error(f"{option} {path!r}: the folder is not writable")
    return path
