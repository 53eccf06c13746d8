import gc
import os

from xla_flags import xla_flags

# A test process holds millions of small objects (traced jaxprs, compiled programs),
# which Python's default thresholds rescan over and over: about a tenth of the suite's
# time. Collect less often.
gc.set_threshold(200_000, 20, 100)

os.environ.setdefault("XLA_FLAGS", xla_flags())   # before JAX creates its backend

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# float64 specs need x64; every test states its dtypes explicitly.
jax.config.update("jax_enable_x64", True)

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          print_blob=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("full", max_examples=200, deadline=None)    # make test-full
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_configure(config):
    """``--dist loadgroup`` must really group: the rule specs compile one program per
    group and the memory-plan tests share one benchmark run, so a pytest-xdist that
    ignores the groups silently does that work twice. pytest 9.2 makes pytest-xdist
    3.8 ignore them (its node-id suffix no longer takes effect)."""
    if getattr(config.option, "dist", None) != "loadgroup":
        return
    import xdist
    if pytest.version_tuple[:2] >= (9, 2) and \
            tuple(int(p) for p in xdist.__version__.split(".")[:2]) <= (3, 8):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with pytest-xdist {xdist.__version__} ignores "
            f"--dist loadgroup's groups; install the versions pyproject.toml pins "
            f"(pip install -e '.[test]', which gives pytest<9.2).")


@pytest.fixture
def no_jax_autodiff(monkeypatch):
    """Makes every entry point of JAX's own autodiff raise for the test's duration."""
    def forbidden(*a, **k):
        raise AssertionError("fbackprop called JAX's autodiff")
    for name in ["grad", "vjp", "jvp", "linearize", "linear_transpose", "value_and_grad"]:
        monkeypatch.setattr(jax, name, forbidden)
    from jax._src.interpreters import ad
    for name in ["jvp", "linearize", "backward_pass"]:
        monkeypatch.setattr(ad, name, forbidden)
    # Any JVP or linearize tracing at all, however reached, would construct these.
    monkeypatch.setattr(ad.JVPTrace, "__init__", forbidden)
    monkeypatch.setattr(ad.LinearizeTrace, "__init__", forbidden)
