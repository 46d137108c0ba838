"""Command line: `python -m teacache_kernels {demo,calibrate,threshold,models,ptx,export}`."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from teacache_kernels import demo

    demo.run(args.thresh, steps=args.steps, per_digit=args.per_digit, compile=args.compile, repeats=args.repeats, out=args.out)
    return 0


def _models(args) -> int:
    from teacache_kernels.coefficients import PUBLISHED
    from teacache_kernels.models import FAMILIES

    print("Supported transformer classes (cached forward installed by enable_teacache):")
    for cls, fam in sorted(FAMILIES.items()):
        print(f"  {cls:<28} family {fam.name}, block span: {' + '.join(fam.block_lists)}")
    print("\nPublished coefficient sets (use by name: coefficients='...'):")
    for s in PUBLISHED.values():
        print(f"  {s.name:<22} default thresh {s.default_thresh:<5g} {s.model}")
    return 0


def _ptx(args) -> int:
    from teacache_kernels.ops import aot

    aot.dump(args.out, archs=args.arch, dtypes=args.dtype)
    return 0


def _export(args) -> int:
    from pathlib import Path

    from teacache_kernels import export

    out = Path(args.out)
    if not args.check:
        for path in export.export_digits(out, labels=args.labels, seed=args.seed, rel_l1_thresh=args.thresh, steps=args.steps).values():
            print(f"wrote {path}")
    if args.run_cpp:
        print(f"building the C++ runner in {args.build_dir} ...", flush=True)
        runner = export.build_runner(args.build_dir)
        print(export.run_runner(runner, out, repeats=args.repeats, threads=args.threads), end="")
    elif not args.check:
        files = " ".join(str(out / f) for f in (export.CACHED_PACKAGE, export.PLAIN_PACKAGE, export.INPUTS_FILE, export.RESULT_FILE))
        print(f"run it from C++: {export.RUNNER_NAME} {files}\nthen check it: python -m teacache_kernels export --check --out {out}")
        return 0
    c = export.check_digits(args.out)
    print(f"schedule identical to Python's: {'yes' if c['schedule_matches'] else 'NO'}")
    print(f"images vs Python: max |diff| {c['max_abs']:.2e} (budget {export.IMAGE_ATOL:g}; the uncached package "
          f"{c['plain_max_abs']:.2e}), worst PSNR {c['min_psnr_db']:.1f} dB")
    print(f"C++ runner: uncached {1e3 * c['plain_seconds']:.1f} ms, TeaCache {1e3 * c['cached_seconds']:.1f} ms per "
          f"generation, speedup {c['speedup']:.2f}x")
    return 0 if c["schedule_matches"] and c["within_budget"] and c["repeats_identical"] else 1


def main(argv: list[str] | None = None) -> int:
    from teacache_kernels.calibration.cli import add_parsers as add_calibration_parsers

    parser = argparse.ArgumentParser(prog="python -m teacache_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the embedded digits model uncached and cached, compiled: table and PNG grid")
    demo.add_argument("--thresh", type=float, nargs="+", help="rel_l1_thresh values (default: 0.5x, 1x, 2x the calibrated one)")
    demo.add_argument("--steps", type=int, help="Euler steps (default: the model's 30)")
    demo.add_argument("--per-digit", type=int, default=2, help="samples of each digit")
    demo.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile(fullgraph=True)")
    demo.add_argument("--repeats", type=int, default=3, help="generations timed per row (median)")
    demo.add_argument("--out", default="teacache_demo.png", help="where to write the grid")
    demo.set_defaults(run=_demo)
    add_calibration_parsers(sub)
    models = sub.add_parser("models", help="supported transformer classes and published coefficient sets")
    models.set_defaults(run=_models)
    ptx = sub.add_parser("ptx", help="compile the kernels for NVIDIA GPUs (no GPU needed); write PTX, cubin, resource usage")
    ptx.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    ptx.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=["bf16", "fp16", "fp32"])
    ptx.add_argument("--out", default="ptx", help="output directory")
    ptx.set_defaults(run=_ptx)
    exp = sub.add_parser("export", help="AOTInductor packages of the digits model (TeaCache and uncached) for the C++ runner")
    exp.add_argument("--model", choices=["digits"], default="digits", help="the embedded model (the only one with weights here)")
    exp.add_argument("--out", default="aoti_digits", help="directory for the packages, the inputs and the Python run")
    exp.add_argument("--thresh", type=float, help="rel_l1_thresh (default: the calibrated file's recommended one)")
    exp.add_argument("--steps", type=int, help="Euler steps (default: the model's 30)")
    exp.add_argument("--seed", type=int, default=0, help="the initial noise's seed")
    exp.add_argument("--labels", type=int, nargs="+", default=list(range(10)), help="digits to sample")
    exp.add_argument("--run", dest="run_cpp", action="store_true", help="then build the C++ runner, run it and compare with Python")
    exp.add_argument("--check", action="store_true", help="skip exporting: use the packages already in --out (compare its result.pt with Python)")
    exp.add_argument("--build-dir", default="build/aoti_runner", help="CMake build directory of the runner")
    exp.add_argument("--repeats", type=int, default=5, help="timed generations per package in the runner")
    exp.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runner (default: the environment's)")
    exp.set_defaults(run=_export)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
