"""Command line: `python -m teacache_kernels {demo,calibrate,threshold,models,ptx}`."""

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
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
