import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# float64 specs need x64; every test states its dtypes explicitly.
jax.config.update("jax_enable_x64", True)

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          print_blob=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def op_by_op(monkeypatch):
    """Eager calls interpret the jaxpr primitive by primitive (no whole-program compile)."""
    from fbackprop._src import api
    monkeypatch.setattr(api, "eager_compile", False)
