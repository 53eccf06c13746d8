"""The XLA flags test processes run with (this one and the scripts the tests launch).

The tests check derivatives, not the speed of XLA's code, and most of their time is
XLA compiling small programs; without LLVM optimization and with XLA's older CPU
emitters it compiles them about three times faster. ``make test-full``
(``FBACKPROP_TEST_FULL=1``) runs with XLA's default pipeline instead. Benchmarks never
use these flags (their quick mode chooses its own).
"""

import os

FULL = os.environ.get("FBACKPROP_TEST_FULL") == "1"
BASE = "--xla_cpu_multi_thread_eigen=false"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags() -> str:
    return BASE if FULL else f"{BASE} {FAST_COMPILE}"
