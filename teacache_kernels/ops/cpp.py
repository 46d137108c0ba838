"""The C++/CUDA implementation of the fused ops (`csrc/`): opt-in, built on demand, never needed to import.

    from teacache_kernels.ops import cpp
    cpp.build()                  # JIT-compile csrc/ once (about a minute; cached), load it, use it from now on
    cpp.implementation("cpu")    # -> "cpp"

Three ways to turn it on:
  - `cpp.build()`, as above (needs the source tree: a checkout or an editable install, g++ and ninja);
  - `TEACACHE_CPP=1` in the environment: the first eager call of an op does `build()`;
  - `TEACACHE_BUILD_EXT=1 pip install --no-build-isolation -e .` compiles it into the package
    (teacache_kernels/_C*.so), which is then loaded on the first eager call without asking.
`TEACACHE_CPP=0` turns all of them off. `TEACACHE_CPP_BUILD_DIR` overrides the JIT cache folder
(default: $XDG_CACHE_HOME or ~/.cache, then teacache_kernels/cpp/<torch>-<python>-<cpu|cuda>).

Which implementation serves an eager call of `teacache::decide` / `teacache::apply_residual` (see
`implementation`):
  - CPU tensors: the C++ kernel once loaded (one vectorized pass, float64 decision), else the torch path;
    inside `triton_on_cpu()` the Triton kernel in Triton's interpreter, as before.
  - CUDA tensors: Triton; the CUDA C++ kernel where Triton cannot be imported, or when asked for with
    `build(cuda=True)` / `TEACACHE_CPP=cuda` (how it is tested on a GPU that has Triton).
Under torch.compile and torch.export nothing changes: the torch path (CPU) or Triton (CUDA) is what gets
traced. The C++ op is opaque to Inductor, which fuses the torch path into C++ of its own, and a compiled
or exported graph must not depend on this optional library.

The library registers `teacache_cpp::decide` and `teacache_cpp::apply_residual` with the schemas of the
`teacache::` ops; their fakes are registered here, so they also work under FakeTensor and opcheck.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from .. import state as S
from ..coefficients import MAX_COEFFICIENTS
from . import _backend

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("teacache_ops.cpp",)
CUDA_SOURCES = ("teacache_ops_cuda.cu",)
# What setup.py builds into the package (TEACACHE_BUILD_EXT=1).
PREBUILT_CPU, PREBUILT_CUDA = "teacache_kernels._C", "teacache_kernels._C_cuda"

_resolved = False  # the environment and a prebuilt library have been looked at (first eager call, or build())
_loaded_from: list[str] = []  # the libraries loaded into this process
_cuda_loaded = False
_on_cpu = False  # the C++ kernel serves eager CPU calls
_on_cuda = False  # the CUDA C++ kernel serves eager CUDA calls
_decide_op = None  # torch.ops.teacache_cpp.decide.default once loaded, bound once for the per-step call
_apply_residual_op = None


def _triton_importable() -> bool:
    return _backend.HAS_TRITON


# ---- the per-call hooks (ops/decide.py, ops/apply_residual.py) ---------------------------------------------


def serves(t: torch.Tensor) -> bool:
    """True when the C++ kernel runs this eager call on `t`'s device. Cheap: a few module attribute reads."""
    if torch.compiler.is_compiling():  # compile and export trace the torch path / Triton (module docstring)
        return False
    if not _resolved:
        _resolve()
    if t.is_cpu:
        return _on_cpu and not _backend._triton_on_cpu
    return _on_cuda and t.is_cuda


def decide(signal, prev_signal, scalars, config, log_, partials, ticket) -> torch.Tensor:
    return _decide_op(signal, prev_signal, scalars, config, log_, partials, ticket)


def apply_residual(reuse, x, out, residual) -> None:
    _apply_residual_op(reuse, x, out, residual)


# ---- what runs -------------------------------------------------------------------------------------------------


def available(device: str | torch.device = "cpu") -> bool:
    """The C++ kernels for `device` are loaded in this process (whether or not they are selected)."""
    dev = torch.device(device).type
    return bool(_loaded_from) and (dev == "cpu" or (dev == "cuda" and _cuda_loaded))


def implementation(device: str | torch.device = "cpu") -> str:
    """Which implementation serves an eager call of the fused ops on `device`: "cpp", "triton" or "torch".

    (Compiled and exported graphs trace the torch path on CPU and Triton on CUDA, whatever this says.)"""
    if not _resolved:
        _resolve()
    dev = torch.device(device).type
    if dev == "cpu":
        if _backend._triton_on_cpu:
            return "triton"
        return "cpp" if _on_cpu else "torch"
    if dev == "cuda":
        return "cpp" if _on_cuda else "triton"
    return "torch"


