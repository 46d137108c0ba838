"""teacache::apply_residual -- store or apply the cached residual, whichever the decision chose.

Runs after the branch, on the span's input stream `x`, its output buffer `out` and the cached
`residual`, reading the 0-d `reuse` flag on the device:
  reuse:   out = x + residual        (reads x, residual; writes out)
  compute: residual = out - x        (reads out, x; writes residual)
Either way two reads and one write, the least either step can do. Because the flag is read on the
device, the same launch serves both branches, and the reuse branch of the `torch.cond` only has to
hand over an uninitialised buffer (`torch.empty_like`), so a skipped step costs one pass, not two.
Arithmetic is fp32, rounded to the buffers' dtype: what torch does for `x + residual` and `out - x`.
"""

import torch
from torch.library import triton_op, wrap_triton

from . import cpp
from ._backend import FLOATS, HAS_TRITON, check_buffer, check_numel, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # a torch without Triton (Windows): the torch path and the C++ ops serve (_no_triton.py)
    from ._no_triton import tl, triton

BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def _apply_residual_kernel(
    reuse_ptr,  # bool []
    x_ptr,  # [numel] span input
    out_ptr,  # [numel] span output: written when reusing, read when computing
    residual_ptr,  # [numel] cached residual: read when reusing, written when computing
    numel,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    if tl.load(reuse_ptr):
        r = tl.load(residual_ptr + offs, mask=mask).to(tl.float32)
        tl.store(out_ptr + offs, (x + r).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        o = tl.load(out_ptr + offs, mask=mask).to(tl.float32)
        tl.store(residual_ptr + offs, (o - x).to(residual_ptr.dtype.element_ty), mask=mask)


def launch_apply_residual(
    reuse: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    residual: torch.Tensor,
    *,
    kernel=_apply_residual_kernel,
    block: int = BLOCK,
) -> None:
    numel = x.numel()
    check_numel(numel, "stream")
    kernel[(max(1, triton.cdiv(numel, block)),)](reuse, x, out, residual, numel, BLOCK=block, num_warps=NUM_WARPS)


def apply_residual_torch(reuse: torch.Tensor, x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor) -> None:
    """The same in torch ops, branch-free. `torch.where` drops whatever garbage the unused side holds.

    No host read of `reuse`, even eagerly on CPU where it would be free: this body is also the op's
    fake implementation, which runs on tensors without data. Inductor fuses it into one pass."""
    out.copy_(torch.where(reuse, x + residual, out))
    residual.copy_(torch.where(reuse, residual, out - x))


@triton_op("teacache::apply_residual", mutates_args={"out", "residual"})
def _apply_residual(reuse: torch.Tensor, x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor) -> None:
    if cpp.serves(x):  # the optional C++ ops (ops/cpp.py): eager calls only, when built
        cpp.apply_residual(reuse, x, out, residual)
        return
    if not use_triton(x):
        apply_residual_torch(reuse, x, out, residual)
        return
    launch_apply_residual(reuse, x.contiguous(), out, residual, kernel=wrap_triton(_apply_residual_kernel))


_apply_residual_op = torch.ops.teacache.apply_residual.default


def apply_residual_(reuse: torch.Tensor, x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor) -> None:
    """Reuse: out = x + residual. Compute: residual = out - x. In place, decided on the device.

    reuse: 0-d bool tensor from `decide`. x: the span's input stream, any shape, fp32/fp16/bf16.
    out: contiguous, same shape and dtype as x. residual: contiguous, same shape as x (same dtype as
    the original TeaCache keeps it: the stream's).
    """
    check_buffer("x", x, dtype=FLOATS, contiguous=False)
    check_buffer("out", out, dtype=FLOATS, like=x)
    check_buffer("residual", residual, dtype=FLOATS, like=x)
    check_buffer("reuse", reuse, dtype=torch.bool, device=x.device, contiguous=False)
    if reuse.dim() != 0:
        raise ValueError(f"reuse must be a 0-d bool tensor, got shape {tuple(reuse.shape)}")
    if cpp.serves(x):  # straight to the C++ op, as ops.decide does
        cpp.apply_residual(reuse, x, out, residual)
        return
    _apply_residual_op(reuse, x, out, residual)
