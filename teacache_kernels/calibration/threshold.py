"""find_threshold(): the rel_l1_thresh that meets a quality floor (PSNR) or a speedup target.

Each sample runs once uncached (the reference output and wall time), then once per candidate threshold
with TeaCache on (the fused path, eager). Quality is the PSNR of the cached output against the uncached
one of the same sample; speed is counted two ways: `calls_speedup` = transformer calls / calls that ran
the blocks (what a compute-bound model gains), and the measured wall-clock ratio (which also pays the
decision's cost and, on a small model, per-call overheads).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .coefficients_file import load_coefficients_file, update_entry
from .progress import Progress
from .record import ContextTracker, track_sequence_lengths, uncached_transformer

DEFAULT_GRID = tuple(float(v) for v in np.geomspace(0.02, 2.0, 12))
DEFAULT_REFINE = 3


@dataclass(frozen=True)
class ThresholdPoint:
    threshold: float
    computed: int  # transformer calls that ran the blocks, all samples and contexts
    total: int  # transformer calls
    wall_s: float  # all samples
    reference_wall_s: float  # the same samples uncached
    mean_psnr: float  # dB vs the uncached output; inf where identical
    min_psnr: float  # the worst sample's
    metrics: dict[str, float] = field(default_factory=dict)  # user metrics, mean over samples

    @property
    def computed_fraction(self) -> float:
        return self.computed / self.total if self.total else math.nan

    @property
    def calls_speedup(self) -> float:
        return self.total / self.computed if self.computed else math.inf

    @property
    def wall_speedup(self) -> float:
        return self.reference_wall_s / self.wall_s if self.wall_s > 0 else math.nan

    def as_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "computed": self.computed,
            "total": self.total,
            "computed_fraction": self.computed_fraction,
            "calls_speedup": self.calls_speedup,
            "wall_speedup": self.wall_speedup,
            "mean_psnr": self.mean_psnr,
            "min_psnr": self.min_psnr,
            **self.metrics,
        }


@dataclass
class ThresholdResult:
    criterion: str  # "min_psnr" or "min_speedup"
    target: float  # dB or x
    threshold: float | None  # the chosen rel_l1_thresh; None when no candidate met the target
    points: list[ThresholdPoint]  # sorted by threshold
    model_name: str
    seq_len: int
    num_inference_steps: int
    num_samples: int
    coefficients: str | tuple[float, ...] | None  # as passed to enable_teacache (None: the family default)
    coefficients_file: str | None = None  # the file the coefficients came from
    entry_seq_len: int | None = None  # the fitted length of the entry used
    reference_metrics: dict[str, float] = field(default_factory=dict)  # user metrics of the uncached outputs
    message: str = ""

    @property
    def chosen(self) -> ThresholdPoint | None:
        return next((p for p in self.points if p.threshold == self.threshold), None)

    def curve(self) -> list[dict]:
        return [p.as_dict() for p in self.points]

    def passes(self, point: ThresholdPoint) -> bool:
        return _passes(self.criterion, self.target, point)

    def report(self) -> str:
        what = (
            f"worst-sample PSNR >= {self.target:g} dB"
            if self.criterion == "min_psnr"
            else (f"calls speedup >= {self.target:g}x")
        )
        names = list(self.reference_metrics)
        head = (
            f"Threshold search for {self.model_name} ({self.seq_len} tokens, {self.num_samples} samples x "
            f"{self.num_inference_steps} steps), target: {what}"
        )
        cols = f"  {'thresh':>8}  {'computed':>9}  {'calls x':>7}  {'wall x':>6}  {'mean PSNR':>9}  {'min PSNR':>8}"
        cols += "".join(f"  {n:>{max(8, len(n))}}" for n in names) + "  meets"
        rows = [head, cols]
        if names:
            ref = "".join(f"  {self.reference_metrics[n]:>{max(8, len(n))}.4g}" for n in names)
            rows.append(f"  {'uncached':>8}  {'':>9}  {1:>7.2f}  {1:>6.2f}  {'inf':>9}  {'inf':>8}{ref}")
        for p in self.points:
            mark = "<- chosen" if p.threshold == self.threshold else ("yes" if self.passes(p) else "no")
            extra = "".join(f"  {p.metrics.get(n, math.nan):>{max(8, len(n))}.4g}" for n in names)
            rows.append(
                f"  {p.threshold:>8.4g}  {p.computed:>4}/{p.total:<4}  {p.calls_speedup:>7.2f}  {p.wall_speedup:>6.2f}  "
                f"{_db(p.mean_psnr):>9}  {_db(p.min_psnr):>8}{extra}  {mark}"
            )
        rows.append(self.message)
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.report()

    def plot(self, path: str | os.PathLike) -> None:
        from .plot import plot_threshold

        plot_threshold(self, path)

    def save_to(
        self, path: str | os.PathLike | None = None, model_name: str | None = None, seq_len: int | None = None
    ) -> dict:
        """Write `recommended_thresh` and the criterion into the coefficients file's entry. Returns the entry.

        Defaults: the file, model and fitted length the coefficients came from. The entry must hold the
        coefficients the threshold was found with.
        """
        if self.threshold is None:
            raise ValueError(f"no threshold met the target, nothing to save: {self.message}")
        path = path if path is not None else self.coefficients_file
        if path is None:
            raise ValueError("give the coefficients file to write into (the coefficients did not come from one)")
        model_name = model_name if model_name is not None else self.model_name
        seq_len = seq_len if seq_len is not None else (self.entry_seq_len or self.seq_len)
        entry = load_coefficients_file(path, model_name, seq_len)
        used = self.coefficients
        same = (
            not isinstance(used, str)
            and used is not None
            and len(used) == len(entry["coefficients"])
            and np.allclose(entry["coefficients"], used, rtol=1e-12, atol=0)
        )
        if not same:
            raise ValueError(
                f"the threshold was found with coefficients {used!r}, not with those of {entry['model_name']!r} "
                f"(seq_len {entry['seq_len']}) in {path}: {entry['coefficients']}"
            )
        chosen = self.chosen
        criterion = {
            self.criterion: self.target,
            "num_samples": self.num_samples,
            "num_inference_steps": self.num_inference_steps,
        }
        measured = {
            "calls_speedup": _json(chosen.calls_speedup),
            "wall_speedup": _json(chosen.wall_speedup),
            "min_psnr": _json(chosen.min_psnr),
            "mean_psnr": _json(chosen.mean_psnr),
            **{k: _json(v) for k, v in chosen.metrics.items()},
        }
        return update_entry(
            path,
            entry["model_name"],
            entry["seq_len"],
            recommended_thresh=self.threshold,
            recommended_criterion=criterion,
            recommended_measured=measured,
        )


def _json(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _db(v: float) -> str:
    return "inf" if math.isinf(v) and v > 0 else f"{v:.2f}"


def _passes(criterion: str, target: float, p: ThresholdPoint) -> bool:
    v = p.min_psnr if criterion == "min_psnr" else p.calls_speedup
    return bool(v >= target)  # NaN fails


def as_tensor(output: Any) -> torch.Tensor:
    """A generation's output (tensor, array, pipeline output, list of images) as a float64 CPU tensor."""
    if hasattr(output, "images"):  # a diffusers pipeline output
        output = output.images
    if isinstance(output, torch.Tensor):
        return output.detach().to("cpu", torch.float64)
    if isinstance(output, (list, tuple)):
        return torch.stack([as_tensor(o) for o in output])
    try:
        return torch.as_tensor(np.asarray(output), dtype=torch.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"run(sample) must return a tensor, an array or a list of images, got {type(output).__name__}"
        ) from e


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB with the reference's own value range (max - min) as the peak; inf where identical."""
    if output.shape != reference.shape:
        raise ValueError(f"run(sample) returned shape {tuple(output.shape)} cached, {tuple(reference.shape)} uncached")
    mse = float((output - reference).pow(2).mean())
    if mse == 0.0:
        return math.inf
    peak = float(reference.max() - reference.min()) or 1.0
    return 10.0 * math.log10(peak * peak / mse) if math.isfinite(mse) else math.nan