@contextlib.contextmanager
def enabled(on: bool = True):
    """Use the loaded C++ kernels for eager calls (on=True) or not (on=False) inside the block.

    For side-by-side measurements and tests; on=True needs the library loaded (`build()` or `load()`)."""
    global _on_cpu, _on_cuda
    if on and not _loaded_from:
        raise RuntimeError("teacache_kernels.ops.cpp: the C++ ops are not loaded; call cpp.build() first")
    previous = (_on_cpu, _on_cuda)
    _on_cpu, _on_cuda = on, on and _cuda_loaded
    try:
        yield
    finally:
        _on_cpu, _on_cuda = previous


# ---- loading ---------------------------------------------------------------------------------------------------


def _resolve() -> None:
    """First use: honour TEACACHE_CPP, else pick up a library that setup.py built into the package."""
    global _resolved
    _resolved = True
    env = os.environ.get("TEACACHE_CPP", "").strip().lower()
    if env in ("0", "off", "false", "no"):
        return
    if env in ("1", "on", "true", "yes", "cuda"):
        build(cuda=True if env == "cuda" else None)
        return
    if env:
        raise ValueError(f"TEACACHE_CPP={env!r}: expected 1 (build and use the C++ ops), cuda, or 0")
    try:
        load(build=False)
    except Exception as e:  # a broken prebuilt library must not take the package down: say so, use the rest
        log.warning("teacache_kernels: the prebuilt C++ ops could not be loaded (%s); using the other kernels", e)


def load(*, build: bool = True, cuda: bool | None = None, build_dir: str | os.PathLike | None = None,
         verbose: bool = False) -> bool:
    """Load the C++ ops into this process and use them for eager calls (see the module docstring).

    The library setup.py built into the package if there is one; else, with `build=True`, the JIT build of
    csrc/ (compiled on first use, then reused from `build_dir`). Returns False when there is nothing to load
    and `build=False`. cuda: None builds the CUDA kernels where torch has CUDA; True also makes them serve
    CUDA calls where Triton is installed (otherwise they serve only where Triton is missing).
    """
    global _resolved, _cuda_loaded, _on_cpu, _on_cuda
    _resolved = True
    want_cuda = torch.cuda.is_available() if cuda is None else cuda
    if not _loaded_from:
        paths = _prebuilt(want_cuda)
        if paths is None:
            if not build:
                return False
            paths = _jit_build(want_cuda, required=bool(cuda), build_dir=build_dir, verbose=verbose)
        for path in paths:
            if os.path.realpath(path) not in torch.ops.loaded_libraries:  # the JIT build loads its library itself
                torch.ops.load_library(path)
            _loaded_from.append(str(path))
        _cuda_loaded = len(paths) > 1
        _bind()
        log.info("teacache_kernels: C++ ops loaded from %s", ", ".join(_loaded_from))
    elif cuda and not _cuda_loaded:  # asked for explicitly: say why it cannot be had now
        raise RuntimeError("teacache_kernels.ops.cpp: the CPU-only library is loaded already; call "
                           "build(cuda=True) before any other use of the C++ ops in the process")
    _on_cpu = True
    _on_cuda = _cuda_loaded and (bool(cuda) or not _triton_importable())
    return True


def build(*, cuda: bool | None = None, build_dir: str | os.PathLike | None = None, verbose: bool = False) -> str:
    """Compile (or reuse the cached build of) csrc/, load it and use it; returns the library's path."""
    load(build=True, cuda=cuda, build_dir=build_dir, verbose=verbose)
    return _loaded_from[0]


def _prebuilt(want_cuda: bool) -> list[str] | None:
    """The libraries `TEACACHE_BUILD_EXT=1 pip install` put into the package, if any."""
    try:
        cpu = importlib.util.find_spec(PREBUILT_CPU)
    except ImportError:
        cpu = None
    if cpu is None or cpu.origin is None:
        return None
    paths = [cpu.origin]
    cuda = importlib.util.find_spec(PREBUILT_CUDA) if want_cuda else None
    if cuda is not None and cuda.origin is not None:
        paths.append(cuda.origin)
    return paths


