"""The C++ ops (csrc/, teacache_kernels/ops/cpp.py): built here, then held to the same oracle as the other kernels.

The module builds the CPU extension first (torch's JIT build with the machine's C++ compiler, about 15-40 s
cold): that is CI's build test, never skipped where a C++ compiler exists. The build goes to .cache/cpp_ext
in the repository (git-ignored), so a fresh clone, as CI has, always compiles it from scratch.

Same budgets as tests/test_decide.py and tests/test_apply_residual.py, whose checks are reused: decisions,
counters and the copied signal exact; x within twice the original's own error (or 1e-6 relative);
apply_residual bitwise equal to torch in every dtype. The C++ kernels are called directly and through the
package's ops with the C++ implementation selected; the module leaves the selection as it found it, so the
other test modules keep testing the torch path.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teacache_kernels import state as S
from teacache_kernels.config import ResolvedConfig, TeaCacheConfig
from teacache_kernels.ops import cpp, triton_on_cpu
from teacache_kernels.ops.apply_residual import apply_residual_
from teacache_kernels.ops.decide import decide, decide_torch
from teacache_kernels.reference import TeaCacheOracle

import test_decide as td  # its oracle check, signals and edge cases, reused as they are
from conftest import INTERPRET, requires_cuda

REPO = Path(__file__).resolve().parents[1]
BUILD_DIR = REPO / ".cache" / "cpp_ext"
DTYPES = td.DTYPES
SIZES = [1, 7, 2049, 100003]  # 100003: two of the CPU kernel's 65536-element chunks, so two threads, and tails


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build (or load) the extension once for the module; restore the implementation selection afterwards."""
    if _compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    was_selected = cpp.implementation("cpu") == "cpp"
    with cpp.enabled(False):  # on leaving: the selection found here (build() selects C++ for the process)
        path = cpp.build(build_dir=BUILD_DIR)
        with cpp.enabled(was_selected):  # the tests select C++ where they mean to
            yield path


def cpp_call(sig, st):
    return torch.ops.teacache_cpp.decide.default(sig, st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket)


# -- the build ---------------------------------------------------------------------------------------------------


def test_the_build_registers_both_ops_with_the_schemas_of_the_teacache_ops(built):
    assert Path(built).is_file()
    assert cpp.available("cpu")
    for name in ("decide", "apply_residual"):
        ours = str(getattr(torch.ops.teacache_cpp, name).default._schema)
        theirs = str(getattr(torch.ops.teacache, name).default._schema)
        assert ours == theirs.replace("teacache::", "teacache_cpp::", 1)
    assert list(torch.ops.teacache_cpp.layout.default()) == cpp.expected_layout()


