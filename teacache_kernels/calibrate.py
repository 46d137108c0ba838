"""Calibration's public API, under the name users look for: `from teacache_kernels.calibrate import calibrate`.

Everything is defined in `teacache_kernels.calibration` (fit, save, load, pick a threshold); this module
re-exports its public names so the two stay one list.
"""

from .calibration import *  # noqa: F401,F403
from .calibration import __all__  # noqa: F401
