"""Copies JAX's ``tests/`` folder for the installed JAX version into ``conformance/jax_tests/``.

Nothing is downloaded: the source is a JAX git repository already on this machine
(any clone that has the release tag ``jax-vX.Y.Z``) or a source archive of that tag
(``.tar.gz``/``.zip`` whose top folder holds ``tests/``). JAX's sdist on the package
index does *not* contain ``tests/``, so it cannot serve.

    python -m conformance.get_jax_tests --git ~/src/jax           # a clone with tags
    python -m conformance.get_jax_tests --archive jax-jax-v0.10.2.tar.gz

The folder is ignored by git: JAX's test files are never part of this repository.
A file ``JAX_VERSION`` in it records which version the tests belong to, and
:mod:`conformance.run` refuses to run tests of another version than the installed one.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DEST = os.path.join(HERE, "jax_tests")
VERSION_FILE = "JAX_VERSION"


def installed_jax_version() -> str:
    from importlib.metadata import version

    return version("jax")


def _extract_tar_members(tar: tarfile.TarFile, dest: str) -> int:
    count = 0
    for member in tar.getmembers():
        parts = member.name.split("/")
        if "tests" not in parts[:2] or not member.isfile():
            continue
        rel = "/".join(parts[parts.index("tests") + 1:])
        if not rel or ".." in rel.split("/"):
            continue
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with tar.extractfile(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        count += 1
    return count


def from_git(repo: str, tag: str, dest: str) -> int:
    """``git archive <tag> tests`` of a local repository, unpacked into ``dest``."""
    proc = subprocess.run(["git", "-C", repo, "archive", "--format=tar", tag, "tests"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not proc.stdout:
        raise SystemExit(f"git archive {tag} tests failed in {repo}:\n"
                         f"{proc.stderr.decode(errors='replace')}\n"
                         f"(the clone needs the tag: git -C {repo} fetch --tags)")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        return _extract_tar_members(tar, dest)


def from_archive(path: str, dest: str) -> int:
    if zipfile.is_zipfile(path):
        count = 0
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                parts = name.split("/")
                if "tests" not in parts[:2] or name.endswith("/"):
                    continue
                rel = "/".join(parts[parts.index("tests") + 1:])
                if not rel or ".." in rel.split("/"):
                    continue
                out = os.path.join(dest, rel)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with zf.open(name) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
        return count
    with tarfile.open(path) as tar:
        return _extract_tar_members(tar, dest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--git", metavar="REPO", help="a local JAX git repository")
    source.add_argument("--archive", metavar="FILE", help="a source archive of the tag")
    parser.add_argument("--version", default=None,
                        help="JAX version (default: the installed one)")
    parser.add_argument("--dest", default=DEFAULT_DEST, help=f"default {DEFAULT_DEST}")
    args = parser.parse_args(argv)

    version = args.version or installed_jax_version()
    with tempfile.TemporaryDirectory() as tmp:
        if args.git:
            count = from_git(args.git, f"jax-v{version}", tmp)
        else:
            count = from_archive(args.archive, tmp)
        if not count:
            raise SystemExit("no tests/ folder found in the source")
        if os.path.isdir(args.dest):
            shutil.rmtree(args.dest)
        shutil.copytree(tmp, args.dest)
    with open(os.path.join(args.dest, VERSION_FILE), "w") as f:
        f.write(version + "\n")
    print(f"copied {count} files of JAX {version}'s tests/ into {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
