from .common import Spec

SPECS = [
]
