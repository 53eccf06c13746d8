"""Rule tables, one module per family. Importing this package registers them all."""

from . import calls, elementwise, structural, contraction, reduction  # noqa: F401
from . import collectives  # noqa: F401,E402
from . import control, scan, cond  # noqa: F401,E402
from . import while_loop  # noqa: F401,E402
from . import debug  # noqa: F401,E402
from . import linalg, spectral, linear_solve, fft, special  # noqa: F401,E402
from . import linear  # noqa: F401,E402
from . import hijax  # noqa: F401,E402
from . import foreign  # noqa: F401,E402
