"""Ahead-of-time compilation of the kernels for an NVIDIA arch, on any machine (no GPU needed).

`python -m teacache_kernels ptx --arch 90 --out DIR` writes DIR/{kernel}_{dtype}_sm{arch}.ptx and .cubin,
plus the ptxas resource usage of each cubin, for reading the machine code and for the static checks in
tests/test_ptx.py. Run it without TRITON_INTERPRET=1: Triton's code generator does not work in a
process where the interpreter is switched on.

Pointer and size arguments are specialised as divisible by 16, as Triton does at launch for tensors
from torch's allocator and for sizes like 4096 x 3072.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import state as S
from ..coefficients import MAX_COEFFICIENTS
from . import apply_residual, decide

DTYPES = ("bf16", "fp16", "fp32")
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _compile(fn, signature: dict, constexprs: dict, divisible: list[str], arch: int, num_warps: int):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (Triton's codegen breaks in interpreter mode)")
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def compile_decide(dtype: str, arch: int):
    signature = {
        "signal_ptr": f"*{dtype}", "prev_ptr": f"*{dtype}", "numel": "i32", "partials_ptr": "*fp32",
        "ticket_ptr": "*i32", "scalars_ptr": "*fp64", "config_ptr": "*fp64", "log_ptr": "*fp64",
        "log_capacity": "i32", "reuse_ptr": "*i1",
    }  # fmt: skip
    constexprs = {"BLOCK": decide.BLOCK, "MAX_PROGRAMS": S.MAX_PROGRAMS, "NUM_COEFFS": MAX_COEFFICIENTS}
    divisible = [n for n in signature if n != "reuse_ptr"]
    return _compile(decide._decide_kernel, signature, constexprs, divisible, arch, decide.NUM_WARPS)


def compile_apply_residual(dtype: str, arch: int):
    signature = {"reuse_ptr": "*i1", "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "residual_ptr": f"*{dtype}", "numel": "i32"}
    divisible = ["x_ptr", "out_ptr", "residual_ptr", "numel"]
    constexprs = {"BLOCK": apply_residual.BLOCK}
    return _compile(apply_residual._apply_residual_kernel, signature, constexprs, divisible, arch, apply_residual.NUM_WARPS)


def compile_sums(dtype: str, arch: int):
    """The first half of decide for a signal split over ranks (context parallelism)."""
    signature = {
        "signal_ptr": f"*{dtype}", "prev_ptr": f"*{dtype}", "numel": "i32", "partials_ptr": "*fp32",
        "ticket_ptr": "*i32", "sums_ptr": "*fp64",
    }  # fmt: skip
    constexprs = {"BLOCK": decide.BLOCK, "MAX_PROGRAMS": S.MAX_PROGRAMS}
    return _compile(decide._sums_kernel, signature, constexprs, list(signature), arch, decide.NUM_WARPS)


def compile_finish(dtype: str, arch: int):
    """The second half: the state machine from the summed sums (no signal: the same code for every dtype)."""
    signature = {"sums_ptr": "*fp64", "scalars_ptr": "*fp64", "config_ptr": "*fp64", "log_ptr": "*fp64", "log_capacity": "i32", "reuse_ptr": "*i1"}
    divisible = [n for n in signature if n != "reuse_ptr"]
    return _compile(decide._finish_kernel, signature, {"NUM_COEFFS": MAX_COEFFICIENTS}, divisible, arch, 1)


KERNELS = {"decide": compile_decide, "apply_residual": compile_apply_residual, "sums": compile_sums, "finish": compile_finish}


def resource_usage(cubin: Path) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, as cuobjdump reports them."""
    out = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def dump(out_dir: str | Path, archs=(80, 90), dtypes=DTYPES) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in KERNELS.items():
        for dtype in dtypes:
            for arch in archs:
                k = build(dtype, arch)
                stem = out_dir / f"{name}_{dtype}_sm{arch}"
                stem.with_suffix(".ptx").write_text(k.asm["ptx"])
                stem.with_suffix(".cubin").write_bytes(k.asm["cubin"])
                usage = resource_usage(stem.with_suffix(".cubin"))
                stem.with_suffix(".usage").write_text(" ".join(f"{k}:{v}" for k, v in usage.items()) + "\n")
                written.append(stem)
                print(f"{stem.name}: {' '.join(f'{k}:{v}' for k, v in usage.items())}")
    return written
