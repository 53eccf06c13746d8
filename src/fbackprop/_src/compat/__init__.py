"""Everything that depends on JAX internals or a particular JAX version.

fbackprop supports ``jax>=0.10.2,<0.11``. Every private name, primitive name and
parameter layout that may change between JAX versions is read in this package and
nowhere else, so a new JAX is a contained change. The rest of fbackprop imports the
package (``from . import compat``; ``compat.typeof(x)``); its modules, by subject:

- ``core``: type aliases, abstract values and zeros, call primitives' names, JAX's
  trace protocol, dead-code elimination, the settings fbackprop's rules run under;
- ``source``: the user's file and line of an equation, as reports show it;
- ``custom_calls``: ``custom_jvp`` / ``custom_vjp`` calls in both of their forms;
- ``jaxprs``: building, binding and pruning equations and jaxprs;
- ``hijax``: hi-level call primitives (``jax_remat3``, ``jax_custom_vjp3``);
- ``batching``: ``custom_vmap`` and the values of a ``vmap`` per-example sweeps read.
"""

from .core import *  # noqa: F401,F403
from .source import *  # noqa: F401,F403
from .custom_calls import *  # noqa: F401,F403
from .jaxprs import *  # noqa: F401,F403
from .hijax import *  # noqa: F401,F403
from .batching import *  # noqa: F401,F403
