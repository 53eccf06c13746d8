"""The spec table: every family module contributes a list ``SPECS``."""

from . import (calls, collectives, contraction, control, debug, elementwise, linalg,
               reduction, special, structural)

ALL_SPECS = [*elementwise.SPECS, *structural.SPECS, *contraction.SPECS,
             *reduction.SPECS, *calls.SPECS, *control.SPECS, *collectives.SPECS,
             *debug.SPECS, *linalg.SPECS, *special.SPECS]

_names = [s.name for s in ALL_SPECS]
assert len(_names) == len(set(_names)), "duplicate spec names"
