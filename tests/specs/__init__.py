"""The spec table: every family module contributes a list ``SPECS``."""

from . import elementwise, structural, contraction, reduction, calls

ALL_SPECS = [*elementwise.SPECS, *structural.SPECS, *contraction.SPECS,
             *reduction.SPECS, *calls.SPECS]

_names = [s.name for s in ALL_SPECS]
assert len(_names) == len(set(_names)), "duplicate spec names"
