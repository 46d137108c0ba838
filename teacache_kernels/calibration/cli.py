"""Command line: fit a model's TeaCache polynomial, then find the threshold for a quality or speed target.

    python -m teacache_kernels.calibration.cli calibrate --model digits|tiny-flux|module:function ...
    python -m teacache_kernels.calibration.cli threshold --model ... --min-psnr 30 --save

`add_parsers(subparsers)` adds both subcommands to another argparse parser (each sets `run=`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .probes import DEFAULT_SIGNALS, RUNTIME_SIGNALS, TARGETS


def _default_out(setup) -> Path:
    return Path(setup.default_out) if setup.default_out is not None else Path(f"{setup.model_name}.teacache.json")


def _beside(json_path: Path, kind: str) -> Path:
    return json_path.with_name(f"{json_path.stem}.{kind}.png")


def _threads(args) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def run_calibrate(args) -> int:
    from .calibrator import calibrate
    from .setups import load_setup

    _threads(args)

    setup = load_setup(args.model, args.samples, args.steps)
    result = calibrate(
        setup.transformer,
        setup.run,
        setup.samples,
        signals=args.signal,
        target=args.target,
        degree=args.degree,
        model_name=setup.model_name,
        progress=not args.quiet,
    )
    print(result.report())
    out = Path(args.out) if args.out else _default_out(setup)
    plot = Path(args.plot) if args.plot else _beside(out, "calibration")
    result.plot(plot)
    print(f"wrote {plot}")
    if result.best is None:
        print(f"nothing saved to {out}: no candidate is a runtime signal", file=sys.stderr)
        return 1
    entry = result.save(out, signal=args.runtime_signal)["models"][result.model_name][str(result.seq_len)]
    print(f"wrote {out} (models[{result.model_name!r}][{str(result.seq_len)!r}], signal {entry['signal']!r})")
    return 0


def run_threshold(args) -> int:
    from .setups import load_setup
    from .threshold import find_threshold

    _threads(args)

    setup = load_setup(args.model, args.samples, args.steps)
    coefficients_file = None
    if args.coefficients is None:
        coefficients_file = Path(args.coefficients_file) if args.coefficients_file else _default_out(setup)
        if not coefficients_file.is_file():
            print(
                f"no coefficients file {coefficients_file}: run `calibrate --model {args.model}` first "
                "(or give --coefficients NAME for a published set)",
                file=sys.stderr,
            )
            return 2
    result = find_threshold(
        setup.transformer,
        setup.run,
        setup.threshold_samples if setup.threshold_samples is not None else setup.samples,
        min_psnr=args.min_psnr,
        min_speedup=args.min_speedup,
        thresholds=args.thresholds,
        coefficients=args.coefficients,
        coefficients_file=coefficients_file,
        model_name=setup.model_name if coefficients_file is not None else None,
        num_inference_steps=setup.num_inference_steps,
        metrics=setup.metrics,
        progress=not args.quiet,
    )
    print(result.report())
    base = coefficients_file or Path(f"{setup.model_name}.teacache.json")
    plot = Path(args.plot) if args.plot else _beside(base, "threshold")
    result.plot(plot)
    print(f"wrote {plot}")
    if args.save:
        if result.threshold is None:
            print("nothing saved: no threshold met the target", file=sys.stderr)
            return 1
        if coefficients_file is None:
            print("--save needs the coefficients to come from a file (--coefficients-file)", file=sys.stderr)
            return 2
        result.save_to(coefficients_file)
        print(f"wrote recommended_thresh {result.threshold:.4g} into {coefficients_file}")
    return 0 if result.threshold is not None else 1


def add_parsers(sub) -> None:
    """Add the `calibrate` and `threshold` subcommands to an argparse subparsers object."""
    model_help = (
        "digits (the embedded model), tiny-flux (random tiny FLUX), or module:function returning a CalibrationSetup"
    )
    cal = sub.add_parser("calibrate", help="fit TeaCache's rescale polynomial for a model (writes JSON and a PNG)")
    cal.add_argument("--model", required=True, help=model_help)
    cal.add_argument("--samples", type=int, help="calibration inputs (default: the setup's)")
    cal.add_argument("--steps", type=int, help="inference steps per generation (default: the setup's)")
    cal.add_argument("--degree", type=int, default=4, help="polynomial degree, 1-7 (default 4)")
    cal.add_argument("--target", choices=TARGETS, default="output", help="what the polynomial predicts the change of")
    cal.add_argument(
        "--signal",
        action="append",
        metavar="NAME",
        help=f"candidate signal, repeatable: a built-in of the model's family ({', '.join(DEFAULT_SIGNALS)}...; "
        "default: all of them) or a submodule path",
    )
    cal.add_argument(
        "--runtime-signal",
        help=f"save this signal's fit: one the model's family computes ({', '.join(RUNTIME_SIGNALS)}, ...; "
        "default: the best-ranked runtime signal)",
    )
    cal.add_argument(
        "--out", help="coefficients JSON to write or merge into (default: the setup's, or MODEL.teacache.json)"
    )
    cal.add_argument("--plot", help="PNG of the fits (default: next to the JSON)")
    cal.add_argument("--quiet", action="store_true", help="no progress bar")
    cal.add_argument("--threads", type=int, help="torch CPU threads (small models run fastest on 1)")
    cal.set_defaults(run=run_calibrate)

    thr = sub.add_parser("threshold", help="find the rel_l1_thresh meeting a PSNR floor or a speedup target")
    thr.add_argument("--model", required=True, help=model_help)
    goal = thr.add_mutually_exclusive_group(required=True)
    goal.add_argument("--min-psnr", type=float, metavar="DB", help="worst-sample PSNR floor vs uncached (dB)")
    goal.add_argument("--min-speedup", type=float, metavar="X", help="transformer calls / computed calls")
    coef = thr.add_mutually_exclusive_group()
    coef.add_argument("--coefficients-file", help="calibrated coefficients (default: the setup's JSON)")
    coef.add_argument("--coefficients", help="a published coefficient set name instead of a file")
    thr.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        help="candidates (default: 12-point geometric grid 0.02-2.0, then bisection)",
    )
    thr.add_argument("--samples", type=int, help="inputs to measure on (default: the setup's held-out ones)")
    thr.add_argument("--steps", type=int, help="inference steps per generation (default: the setup's)")
    thr.add_argument("--save", action="store_true", help="write recommended_thresh into the coefficients file")
    thr.add_argument("--plot", help="PNG of the trade-off curve (default: next to the JSON)")
    thr.add_argument("--quiet", action="store_true", help="no progress bar")
    thr.add_argument("--threads", type=int, help="torch CPU threads (small models run fastest on 1)")
    thr.set_defaults(run=run_threshold)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m teacache_kernels.calibration.cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
