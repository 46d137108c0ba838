"""The kernels build for sm_80 and sm_90 without a GPU, and their machine code is what we meant.

`python -m teacache_kernels ptx` runs Triton's whole NVIDIA pipeline (TTIR -> PTX -> ptxas -> cubin) for
each kernel, dtype and arch, in a process without TRITON_INTERPRET. Checked statically:
  - 128-bit vectorised global loads and stores on the streams (ld/st.global.v4.b32),
  - no local memory: no `.local` in the PTX, and `LOCAL:0 STACK:0` in the cubin (no spills),
  - decide: the partial sums are stored by the same thread that then takes the ticket (an acq_rel
    atomic at GPU scope), the last program reads the partials with volatile loads, and the scalar
    state machine runs in float64,
  - apply_residual, bf16: results round to nearest even, as torch's, never toward zero.
"""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHS = [80, 90]
DTYPES = ["bf16", "fp16", "fp32"]


@pytest.fixture(scope="module")
def machine_code(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "teacache_kernels", "ptx", "--out", str(out), "--arch", *map(str, ARCHS)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)

    def read(kernel, dtype, arch):
        stem = out / f"{kernel}_{dtype}_sm{arch}"
        usage = dict(kv.split(":") for kv in stem.with_suffix(".usage").read_text().split())
        return stem.with_suffix(".ptx").read_text(), {k: int(v) for k, v in usage.items()}

    return read


def count(ptx, pattern):
    return len(re.findall(pattern, ptx))


V4_LOAD = r"ld\.global(?:\.[\w:]+)*\.v4\.b32"
V4_STORE = r"st\.global(?:\.[\w:]+)*\.v4\.b32"


def assert_no_local_memory(ptx, usage):
    assert ".local" not in ptx
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0, usage


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["decide", "sums"])  # sums: decide's first half, for a signal split over ranks
def test_decide_kernel_machine_code(machine_code, kernel, dtype, arch):
    ptx, usage = machine_code(kernel, dtype, arch)
    assert count(ptx, V4_LOAD) >= 2, "signal / previous-signal loads are not 128-bit"
    assert count(ptx, V4_STORE) >= 1, "the prev_signal store is not 128-bit"
    atomics = re.findall(r"atom\.global[\w\.]*", ptx)
    assert atomics and all("acq_rel" in a and "gpu" in a for a in atomics), atomics
    # The partials are ordered before the ticket because one thread (tid.x == 0) stores both of them and
    # then takes the ticket, in program order: its acq_rel release covers them.
    atom = re.search(r"@(%p\d+) atom\.global", ptx)
    pred = atom.group(1)
    assert count(ptx[: atom.start()], rf"@{pred} st\.global\.b32") >= 2, "partials not stored by the ticket's thread"
    tid = re.search(r"mov\.u32\s+(%r\d+), %tid\.x;", ptx).group(1)
    assert re.search(rf"setp\.eq\.[bsu]32\s+{pred}, {tid}, 0;", ptx), f"{pred} does not select thread 0"
    assert count(ptx, r"ld\.volatile\.global") >= 1, "the last program must read the partials volatile"
    if kernel == "decide":
        assert count(ptx, r"div\.rn\.f64") and count(ptx, r"(?:add|fma\.rn)\.f64"), "scalar math is not float64"
    else:
        assert count(ptx, r"st\.global\.b64") >= 3, "the three fp64 sums are not stored"
    assert_no_local_memory(ptx, usage)


@pytest.mark.parametrize("arch", ARCHS)
def test_finish_kernel_machine_code(machine_code, arch):
    ptx, usage = machine_code("finish", "fp32", arch)  # no signal: one build serves every dtype
    assert count(ptx, r"div\.rn\.f64") and count(ptx, r"(?:add|fma\.rn)\.f64"), "scalar math is not float64"
    assert not count(ptx, r"atom\.global"), "one program: no ticket"
    assert_no_local_memory(ptx, usage)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_residual_kernel_machine_code(machine_code, dtype, arch):
    ptx, usage = machine_code("apply_residual", dtype, arch)
    assert count(ptx, V4_LOAD) >= 2, "stream loads are not 128-bit"
    assert count(ptx, V4_STORE) >= 1, "stores are not 128-bit"
    if dtype == "bf16":
        # fp32 math rounded once to bf16: LLVM may fold it into native bf16 arithmetic (sm_90 add.bf16x2,
        # sm_80 fma.rn.bf16x2), equal bit for bit because fp32 carries more than 2 x 8 + 2 significand
        # bits. Either way the rounding must be to nearest even, as torch's, never toward zero.
        assert count(ptx, r"(?:add|sub|fma)(?:\.rn)?\.bf16x2|cvt\.rn\.bf16"), "no round-to-nearest bf16 result"
        assert not count(ptx, r"\.rz\.bf16"), "bf16 results truncated: differs from torch"
    assert_no_local_memory(ptx, usage)