# -- decide against the oracle -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES)
def test_decide_matches_oracle(dtype, numel):
    config = td.flux_config(thresh=0.5, steps=12)
    schedule, oracle = td.check_against_oracle(td.random_walk(numel, 26, dtype, seed=numel), config, "cpu", call=cpp_call)
    assert "R" in schedule and schedule.count("C") > 4, schedule
    td.assert_no_near_ties(oracle, config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decide_matches_the_torch_path_step_by_step(dtype):
    config = td.flux_config(thresh=0.5, steps=9)
    signals = td.random_walk(100003, 20, dtype, seed=7)
    ours, theirs = S.ContextState("cpp"), S.ContextState("torch")
    for st in (ours, theirs):
        st.allocate(signals[0], signals[0], config)
    for k, sig in enumerate(signals):
        got = cpp_call(sig, ours)
        expected = decide_torch(sig, theirs.prev_signal, theirs.scalars, theirs.config, theirs.log)
        assert bool(got) == bool(expected), f"call {k}"
        assert torch.equal(ours.prev_signal, theirs.prev_signal)
        exact = [S.STEP, S.HAS_PREV, S.LOGGED, S.CONSECUTIVE, S.CALLS, S.REUSED]
        assert ours.scalars[exact].tolist() == theirs.scalars[exact].tolist(), f"call {k}"
        # Two fp32 summation orders of the same values: x and everything after it agree to ~1e-7.
        torch.testing.assert_close(ours.log, theirs.log, rtol=1e-6, atol=1e-9, equal_nan=True)
        torch.testing.assert_close(ours.scalars, theirs.scalars, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "check",
    [
        td.test_nan_inf_and_zero_signals_force_compute,
        td.test_all_zero_signal_from_the_start,
        td.test_threshold_zero_never_reuses,
        td.test_log_and_counters_across_generations,
        td.test_threshold_zero_is_off_even_for_a_negative_polynomial,
        td.test_infinite_polynomial_value_computes_and_clears_the_accumulator,
    ],
    ids=lambda f: f.__name__.removeprefix("test_"),
)
def test_decide_edge_cases_of_test_decide_through_the_package(check):
    """tests/test_decide.py's NaN/Inf, zero, off-switch and overflow cases, with the package running C++."""
    with cpp.enabled(True):
        assert cpp.implementation("cpu") == "cpp"
        if "dtype" in check.__code__.co_varnames[: check.__code__.co_argcount]:
            for dtype in DTYPES:
                check("cpu", dtype)
        else:
            check("cpu")


@pytest.mark.parametrize("warmup, cooldown, expected", [(0, 0, "CRRRRRRR"), (3, 2, "CCCRRRCC"), (1, 1, "CRRRRRRC")])
def test_forced_steps_follow_the_counter(warmup, cooldown, expected):
    config = td.flux_config(thresh=50.0, steps=8, warmup_steps=warmup, cooldown_steps=cooldown)
    schedule, _ = td.check_against_oracle(td.random_walk(512, 16, torch.float32), config, "cpu", call=cpp_call)
    assert schedule == expected * 2


BASE = dict(rel_l1_thresh=0.5, num_inference_steps=10)
# Each option beyond the original, alone, on top of BASE (the test asserts it changes the schedule).
OPTIONS = {
    "warmup_cooldown": dict(warmup_steps=3, cooldown_steps=3),
    "max_consecutive": dict(max_consecutive_skips=1),
    "min_skip_step": dict(min_skip_step=4),
    "max_skip_step": dict(max_skip_step=4),
    "clamp_x": dict(clamp_x=(0.0, 0.02)),
    "abs_rescaled": dict(coefficients="flux-kontext", abs_rescaled=True),
    "denominator_eps": dict(denominator_eps=0.5),
}


def _config(options: dict) -> ResolvedConfig:
    options = dict(options)
    eps = options.pop("denominator_eps", None)  # a coefficient set's rule, not a TeaCacheConfig field
    if options.get("abs_rescaled"):
        options = {**options, "rel_l1_thresh": 0.3}
    config = ResolvedConfig.resolve(TeaCacheConfig(**{**BASE, **options}), "flux")
    return config if eps is None else dataclasses.replace(config, denominator_eps=eps)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_option_schedules_as_the_oracle(option, dtype):
    with_option = _config(OPTIONS[option])
    without = _config({k: v for k, v in OPTIONS[option].items() if k == "coefficients"})
    distances = [0.3, 0.01, 0.005, 0.02, 0.01, 0.3, 0.01, 0.005, 0.01, 0.02] * 2  # 21 calls: two generations
    signals = td.distance_walk(distances, numel=2049, dtype=dtype)
    schedule, oracle = td.check_against_oracle(signals, with_option, "cpu", call=cpp_call)
    td.assert_no_near_ties(oracle, with_option)
    plain = TeaCacheOracle(without)
    assert schedule != "".join("R" if plain.decide(s) else "C" for s in signals), "the option changed nothing here"
    assert "R" in schedule, schedule


def test_fuzzed_configs_and_signals_decide_as_the_reference():
    """tests/test_fuzz.py's generators (every option, NaN/Inf, zeros, 1e-30..1e30, all dtypes) through the package."""
    fuzz = pytest.importorskip("test_fuzz")
    from hypothesis import given, settings

    @settings(fuzz.FUZZ, max_examples=300)
    @given(config=fuzz.configs(), signals=fuzz.signal_sequences())
    def property_(config, signals):
        fuzz.run(config, signals, "cpu")

    with cpp.enabled(True):
        property_()


def test_unaligned_and_non_contiguous_signals():
    base = torch.randn(4099, dtype=torch.float64)
    config = td.flux_config(thresh=0.5, steps=6)
    signals = [(base * (1 + 0.02 * k)).float() for k in range(8)]
    unaligned = [torch.cat([torch.zeros(1), s])[1:] for s in signals]  # 4 bytes past a 64-byte boundary
    assert unaligned[0].data_ptr() % 16 != 0
    schedule = td.check_against_oracle(unaligned, config, "cpu", call=cpp_call)[0]
    assert "R" in schedule
    # Every other element: not contiguous (the op reads a contiguous copy); same decisions, same state.
    strided = [torch.stack([s, s], dim=1)[:, 0] for s in signals]
    assert not strided[0].is_contiguous()
    st = S.ContextState("strided")
    st.allocate(signals[0], signals[0], config)
    assert "".join("R" if cpp_call(s, st) else "C" for s in strided) == schedule
    assert torch.equal(st.prev_signal, signals[-1])


def test_decide_rejects_wrong_buffers_by_name():
    sig = torch.randn(64)
    st = S.ContextState("t")
    st.allocate(sig, sig, td.flux_config())
    op = torch.ops.teacache_cpp.decide.default
    with pytest.raises(RuntimeError, match="scalars must be Double, got Float"):
        op(sig, st.prev_signal, st.scalars.float(), st.config, st.log, st.partials, st.ticket)
    with pytest.raises(RuntimeError, match="partials must hold at least 2048 elements"):
        op(sig, st.prev_signal, st.scalars, st.config, st.log, st.partials[:16], st.ticket)
    with pytest.raises(RuntimeError, match="prev_signal must be contiguous, with the signal's dtype"):
        op(sig, st.prev_signal.half(), st.scalars, st.config, st.log, st.partials, st.ticket)
    with pytest.raises(RuntimeError, match="expected a float32, float16 or bfloat16 tensor"):
        op(sig.double(), st.prev_signal.double(), st.scalars, st.config, st.log, st.partials, st.ticket)


def test_opcheck_decide():
    sig = td.random_walk(300, 2, torch.float32)
    st = S.ContextState("t")
    st.allocate(sig[0], sig[0], td.flux_config())
    args = (sig[1], st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket)
    torch.library.opcheck(torch.ops.teacache_cpp.decide.default, args)
    with cpp.enabled(True):  # the package's op, running the C++ kernel inside
        torch.library.opcheck(torch.ops.teacache.decide.default, args)


# -- apply_residual ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "compute"])
def test_apply_residual_is_bitwise_torch(dtype, numel, reuse):
    g = torch.Generator().manual_seed(numel)
    x, out, res = (torch.randn(numel, generator=g).to(dtype) for _ in range(3))
    x0, out0, res0 = x.clone(), out.clone(), res.clone()
    torch.ops.teacache_cpp.apply_residual.default(torch.tensor(reuse), x, out, res)
    if reuse:
        assert torch.equal(out, x0 + res0) and torch.equal(res, res0)
    else:
        assert torch.equal(res, out0 - x0) and torch.equal(out, out0)
    assert torch.equal(x, x0)


def test_apply_residual_through_the_package_ignores_garbage_and_views():
    with cpp.enabled(True):
        x = torch.randn(4099)
        res = torch.randn(4099)
        out = torch.full_like(x, float("nan"))  # what torch.empty_like may hand over on a reuse step
        apply_residual_(torch.tensor(True), x, out, res)
        assert torch.equal(out, x + res)
        x3, out3, res3 = (torch.randn(2 * 33 * 31).bfloat16().view(2, 33, 31) for _ in range(3))
        out0 = out3.clone()
        apply_residual_(torch.tensor(False), x3[:, :, :], out3, res3)
        assert torch.equal(res3, out0 - x3)


def test_opcheck_apply_residual():
    for flag in (True, False):
        x, out, res = (torch.randn(300) for _ in range(3))
        torch.library.opcheck(torch.ops.teacache_cpp.apply_residual.default, (torch.tensor(flag), x, out, res))


# -- which implementation runs -----------------------------------------------------------------------------------


def test_the_package_runs_cpp_on_cpu_when_selected_and_says_so(monkeypatch):
    calls = []
    op = cpp._decide_op
    monkeypatch.setattr(cpp, "_decide_op", lambda *a: calls.append(1) or op(*a))
    sig = torch.randn(1000)
    st = S.ContextState("t")
    st.allocate(sig, sig, td.flux_config())
    args = (sig, st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket)
    with cpp.enabled(False):
        assert cpp.implementation("cpu") == "torch"
        decide(*args)
    assert not calls
    with cpp.enabled(True):
        assert cpp.implementation("cpu") == "cpp"
        assert cpp.implementation("cuda") in ("triton", "cpp")
        decide(*args)
        assert calls == [1]
        # Compiled, the torch path is traced (the C++ op is opaque to Inductor): no C++ call inside the graph.
        compiled = torch.compile(decide, backend="aot_eager", fullgraph=True)
        compiled(*args)
        assert calls == [1]
        if INTERPRET:
            with triton_on_cpu():
                assert cpp.implementation("cpu") == "triton"


def test_the_environment_switch_and_a_lean_import():
    """TEACACHE_CPP=1: the first eager call loads (here: the cached build); importing the package loads nothing."""
    code = (
        "import torch, teacache_kernels\n"
        "assert not torch.ops.loaded_libraries, torch.ops.loaded_libraries\n"
        "from teacache_kernels.ops import cpp\n"
        "from teacache_kernels.ops.apply_residual import apply_residual_\n"
        "x = torch.randn(10); out = torch.empty(10); r = torch.randn(10)\n"
        "apply_residual_(torch.tensor(True), x, out, r)\n"
        "print(cpp.implementation('cpu'), len(torch.ops.loaded_libraries))\n"
    )
    env = {**os.environ, "TEACACHE_CPP": "1", "TEACACHE_CPP_BUILD_DIR": str(BUILD_DIR), "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpp", "1"]


@pytest.mark.parametrize("with_cpp", [False, True], ids=["torch-path", "cpp"])
def test_the_package_runs_without_triton(with_cpp):
    """torch's Windows wheels have no Triton: the package imports, a cached model runs on the torch path or the C++
    ops (which `implementation` names), and a Triton kernel launched anyway says why it cannot run."""
    code = (
        "import sys; sys.modules['triton'] = None  # as if Triton were not installed\n"
        "import torch, teacache_kernels as tk\n"
        "from teacache_kernels.ops import _backend, cpp\n"
        "from teacache_kernels.ops.decide import _decide_kernel\n"
        "from teacache_kernels.tiny_models import TinyFluxShape, flow_matching_loop, flux_inputs, tiny_flux_transformer\n"
        "assert not _backend.HAS_TRITON\n"
        "shape = TinyFluxShape(); m = tiny_flux_transformer(shape); ref = tiny_flux_transformer(shape)\n"
        "tk.enable_teacache(m, num_inference_steps=8, rel_l1_thresh=0.6)\n"
        "tk.enable_teacache(ref, num_inference_steps=8, rel_l1_thresh=0.6, reference=True)\n"
        "latents, cond = flux_inputs(shape)\n"
        "out, expected = (flow_matching_loop(x, latents, cond, 8) for x in (m, ref))\n"
        "schedule = tk.summary(m).contexts['cond'].schedule\n"
        "assert schedule == tk.summary(ref).contexts['cond'].schedule and 'R' in schedule, schedule\n"
        "assert torch.equal(out, expected)\n"
        "try:\n    _decide_kernel[(1,)]()\nexcept RuntimeError as e:\n    print('refused:', e)\n"
        "print(cpp.implementation('cpu'))\n"
    )
    env = {**os.environ, "TEACACHE_CPP": "1" if with_cpp else "0", "TEACACHE_CPP_BUILD_DIR": str(BUILD_DIR), "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "refused: _decide_kernel is a Triton kernel, and Triton is not installed in this environment"
    assert lines[1] == ("cpp" if with_cpp else "torch")


def test_the_environment_switch_off_and_a_bad_value(monkeypatch):
    for name, value in (("_resolved", False), ("_on_cpu", False), ("_on_cuda", False)):
        monkeypatch.setattr(cpp, name, value)
    monkeypatch.setenv("TEACACHE_CPP", "0")
    assert cpp.implementation("cpu") == "torch"  # resolved now: stays off although the library is loaded
    monkeypatch.setattr(cpp, "_resolved", False)
    monkeypatch.setenv("TEACACHE_CPP", "maybe")
    with pytest.raises(ValueError, match="TEACACHE_CPP='maybe'"):
        cpp.implementation("cpu")


# -- CUDA: compiled here, run where a GPU is ---------------------------------------------------------------------


NVCC = shutil.which("nvcc")


def needs_cuda_kernels():
    if not cpp.available("cuda"):
        pytest.skip("the CUDA kernels were not built here (needs a CUDA torch and nvcc)")


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
def test_the_cuda_kernels_compile_for_sm90_without_spills(tmp_path):
    """nvcc -c against the wheel's ATen headers (the CPU wheel ships them; it lacks only c10/cuda's generated
    cmake header, whose one macro matters on Windows alone). About 30 s on 2 cores."""
    include = Path(torch.__file__).parent / "include"
    command = [
        NVCC, "-c", str(REPO / "csrc" / "teacache_ops_cuda.cu"), "-o", str(tmp_path / "ops.o"), "-std=c++20",
        "--expt-relaxed-constexpr", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", f"-I{include}",
        f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}", "-gencode", "arch=compute_90,code=sm_90",
        "-Xptxas", "-v", "-Xcompiler", "-fPIC",
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    usage = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    assert len(usage) == 12, out.stderr[-4000:]  # decide x 3 dtypes x {vector, scalar}, apply_residual the same
    assert all(stores == "0" and loads == "0" for stores, loads in usage)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES + [3_000_001])  # 3M: more blocks of work than MAX_PROGRAMS, grid-stride
def test_cuda_decide_matches_oracle(dtype, numel):
    needs_cuda_kernels()
    config = td.flux_config(thresh=0.5, steps=12)
    schedule, oracle = td.check_against_oracle(td.random_walk(numel, 26, dtype, seed=numel), config, "cuda", call=cpp_call)
    assert "R" in schedule
    td.assert_no_near_ties(oracle, config)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES)
def test_cuda_apply_residual_is_bitwise_torch(dtype, numel):
    needs_cuda_kernels()
    for reuse in (True, False):
        x, out, res = (torch.randn(numel, device="cuda").to(dtype) for _ in range(3))
        x0, out0, res0 = x.clone(), out.clone(), res.clone()
        torch.ops.teacache_cpp.apply_residual.default(torch.tensor(reuse, device="cuda"), x, out, res)
        assert torch.equal(out, x0 + res0) if reuse else torch.equal(res, out0 - x0)


@requires_cuda
@pytest.mark.gpu
def test_cuda_decide_unaligned_and_through_the_package():
    needs_cuda_kernels()
    config = td.flux_config(thresh=0.5, steps=6)
    base = torch.randn(4099, dtype=torch.float64)
    signals = [torch.cat([torch.zeros(1), (base * (1 + 0.02 * k)).float()])[1:] for k in range(8)]
    schedule = td.check_against_oracle(signals, config, "cuda", call=cpp_call)[0]  # the scalar (unaligned) kernel
    assert "R" in schedule
    with cpp.enabled(True):
        assert cpp.implementation("cuda") == "cpp"
        assert td.check_against_oracle(signals, config, "cuda")[0] == schedule
