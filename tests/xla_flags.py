"""The XLA flags test processes run with (this one and the scripts the tests launch).

The tests check derivatives, not the speed of XLA's code, and most of their time is
XLA compiling small programs. XLA's newer CPU fusion emitters cost a fixed tens of
milliseconds per program; with XLA's earlier CPU emitters (its CPU pipeline for
years, still built in) the suite's thousands of small programs compile about a third
faster. (Also turning LLVM's optimizations off compiles faster still, but the two
together miscompiled a Hessian program and a neural ODE gradient here, while
op-by-op evaluation of the same jaxprs was right, so it is not done.)
``make test-full`` (``FBACKPROP_TEST_FULL=1``) runs with XLA's default pipeline, the
one users get. Benchmarks never use these flags.
"""

import os

FULL = os.environ.get("FBACKPROP_TEST_FULL") == "1"
BASE = "--xla_cpu_multi_thread_eigen=false"
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false"


def xla_flags() -> str:
    return BASE if FULL else f"{BASE} {FAST_COMPILE}"