def _check_target(name: str, value, least: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < least:
        raise ValueError(f"{name} must be a finite number >= {least:g}, got {value!r}")
    return float(value)


def find_threshold(
    transformer: Any,
    run: Callable[[Any], Any],
    samples: Iterable[Any],
    *,
    min_psnr: float | None = None,
    min_speedup: float | None = None,
    thresholds: Sequence[float] | None = None,
    coefficients: str | Sequence[float] | None = None,
    coefficients_file: str | os.PathLike | None = None,
    model_name: str | None = None,
    num_inference_steps: int | None = None,
    refine: int | None = None,
    metrics: Mapping[str, Callable[[Any, Any, Any], float]] | None = None,
    progress: bool = True,
    **teacache_fields,
) -> ThresholdResult:
    """The rel_l1_thresh meeting exactly one of `min_psnr` (dB, worst sample vs its uncached output) or
    `min_speedup` (x, transformer calls / computed calls).

    min_psnr picks the LARGEST threshold whose worst-sample PSNR meets the floor (quality is not strictly
    monotonic in the threshold); min_speedup the SMALLEST whose calls speedup meets it.
    thresholds: the candidates; default a geometric grid of 12 from 0.02 to 2.0, then `refine` (default 3;
        0 when thresholds are given) bisection steps between the chosen grid point and its failing neighbour.
    coefficients: a published set name or floats; coefficients_file: a calibration JSON (the entry of
        `model_name`, at the fitted length nearest the samples' sequence length). Neither: the family default.
    num_inference_steps: transformer calls per generation and context; default: counted in the uncached runs.
    metrics: name -> f(sample, output, uncached_output) -> float, averaged over samples per threshold.
    teacache_fields: other TeaCacheConfig fields (warmup_steps, cooldown_steps).
    The transformer is left uncached (TeaCache disabled) at the end, also on errors.
    """
    import teacache_kernels as tk

    t = uncached_transformer(transformer, "find_threshold")
    if (min_psnr is None) == (min_speedup is None):
        raise ValueError("give exactly one of min_psnr (dB) and min_speedup (x)")
    if min_psnr is not None:
        criterion, target = "min_psnr", _check_target("min_psnr", min_psnr, 0.0)
    else:
        criterion, target = "min_speedup", _check_target("min_speedup", min_speedup, 1.0)
    if coefficients is not None and coefficients_file is not None:
        raise ValueError("give coefficients or coefficients_file, not both")
    if thresholds is None:
        grid, refine = list(DEFAULT_GRID), DEFAULT_REFINE if refine is None else refine
    else:
        grid = sorted({_check_target("threshold", v, 0.0) for v in thresholds})
        if not grid:
            raise ValueError("thresholds is empty")
        refine = 0 if refine is None else refine
    if isinstance(refine, bool) or not isinstance(refine, numbers.Integral) or refine < 0:
        raise ValueError(f"refine must be an integer >= 0, got {refine!r}")
    samples = list(samples)
    if not samples:
        raise ValueError("find_threshold needs at least one sample")
    metrics = dict(metrics or {})

    bar = Progress(2 + len(grid) + refine, "find_threshold", progress, unit="setting")
    try:
        # 1. Uncached references: outputs, wall time, calls per context, sequence length.
        refs, ref_wall, counts, seq_lens = _references(t, run, samples)
        bar.step(thresh="uncached", wall_s=f"{sum(ref_wall):.2f}")
        steps = num_inference_steps
        if steps is None:
            per_context = set(counts)
            if len(per_context) != 1:
                raise ValueError(
                    f"the generations made {sorted(per_context)} calls per context: give num_inference_steps"
                )
            steps = per_context.pop()
        if len(seq_lens) != 1:
            raise ValueError(f"the samples ran at several sequence lengths {sorted(seq_lens)}: one at a time")
        seq_len = seq_lens.pop()
        entry_seq_len, name = None, model_name or type(t).__name__
        source = {"coefficients": coefficients}  # what enable_teacache is given
        if coefficients_file is not None:
            entry = load_coefficients_file(coefficients_file, model_name, seq_len)
            coefficients, name, entry_seq_len = tuple(entry["coefficients"]), entry["model_name"], entry["seq_len"]
            source = _runtime_source(coefficients_file, entry)
        elif coefficients is not None and not isinstance(coefficients, str):
            coefficients = tuple(float(c) for c in coefficients)
            source = {"coefficients": coefficients}
        reference_metrics = {
            k: float(np.mean([f(s, o, o) for s, o in zip(samples, refs["raw"])])) for k, f in metrics.items()
        }

        points: dict[float, ThresholdPoint] = {}

        def evaluate(thresh: float) -> ThresholdPoint:
            if thresh not in points:
                points[thresh] = _evaluate(
                    tk, t, run, samples, refs, ref_wall, thresh, source, steps, metrics, teacache_fields
                )
                p = points[thresh]
                bar.step(thresh=f"{thresh:.3g}", calls_x=f"{p.calls_speedup:.2f}", min_psnr=_db(p.min_psnr))
            return points[thresh]

        for thresh in grid:
            evaluate(thresh)
        chosen = _choose(criterion, target, points.values())
        # 2. Bisection between the chosen point and its failing neighbour (geometric midpoints).
        for _ in range(refine):
            if chosen is None:
                break
            if criterion == "min_psnr":
                above = [v for v in points if v > chosen]
                if not above:
                    break
                lo, hi = chosen, min(above)
            else:
                below = [v for v in points if v < chosen]
                lo, hi = (max(below) if below else 0.0), chosen
            mid = math.sqrt(lo * hi) if lo > 0 else (lo + hi) / 2
            if mid in points or not lo < mid < hi:
                break
            evaluate(mid)
            chosen = _choose(criterion, target, points.values())
        # 3. Time the uncached runs again, now that everything is warm: each sample's faster run counts.
        tk.disable_teacache(t)
        ref_wall = [min(a, b) for a, b in zip(ref_wall, _wall_times(t, run, samples))]
        bar.step(thresh="uncached again", wall_s=f"{sum(ref_wall):.2f}")
    finally:
        bar.close()
        tk.disable_teacache(t)
    points = {k: dataclasses.replace(p, reference_wall_s=float(sum(ref_wall))) for k, p in points.items()}

    result = ThresholdResult(
        criterion=criterion,
        target=target,
        threshold=chosen,
        points=sorted(points.values(), key=lambda p: p.threshold),
        model_name=name,
        seq_len=seq_len,
        num_inference_steps=steps,
        num_samples=len(samples),
        coefficients=coefficients,
        coefficients_file=str(coefficients_file) if coefficients_file is not None else None,
        entry_seq_len=entry_seq_len,
        reference_metrics=reference_metrics,
    )
    result.message = _message(result)
    return result


def _references(t, run, samples):
    counts: dict[tuple[int, str], int] = {}
    seq_lens: set[int] = set()
    tracker = ContextTracker(t)
    current = [0]

    def count(module, args, kwargs):
        key = (current[0], tracker.current)
        counts[key] = counts.get(key, 0) + 1

    outputs, raw, wall = [], [], []
    with tracker, torch.no_grad():
        handles = [t.register_forward_pre_hook(count, with_kwargs=True), track_sequence_lengths(t, seq_lens)]
        try:
            current[0] = -1
            run(samples[0])  # warm-up, untimed: first calls allocate and initialise
            for i, sample in enumerate(samples):
                current[0] = i
                start = time.perf_counter()
                out = run(sample)
                wall.append(time.perf_counter() - start)
                raw.append(out)
                outputs.append(as_tensor(out))
        finally:
            for handle in handles:
                handle.remove()
    per_sample = [n for (i, _), n in counts.items() if i >= 0]
    if not per_sample:
        raise RuntimeError("run(sample) never called the transformer given to find_threshold")
    return {"tensors": outputs, "raw": raw}, wall, per_sample, seq_lens


def _wall_times(t, run, samples) -> list[float]:
    wall = []
    with torch.no_grad():
        for sample in samples:
            start = time.perf_counter()
            run(sample)
            wall.append(time.perf_counter() - start)
    return wall


def _runtime_source(path, entry: dict) -> dict:
    """How enable_teacache runs a file's entry: the file itself when the runtime reads coefficient files
    (then the entry's signal is used), else its coefficients, which the runtime applies to modulated_input."""
    from ..config import TeaCacheConfig

    if "coefficients_file" in {f.name for f in dataclasses.fields(TeaCacheConfig)}:
        return {"coefficients_file": os.fspath(path), "calibrated_model": entry["model_name"]}
    if entry["signal"] != "modulated_input":
        raise ValueError(
            f"{path}: {entry['model_name']!r} was fitted on signal {entry['signal']!r}, which this version of "
            "enable_teacache cannot compute (it compares modulated_input)"
        )
    return {"coefficients": tuple(entry["coefficients"])}


def _evaluate(tk, t, run, samples, refs, ref_wall, thresh, source, steps, metrics, fields) -> ThresholdPoint:
    tk.enable_teacache(t, rel_l1_thresh=thresh, num_inference_steps=steps, **source, **fields)
    computed = total = 0
    wall, psnrs, values = 0.0, [], {k: [] for k in metrics}
    with torch.no_grad():
        for sample, ref, ref_raw in zip(samples, refs["tensors"], refs["raw"]):
            tk.reset_teacache(t)
            before = tk.summary(t)
            start = time.perf_counter()
            out = run(sample)
            wall += time.perf_counter() - start
            after = tk.summary(t)
            calls, reused = after.calls - before.calls, after.reused - before.reused
            if calls <= 0:
                raise RuntimeError("run(sample) never called the transformer given to find_threshold")
            total += calls
            computed += calls - reused
            psnrs.append(psnr(as_tensor(out), ref))
            for k, f in metrics.items():
                values[k].append(float(f(sample, out, ref_raw)))
    arr = np.asarray(psnrs, dtype=np.float64)
    return ThresholdPoint(
        threshold=thresh,
        computed=computed,
        total=total,
        wall_s=wall,
        reference_wall_s=float(sum(ref_wall)),
        mean_psnr=float(np.mean(arr)) if not np.isnan(arr).any() else math.nan,
        min_psnr=float(np.min(arr)) if not np.isnan(arr).any() else math.nan,
        metrics={k: float(np.mean(v)) for k, v in values.items()},
    )


def _choose(criterion: str, target: float, points) -> float | None:
    passing = [p.threshold for p in points if _passes(criterion, target, p)]
    if not passing:
        return None
    return max(passing) if criterion == "min_psnr" else min(passing)


def _message(r: ThresholdResult) -> str:
    if r.threshold is None:
        if r.criterion == "min_psnr":
            return (
                f"No threshold tried keeps the worst-sample PSNR >= {r.target:g} dB (smallest tried: "
                f"{r.points[0].threshold:.3g}, {_db(r.points[0].min_psnr)} dB): try smaller thresholds."
            )
        best = max(r.points, key=lambda p: p.calls_speedup)
        return (
            f"No threshold tried reaches a {r.target:g}x calls speedup (largest tried: {r.points[-1].threshold:.3g}, "
            f"best seen {best.calls_speedup:.2f}x): try larger thresholds."
        )
    p = r.chosen
    why = (
        f"the largest threshold whose worst sample stays >= {r.target:g} dB"
        if r.criterion == "min_psnr"
        else f"the smallest threshold reaching {r.target:g}x fewer block computations"
    )
    text = (
        f"Chosen rel_l1_thresh = {r.threshold:.4g}: {why}; {p.computed}/{p.total} calls computed "
        f"({p.calls_speedup:.2f}x in calls, {p.wall_speedup:.2f}x measured wall clock), worst-sample PSNR "
        f"{_db(p.min_psnr)} dB, mean {_db(p.mean_psnr)} dB."
    )
    if r.criterion == "min_psnr" and r.threshold == r.points[-1].threshold:
        text += " It is the largest threshold tried: larger ones may pass too."
    return text
