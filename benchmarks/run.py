"""Benchmarks fbackprop against jax: ``python benchmarks/run.py [--quick] [--only NAME]``.

The same as ``python -m fbackprop bench``; see benchmarks/README.md.
"""

import os
import sys

try:
    from fbackprop.bench.cli import main
except ImportError:   # running from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from fbackprop.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/run.py"))
