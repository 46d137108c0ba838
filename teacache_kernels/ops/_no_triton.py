"""What the kernel modules take from Triton when they are imported, for a torch without Triton (torch's Windows
wheels have none): `triton.jit`, `triton.cdiv` and `tl.constexpr`. With these, ops/decide.py and
ops/apply_residual.py import, their torch paths (and the C++ ops, where built: ops/cpp.py) serve every call
(`_backend.HAS_TRITON` is False), and a kernel launched anyway says why it cannot run."""

from __future__ import annotations

import functools
import types


class _Kernel:
    """A `@triton.jit` function without Triton: kept for its name, refuses to launch."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid):
        raise RuntimeError(f"{self.fn.__name__} is a Triton kernel, and Triton is not installed in this environment")

    def __call__(self, *args, **kwargs):
        return self[None]


def _jit(fn=None, **options):
    return _Kernel(fn) if fn is not None else _Kernel


def _constexpr(value=None):
    return value


triton = types.SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b))
tl = types.SimpleNamespace(constexpr=_constexpr)
