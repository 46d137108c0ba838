"""teacache_kernels: TeaCache step caching for diffusion transformers, decided on the device.

    import teacache_kernels as tk
    tk.enable_teacache(pipe, rel_l1_thresh=0.4)
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    pipe(...)
    print(tk.summary(pipe))
    tk.disable_teacache(pipe)

Importing the package loads neither Triton nor diffusers and never initializes CUDA; the fused ops
are registered when TeaCache is first enabled (or `teacache_kernels.ops` is imported).
"""

from .api import disable_teacache, enable_teacache, reset_teacache, summary
from .compile import compile  # noqa: A004 (tk.compile: torch.compile with TeaCache's branch chosen)
from .models import ModelFamily, register_model
from .coefficients import PUBLISHED as PUBLISHED_COEFFICIENTS
from .config import TeaCacheConfig

__version__ = "0.1.0"

__all__ = [
    "TeaCacheConfig",
    "ModelFamily",
    "register_model",
    "enable_teacache",
    "disable_teacache",
    "reset_teacache",
    "summary",
    "compile",
    "PUBLISHED_COEFFICIENTS",
    "__version__",
]
