"""Release metadata agrees with itself: version, license, changelog, ``py.typed``."""

from __future__ import annotations

import os
import re

import fbackprop as fb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_version_is_the_same_everywhere():
    pyproject = _read("pyproject.toml")
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert fb.__version__ == version
    assert f"## [{version}]" in _read("CHANGELOG.md")


def test_license_file_matches_pyproject():
    assert 'license = {text = "Apache-2.0"}' in _read("pyproject.toml")
    text = _read("LICENSE")
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_package_is_typed():
    assert os.path.exists(os.path.join(ROOT, "src", "fbackprop", "py.typed"))
    assert re.search(r'\[tool\.setuptools\.package-data\]\s*fbackprop = \["py\.typed"\]',
                     _read("pyproject.toml"))
