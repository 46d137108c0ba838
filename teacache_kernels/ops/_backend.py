"""Which implementation an op runs: the Triton kernel or its torch path.

- CUDA tensors: the Triton kernel (through `wrap_triton` under torch.compile, so Inductor sees it); where Triton
  is not installed, the torch path (or the CUDA C++ kernel, where built: ops/cpp.py).
- CPU tensors: the torch path, which Inductor compiles to C++ under torch.compile. Inside
  `triton_on_cpu()`, eager calls run the Triton kernel in Triton's interpreter instead; that needs
  TRITON_INTERPRET=1 in the environment before Triton is first imported, and it is how the kernels are
  tested on machines without a GPU. Under torch.compile the torch path always serves CPU tensors: an
  interpreted kernel cannot be traced.
"""

from __future__ import annotations

import contextlib
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # Triton is optional: torch's Windows wheels have none; the torch path and the C++ ops serve without it
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

_triton_on_cpu = False


def use_triton(t: torch.Tensor) -> bool:
    if not HAS_TRITON:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and _triton_on_cpu and not torch.compiler.is_compiling()


@contextlib.contextmanager
def triton_on_cpu(enabled: bool = True):
    """Run the Triton kernels on CPU tensors (eager calls only), in Triton's interpreter."""
    global _triton_on_cpu
    if enabled and not INTERPRET:
        raise RuntimeError(
            "triton_on_cpu() needs TRITON_INTERPRET=1 set in the environment before triton is imported"
        )
    previous, _triton_on_cpu = _triton_on_cpu, enabled
    try:
        yield
    finally:
        _triton_on_cpu = previous


def check_numel(numel: int, what: str) -> None:
    # Kernel offsets are int32; a signal this large (8 GiB in bf16) is far beyond any model we know.
    if numel >= 2**31 - 2**24:
        raise ValueError(f"{what} has {numel} elements; the fused kernels index with int32 (< 2**31 - 2**24)")


FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_buffer(name: str, t: torch.Tensor, *, dtype=None, numel=None, like=None, device=None, contiguous=True) -> None:
    """Metadata checks with the bad value named. Static under torch.compile: no graph break, no runtime cost.

    A kernel handed a wrong buffer would read or write out of bounds on a GPU; better a clear error here.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if numel is not None and t.numel() < numel:
        raise ValueError(f"{name} must hold at least {numel} elements, got shape {tuple(t.shape)}")
    if like is not None:
        if t.shape != like.shape or t.device != like.device:
            raise ValueError(f"{name} must match the stream/signal: shape {tuple(like.shape)} on {like.device}, "
                             f"got {tuple(t.shape)} on {t.device}")  # fmt: skip
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, the signal/stream on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is written in place by flat index)")
