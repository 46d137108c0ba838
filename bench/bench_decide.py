"""Micro-benchmark: the fused TeaCache decision against the original's eager path, at real signal shapes.

    python bench/bench_decide.py            # CPU here; on a GPU it times the Triton kernel
    python bench/bench_decide.py --quick    # fewer repeats, skips the largest shape

Implementations, per call (one transformer step's decision):
  eager reference   the original TeaCache: `((m - p).abs().mean() / p.abs().mean()).item()`, then the
                    Python accumulator; a host sync on a GPU. (It rebinds p = m without a copy; ours
                    copies, because CUDA graphs need fixed addresses.)
  fused             teacache::decide: one launch, 2 reads + 1 write of the signal, no host sync
                    (Triton on a GPU; the torch path on CPU, op by op)
  fused, compiled   teacache::decide under torch.compile (on CPU: Inductor fuses the torch path into C++)
  C++               teacache::decide with the C++ ops selected (csrc/, ops/cpp.py; built on first run,
                    `--no-cpp` skips): one vectorized pass and the float64 decision in C++ on CPU, the
                    CUDA kernel on a GPU where it was built. Timed through `ops.decide`, as a model calls it
                    (its checks, then straight to the C++ op).
  C++, op alone     torch.ops.teacache_cpp.decide called directly: the kernel without `ops.decide`'s checks.

GPU timing: CUDA events with a cold L2 (256 MiB flushed before each call) for the fused op; the
reference is timed on the host with the device drained, since its `.item()` drains it anyway.
Results: a table on stdout and rows appended to bench/results/decide.csv, stamped with the hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_csv, copy_bandwidth, hardware, print_table, time_cpu, time_cuda, time_host_cuda, versions  # noqa: E402

import teacache_kernels  # noqa: E402,F401
from teacache_kernels import state as S  # noqa: E402
from teacache_kernels.coefficients import PUBLISHED, polyval  # noqa: E402
from teacache_kernels.config import ResolvedConfig, TeaCacheConfig  # noqa: E402
from teacache_kernels.ops import cpp  # noqa: E402
from teacache_kernels.ops.decide import decide  # noqa: E402

# Each family's signal at its typical resolution (bench/cache_memory.py derives the token counts): whole-sequence
# modulated inputs, and the tiny timestep embeddings some originals compare instead.
SHAPES = {
    "FLUX.1 1024px modulated (1, 4096, 3072)": (1, 4096, 3072),
    "Qwen-Image 1328px modulated (1, 6889, 3072)": (1, 6889, 3072),
    "Lumina2 1024px joint modulated (1, 4352, 2304)": (1, 4352, 2304),
    "HiDream-Dev 1024px image tokens (1, 4096, 2560)": (1, 4096, 2560),
    "LTX-Video 768x512x161 modulated (2, 8064, 2048)": (2, 8064, 2048),
    "Mochi 848x480x163 modulated (2, 44520, 3072)": (2, 44520, 3072),
    "HunyuanVideo 720p x129 modulated (1, 118800, 3072)": (1, 118800, 3072),
    "Cosmos-1.0-7B 1280x704x121 modulated (1, 56320, 4096)": (1, 56320, 4096),
    "Wan2.1-14B e time embedding (1, 5120)": (1, 5120),
    "Wan2.1-14B e0 timestep proj (1, 6, 5120)": (1, 6, 5120),
    "CogVideoX-5b temb (2, 512)": (2, 512),
    "HiDream-Full t_embedder (2, 2560)": (2, 2560),
}


def reference_step(signal: torch.Tensor, state: dict, coefficients) -> bool:
    prev = state["prev"]
    x = ((signal - prev).abs().mean() / prev.abs().mean()).item()  # the host sync of every public port
    state["acc"] += polyval(coefficients, x)
    reuse = state["acc"] < 0.4
    if not reuse:
        state["acc"] = 0.0
    state["prev"] = signal
    return reuse


def measure(shape, device, dtype, config, coefficients, compiled_decide, repeats, with_cpp):
    """Median seconds per call of each implementation at one signal shape; bytes the fused op moves."""
    g = torch.Generator(device=device).manual_seed(0)
    signal = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    ref_state = {"prev": signal * 1.01, "acc": 0.0}
    st = S.ContextState("bench")
    st.allocate(signal, signal, config)
    st.prev_signal.copy_(signal * 1.01)
    buffers = (st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket)
    time_fused = time_cuda if device == "cuda" else time_cpu
    time_ref = time_host_cuda if device == "cuda" else time_cpu
    timings = {"eager reference": time_ref(lambda: reference_step(signal, ref_state, coefficients), repeats)}
    with torch.no_grad():
        with cpp.enabled(False) if with_cpp else contextlib.nullcontext():  # the torch path / Triton, as without C++
            timings["fused"] = time_fused(lambda: decide(signal, *buffers), repeats)
        timings["fused, compiled"] = time_fused(lambda: compiled_decide(signal, *buffers), repeats)
        if with_cpp:
            with cpp.enabled(True):
                assert cpp.implementation(device) == "cpp"
                timings["C++"] = time_fused(lambda: decide(signal, *buffers), repeats)
            op = torch.ops.teacache_cpp.decide.default
            timings["C++, op alone"] = time_fused(lambda: op(signal, *buffers), repeats)
    return timings, 3 * signal.numel() * signal.element_size(), signal.numel()  # reads signal + prev, writes prev


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=None, help="default: 50 on a GPU, 7 on CPU")
    p.add_argument("--quick", action="store_true", help="3 repeats, without the HunyuanVideo shape")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--only", default=None, metavar="TEXT", help="only the shapes whose name contains TEXT")
    p.add_argument("--no-cpp", action="store_true", help="without the C++ rows (which build csrc/ on first use)")
    args = p.parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    repeats = args.repeats or (3 if args.quick else (50 if device == "cuda" else 7))
    shapes = {k: v for k, v in SHAPES.items() if not (args.quick and "Hunyuan" in k) and (args.only or "") in k}

    hw = hardware(device)
    copy_bw = copy_bandwidth(device)
    print(f"teacache::decide vs the eager reference -- {hw}; {args.dtype}; copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    config = ResolvedConfig.resolve(TeaCacheConfig(rel_l1_thresh=0.4, num_inference_steps=10**6), "flux")
    coefficients = PUBLISHED["flux"].coefficients
    compiled_decide = torch.compile(decide, fullgraph=True)
    with_cpp = False
    if not args.no_cpp:
        try:
            cpp.build()
            with_cpp = cpp.available(device)
        except Exception as e:  # no compiler here: the other rows still mean something
            print(f"  (no C++ rows: {e})")
        if not with_cpp:
            print(f"  (no C++ rows: the C++ ops for {device} were not built)")

    rows = []
    for name, shape in shapes.items():
        print(f"  {name} ...", flush=True)
        timings, nbytes, numel = measure(shape, device, dtype, config, coefficients, compiled_decide, repeats, with_cpp)
        t_ref = timings["eager reference"]
        for impl, t in timings.items():
            fused = impl != "eager reference"
            rows.append({
                "hardware": hw, **versions(), "device": device, "dtype": args.dtype, "signal": name,
                "numel": numel, "impl": impl, "median_us": f"{t * 1e6:.1f}",
                "GB/s": f"{nbytes / t / 1e9:.1f}" if fused else "-",
                "pct_of_copy": f"{100 * nbytes / t / copy_bw:.0f}%" if fused else "-",
                "speedup_vs_reference": f"{t_ref / t:.2f}x",
            })  # fmt: skip

    print()
    print_table(rows, ["signal", "impl", "median_us", "GB/s", "pct_of_copy", "speedup_vs_reference"])
    print(f"\n(median of {repeats}; GB/s counts the fused op's 2 reads + 1 write of the signal)")
    if not args.no_csv:
        print(f"appended to {append_csv('decide', rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
