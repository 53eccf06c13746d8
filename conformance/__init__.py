"""Conformance harness: JAX's own test suite run with fbackprop's differentiation.

``python -m conformance.run`` (or ``make conformance``) runs JAX's test files twice,
once as they are and once with JAX's differentiation entry points rerouted to
fbackprop (:mod:`conformance.reroute`), and classifies every difference
(:mod:`conformance.classify`). JAX's test files are not part of this repository;
:mod:`conformance.get_jax_tests` copies them from a local JAX checkout or source
archive into the ignored folder ``conformance/jax_tests/``.
"""
