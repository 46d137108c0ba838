"""The fused ops, one module each: Triton kernel -> launcher -> torch path -> torch.library op -> public function.

    from teacache_kernels.ops.decide import decide
    from teacache_kernels.ops.apply_residual import apply_residual_

Importing this package registers the ops (torch.ops.teacache.decide / .apply_residual). `ops.cpp` holds
the optional C++/CUDA implementation (csrc/): `cpp.build()` compiles it, `cpp.implementation(device)` says
which implementation serves eager calls.
"""

from . import apply_residual, cpp, decide
from ._backend import triton_on_cpu

__all__ = ["decide", "apply_residual", "cpp", "triton_on_cpu"]
