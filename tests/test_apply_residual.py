"""teacache::apply_residual against torch in the same dtype: the results must be bitwise identical.

Both compute in float32 and round once to the buffer dtype, as torch does for `x + r` and `o - x` in
fp16/bf16, so the budget is zero. One exception, from the test harness rather than the kernel: Triton's
CPU interpreter emulates the fp32 -> bf16 cast by truncation (its cast_impl passes no rounding mode),
so there bf16 results may be 1 ulp off. On a GPU the cast is `cvt.rn.bf16.f32` (round to nearest even,
as torch), which tests/test_ptx.py checks in the compiled kernel.
"""

import pytest
import torch

from teacache_kernels.ops import _backend
from teacache_kernels.ops.apply_residual import apply_residual_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_same(got, expected):
    if got.dtype == torch.bfloat16 and got.device.type == "cpu" and _backend._triton_on_cpu:
        ulp = expected.float().abs() * 2.0**-7  # bf16 has 8 significant bits: 1 ulp <= |v| * 2**-7
        assert ((got.float() - expected.float()).abs() <= ulp).all()
    else:
        assert torch.equal(got, expected)


def buffers(numel, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, out, res = (torch.randn(numel, generator=g).to(dtype).to(device) for _ in range(3))
    return x, out, res


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 7, 2048, 2049, 50001])
def test_reuse_writes_x_plus_residual(impl, dtype, numel):
    x, out, res = buffers(numel, dtype, impl)
    x0, res0 = x.clone(), res.clone()
    apply_residual_(torch.tensor(True, device=impl), x, out, res)
    assert_same(out, x0 + res0)
    assert torch.equal(res, res0) and torch.equal(x, x0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 7, 2048, 2049, 50001])
def test_compute_stores_out_minus_x(impl, dtype, numel):
    x, out, res = buffers(numel, dtype, impl)
    x0, out0 = x.clone(), out.clone()
    apply_residual_(torch.tensor(False, device=impl), x, out, res)
    assert_same(res, out0 - x0)
    assert torch.equal(out, out0) and torch.equal(x, x0)


def test_reuse_ignores_whatever_the_output_buffer_held(impl):
    # The reuse branch hands over torch.empty_like: garbage, possibly NaN bit patterns.
    x, _, res = buffers(4099, torch.float32, impl)
    out = torch.full_like(x, float("nan"))
    apply_residual_(torch.tensor(True, device=impl), x, out, res)
    assert torch.equal(out, x + res)


def test_multidimensional_streams(impl):
    x, out, res = (t.view(2, 33, 31) for t in buffers(2 * 33 * 31, torch.bfloat16, impl))
    out0 = out.clone()
    apply_residual_(torch.tensor(False, device=impl), x, out, res)
    assert_same(res, out0 - x)


def test_opcheck_apply_residual():
    for flag in (True, False):
        x, out, res = buffers(300, torch.float32, "cpu")
        torch.library.opcheck(torch.ops.teacache.apply_residual.default, (torch.tensor(flag), x, out, res))


def test_rejects_wrong_buffers_by_name():
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"out must match the stream/signal: shape \(8, 4\)"):
        apply_residual_(torch.tensor(True), x, torch.empty(4, 8), torch.zeros_like(x))
    with pytest.raises(ValueError, match="residual must be contiguous"):
        apply_residual_(torch.tensor(True), x, torch.empty_like(x), torch.zeros(4, 8).t())
    with pytest.raises(TypeError, match="reuse must be torch.bool"):
        apply_residual_(torch.tensor(1), x, torch.empty_like(x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="reuse must be a 0-d bool tensor"):
        apply_residual_(torch.tensor([True]), x, torch.empty_like(x), torch.zeros_like(x))
