"""The GPU code path, traced without a GPU: what Inductor receives for one TeaCache step on CUDA.

The ops take their CUDA branch (`wrap_triton`) on fake CUDA tensors; AOTAutograd functionalizes them
into `triton_kernel_wrapper_functional` calls, and Triton's own mutation analysis (TTIR for sm_90)
reports which arguments each kernel writes. Those are the tensors Inductor must either write in place
or clone, so the sets must be exactly the declared mutations: a stray store to the signal would put a
copy of it on every step. Whether Inductor's reinplacing then avoids every clone is only visible in
its generated code on a GPU (unverified here).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HELPER = Path(__file__).with_name("_trace_cuda_ops.py")


@pytest.mark.parametrize("shape, decide_grid, apply_grid", [((1, 4096, 3072), 1024, 6144), ((1, 333, 77), 13, 13)])
def test_traced_cuda_step(shape, decide_grid, apply_grid):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(HELPER), *map(str, shape)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    decide_call, apply_call = json.loads(r.stdout.strip().splitlines()[-1])

    assert decide_call["grid"] == [decide_grid, 1, 1]  # capped at MAX_PROGRAMS: a grid-stride loop does the rest
    assert decide_call["mutated"] == sorted(["prev_ptr", "partials_ptr", "ticket_ptr", "scalars_ptr", "log_ptr", "reuse_ptr"])
    assert {"signal_ptr", "config_ptr"} <= set(decide_call["args"]) - set(decide_call["mutated"])  # read only

    assert apply_call["grid"] == [apply_grid, 1, 1]
    assert apply_call["mutated"] == ["out_ptr", "residual_ptr"]
    assert "reuse_ptr" in apply_call["args"] and "x_ptr" in apply_call["args"]
