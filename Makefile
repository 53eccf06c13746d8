# The two commands of the README. Both create .venv (python3.11 -m venv) if it is
# missing and install the package into it, so they work on a fresh machine.
#
#   make demo    train an MLP on scikit-learn's digits with fbackprop gradients
#   make test    run the test suite
#   make conformance   JAX's own test files with fbackprop's differentiation (see README)
#   make conformance-libs   the same with Equinox's, lineax's and optimistix's tests
#
# Variables: PYTHON (interpreter for the venv, default python3.11), VENV (default
# .venv), ARGS (extra arguments for the demo/bench), PYTEST_ARGS (for pytest);
# for `make conformance`: FILES (e.g. api_test,nn_test), WORKERS (pytest-xdist workers,
# default 2), CONFORMANCE_ARGS (e.g. "-k grad --rerun-baseline"), JAX_GIT or
# JAX_ARCHIVE (where `make conformance-tests` copies JAX's tests/ from); for `make
# conformance-libs`: LIBS (default equinox,lineax,optimistix), FILES (e.g. test_jvp or
# lineax/test_jvp), and LIB_GIT / LIB_ARCHIVE ("equinox=<repo> lineax=<repo> ...",
# where `make conformance-lib-tests` copies the libraries' tests/ from).

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
FILES ?=
WORKERS ?= 2
CONFORMANCE_ARGS ?=
JAX_GIT ?=
JAX_ARCHIVE ?=
LIBS ?= equinox,lineax,optimistix
LIB_GIT ?=
LIB_ARCHIVE ?=

.PHONY: help demo test test-full bench examples docs clean conformance conformance-record \
	conformance-tests conformance-libs conformance-libs-record conformance-lib-tests

help:
	@echo "make demo      train an MLP on digits with fbackprop (writes out/)"
	@echo "make test      run the tests"
	@echo "make test-full the tests with wider matrices (every dtype eagerly, more examples)"
	@echo "make bench     benchmark fbackprop against jax (ARGS=--quick for a smoke run)"
	@echo "make examples  run every script in examples/"
	@echo "make docs      build the documentation into docs/_build/html"
	@echo "make conformance  JAX's tests with fbackprop's differentiation (FILES=api_test,...)"
	@echo "make conformance-libs  Equinox's, lineax's, optimistix's tests (LIBS=lineax FILES=test_jvp)"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when pyproject.toml changes; the stamp files record what was installed.
$(VENV)/.installed-examples: pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[examples]"
	@touch $@

# examples/neural_ode.py needs diffrax and optimistix.
$(VENV)/.installed-ecosystem: pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[examples,ecosystem,privacy]"
	@touch $@

$(VENV)/.installed-docs: pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[docs]"
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test,ecosystem,privacy]"
	@touch $@

$(VENV)/.installed-conformance: pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[conformance]"
	@touch $@

demo: $(VENV)/.installed-examples
	$(PY) -m fbackprop demo $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

# The wider matrix: every spec eagerly in every dtype, and more hypothesis examples.
test-full: $(VENV)/.installed-test
	FBACKPROP_TEST_FULL=1 $(PY) -m pytest -q -n 2 --dist loadgroup --hypothesis-profile=full $(PYTEST_ARGS)

bench: $(VENV)/.installed-examples
	$(PY) -m fbackprop bench $(ARGS)

# Runs every script (none is skipped when an earlier one fails), prints one line
# per script with its time, and fails at the end if any failed. Scripts write
# their files under out/.
examples: $(VENV)/.installed-ecosystem
	@failed=""; total=0; \
	for f in examples/*.py; do \
	  echo "== $$f"; start=$$(date +%s); \
	  if $(PY) $$f; then status=ok; else status=FAILED; failed="$$failed $$f"; fi; \
	  secs=$$(( $$(date +%s) - start )); total=$$(( total + 1 )); \
	  echo "== $$f: $$status ($$secs s)"; summary="$$summary$$status $$f ($$secs s)\n"; \
	done; \
	echo; echo "examples:"; printf "$$summary" | sed 's/^/  /'; \
	if [ -n "$$failed" ]; then \
	  echo "$$(echo $$failed | wc -w) of $$total examples FAILED:$$failed"; exit 1; \
	else echo "all $$total examples passed"; fi

# Sphinx, warnings as errors; the pages' code runs in the tests (tests/test_docs.py).
docs: $(VENV)/.installed-docs
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: $(CURDIR)/docs/_build/html/index.html"

# Not part of `make test`. Needs JAX's tests/ in conformance/jax_tests/ (make
# conformance-tests); writes out/conformance/report.{json,md}.
CONFORMANCE_RUN = $(PY) -m conformance.run -n $(WORKERS) $(if $(FILES),--files $(FILES))

conformance: $(VENV)/.installed-conformance
	$(CONFORMANCE_RUN) $(CONFORMANCE_ARGS)

conformance-record: $(VENV)/.installed-conformance
	$(CONFORMANCE_RUN) --record $(CONFORMANCE_ARGS)

conformance-tests: $(VENV)/.installed-conformance
	$(PY) -m conformance.get_jax_tests $(if $(JAX_GIT),--git $(JAX_GIT)) \
		$(if $(JAX_ARCHIVE),--archive $(JAX_ARCHIVE))

# The libraries' own tests, with the entry points their tests and their code call
# rerouted. Needs their tests in conformance/lib_tests/ (make conformance-lib-tests);
# writes out/conformance/libs/report.{json,md}.
CONFORMANCE_LIBS_RUN = $(PY) -m conformance.run_libs -n $(WORKERS) --libs $(LIBS) \
	$(if $(FILES),--files $(FILES))

conformance-libs: $(VENV)/.installed-conformance $(VENV)/.installed-ecosystem
	$(CONFORMANCE_LIBS_RUN) $(CONFORMANCE_ARGS)

conformance-libs-record: $(VENV)/.installed-conformance $(VENV)/.installed-ecosystem
	$(CONFORMANCE_LIBS_RUN) --record $(CONFORMANCE_ARGS)

conformance-lib-tests: $(VENV)/.installed-conformance $(VENV)/.installed-ecosystem
	$(PY) -m conformance.get_lib_tests $(foreach g,$(LIB_GIT),--git $(g)) \
		$(foreach a,$(LIB_ARCHIVE),--archive $(a))

clean:
	rm -rf out build dist docs/_build .pytest_cache .hypothesis src/*.egg-info