def default_build_dir(cuda: bool) -> Path:
    if os.environ.get("TEACACHE_CPP_BUILD_DIR"):
        return Path(os.environ["TEACACHE_CPP_BUILD_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    # One folder per torch and Python: a library built against another torch must never be loaded.
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{'cuda' if cuda else 'cpu'}"
    return cache / "teacache_kernels" / "cpp" / tag.replace("+", "_")


def _jit_build(cuda: bool, *, required: bool, build_dir, verbose: bool) -> list[str]:
    """Build csrc/ with torch's JIT build: the CPU library, and the CUDA one if `cuda` (where it can be built,
    or else an error if `required`)."""
    from torch.utils import cpp_extension

    if cuda and (torch.version.cuda is None or cpp_extension.CUDA_HOME is None):
        if required:
            raise RuntimeError("teacache_kernels.ops.cpp: cuda=True needs a CUDA build of torch and the CUDA toolkit (nvcc)")
        log.warning("teacache_kernels: no CUDA toolkit (nvcc) found; building the C++ ops for CPU only")
        cuda = False
    missing = [name for name in CPU_SOURCES + (CUDA_SOURCES if cuda else ()) if not (CSRC / name).is_file()]
    if missing:
        raise RuntimeError(f"teacache_kernels.ops.cpp: the C++ sources are not installed ({CSRC} lacks {missing}); "
                           "build from a checkout, or install with TEACACHE_BUILD_EXT=1 (see README, C++)")
    root = Path(build_dir) if build_dir is not None else default_build_dir(cuda)
    if os.name == "nt":
        cflags = ["/O2", "/fp:precise"]
    else:
        # No fp contraction: the float64 decision rounds each multiply and add, as decide_torch does.
        cflags = ["-O3", "-ffp-contract=off"]
    paths = []
    with _ninja_on_path():
        for name, sources, with_cuda in (("teacache_cpp", CPU_SOURCES, False), ("teacache_cpp_cuda", CUDA_SOURCES, True)):
            if with_cuda and not cuda:
                continue
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            paths.append(cpp_extension.load(
                name=name, sources=[str(CSRC / s) for s in sources], extra_cflags=cflags,
                extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"], extra_include_paths=[str(CSRC)],
                build_directory=str(folder), with_cuda=with_cuda, is_python_module=False, verbose=verbose,
            ))  # fmt: skip
    return paths


@contextlib.contextmanager
def _ninja_on_path():
    """torch's JIT build runs `ninja` from PATH; the `ninja` wheel (the test extra) puts it beside this Python,
    which is not on PATH when the venv is not activated (`.venv/bin/python -m pytest`)."""
    if shutil.which("ninja") is not None:
        yield
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    extra = [str(c) for c in candidates if (c / ("ninja.exe" if os.name == "nt" else "ninja")).exists()]
    if not extra:
        raise RuntimeError("teacache_kernels.ops.cpp: building the C++ ops needs ninja (pip install ninja)")
    previous = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([*extra, previous])
    try:
        yield
    finally:
        os.environ["PATH"] = previous


def expected_layout() -> list[int]:
    """state.py's layout in the order of `teacache_cpp::layout` (csrc/teacache_ops.cpp)."""
    return [S.ACC, S.STEP, S.HAS_PREV, S.LOGGED, S.CONSECUTIVE, S.CALLS, S.REUSED, S.NUM_SCALARS,
            S.THRESH, S.NUM_STEPS, S.WARMUP, S.COOLDOWN, S.MAX_CONSECUTIVE, S.MIN_SKIP_STEP, S.MAX_SKIP_STEP,
            S.X_LO, S.X_HI, S.ABS_RESCALED, S.DENOMINATOR_EPS, S.COEFFS, MAX_COEFFICIENTS, S.NUM_CONFIG,
            S.LOG_X, S.LOG_Y, S.LOG_ACC, S.LOG_REUSED, S.LOG_WIDTH, S.MAX_PROGRAMS]  # fmt: skip


def _bind() -> None:
    global _decide_op, _apply_residual_op
    built = list(torch.ops.teacache_cpp.layout.default())
    if built != expected_layout():
        raise RuntimeError(f"teacache_kernels.ops.cpp: the loaded library ({_loaded_from}) was built for another "
                           f"buffer layout than state.py ({built} != {expected_layout()}); rebuild it")
    _register_fakes()
    _decide_op = torch.ops.teacache_cpp.decide.default
    _apply_residual_op = torch.ops.teacache_cpp.apply_residual.default


# ---- fakes: what torch.compile, FakeTensor and opcheck see -----------------------------------------------------
# The library names this module as its Python home (set_python_module), so torch imports it whenever a fake
# is needed: registered when the library is loaded here, or on import if something else loaded it.


def _decide_fake(signal, prev_signal, scalars, config, log_, partials, ticket):
    return torch.empty((), dtype=torch.bool, device=signal.device)


def _apply_residual_fake(reuse, x, out, residual):
    return None


_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if not _fakes_registered:
        torch.library.register_fake("teacache_cpp::decide", _decide_fake)
        torch.library.register_fake("teacache_cpp::apply_residual", _apply_residual_fake)
        _fakes_registered = True


def _library_present() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("teacache_cpp::decide", "")
        return True
    except RuntimeError:
        return False


if _library_present():
    _register_fakes()
