"""Copies the ``tests/`` folders of Equinox, lineax and optimistix into ``conformance/lib_tests/``.

The tests must be those of the installed version of each library: they are taken
from the release tag ``v<version>`` of a local git repository of the library (a
clone or a bare mirror with tags) or from a source archive of that tag (a
``.tar.gz``/``.zip`` whose top folder holds ``tests/``; the libraries' sdists on
the package index have no ``tests/``). Nothing is downloaded here.

    python -m conformance.get_lib_tests --git equinox=~/src/equinox --git lineax=~/src/lineax
    python -m conformance.get_lib_tests --archive optimistix=optimistix-0.1.0.tar.gz

Each library's tests land in ``conformance/lib_tests/<library>_tests/`` (a package
name that cannot shadow the library itself), with a file ``LIB_VERSION`` naming
the version they belong to; :mod:`conformance.run_libs` refuses tests of another
version than the installed one. The folder is ignored by git.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from conformance.get_jax_tests import from_archive, from_git

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DEST = os.path.join(HERE, "lib_tests")
VERSION_FILE = "LIB_VERSION"
# The libraries whose own test suites `make conformance-libs` runs, and their
# repositories (where their release tags are).
LIBRARIES = {
    "equinox": "https://github.com/patrick-kidger/equinox",
    "lineax": "https://github.com/patrick-kidger/lineax",
    "optimistix": "https://github.com/patrick-kidger/optimistix",
}


def installed_version(library: str) -> str:
    from importlib.metadata import version

    return version(library)


def tests_dir(library: str, dest: str = DEFAULT_DEST) -> str:
    return os.path.join(dest, f"{library}_tests")


def _pairs(items, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        library, sep, path = item.partition("=")
        if not sep or library not in LIBRARIES:
            raise SystemExit(f"--{what} takes LIBRARY=PATH with LIBRARY one of "
                             f"{', '.join(LIBRARIES)}; got {item!r}")
        out[library] = os.path.expanduser(path)
    return out


def copy_tests(library: str, *, git: str | None = None, archive: str | None = None,
               version: str | None = None, dest: str = DEFAULT_DEST) -> int:
    """Copies ``library``'s ``tests/`` of tag ``v<version>``; returns the file count."""
    version = version or installed_version(library)
    with tempfile.TemporaryDirectory() as tmp:
        count = from_git(git, f"v{version}", tmp) if git else from_archive(archive, tmp)
        if not count:
            raise SystemExit(f"no tests/ folder found in the source of {library}")
        target = tests_dir(library, dest)
        if os.path.isdir(target):
            shutil.rmtree(target)
        shutil.copytree(tmp, target)
    with open(os.path.join(target, VERSION_FILE), "w") as f:
        f.write(version + "\n")
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--git", action="append", metavar="LIBRARY=REPO",
                        help="a local git repository of LIBRARY with its release tags "
                             "(repeat for several libraries)")
    parser.add_argument("--archive", action="append", metavar="LIBRARY=FILE",
                        help="a source archive of LIBRARY's release tag")
    parser.add_argument("--dest", default=DEFAULT_DEST, help=f"default {DEFAULT_DEST}")
    args = parser.parse_args(argv)
    gits, archives = _pairs(args.git, "git"), _pairs(args.archive, "archive")
    if not gits and not archives:
        parser.error("give --git LIBRARY=REPO or --archive LIBRARY=FILE for at least one of "
                     + ", ".join(LIBRARIES))
    for library in LIBRARIES:
        if library not in gits and library not in archives:
            continue
        version = installed_version(library)
        count = copy_tests(library, git=gits.get(library), archive=archives.get(library),
                           version=version, dest=args.dest)
        print(f"copied {count} files of {library} {version}'s tests/ into "
              f"{tests_dir(library, args.dest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
