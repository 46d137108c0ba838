"""CalibrationResult: the ranked candidate fits, saved as a coefficients-file entry, plotted, reported."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .coefficients_file import merge_entry, read_coefficients_file
from .fit import PolynomialFit
from .record import Recording


@dataclass
class CalibrationResult:
    model_name: str
    seq_len: int  # image tokens (hidden_states.shape[1])
    target: str  # "output" or "residual"
    degree: int
    num_inference_steps: int  # transformer calls per generation and CFG context
    num_samples: int
    contexts: tuple[str, ...]
    candidates: list[PolynomialFit]  # ranked: highest R^2 first
    runtime_signals: tuple[str, ...]  # the signals TeaCache can compute at run time
    recording: Recording

    @property
    def best(self) -> PolynomialFit | None:
        """The best-ranked signal the runtime can compute (None if no such signal was a candidate)."""
        return next((c for c in self.candidates if c.signal in self.runtime_signals), None)

    @property
    def best_overall(self) -> PolynomialFit:
        """The best-ranked candidate, user-named modules included."""
        return self.candidates[0]

    def fit(self, signal: str) -> PolynomialFit:
        for c in self.candidates:
            if c.signal == signal:
                return c
        raise KeyError(f"no candidate {signal!r}; candidates: {[c.signal for c in self.candidates]}")

    @property
    def coefficients(self) -> tuple[float, ...]:
        return self._require_best().coefficients

    def _require_best(self) -> PolynomialFit:
        best = self.best
        if best is None:
            raise ValueError(
                f"no candidate is a signal the runtime can compute ({', '.join(self.runtime_signals)}); "
                f"candidates were {[c.signal for c in self.candidates]}"
            )
        return best

    def entry(self, signal: str | None = None) -> dict:
        """This calibration as a coefficients-file entry (see coefficients_file.py): the fit of `signal`
        (a runtime signal; default: the best one)."""
        if signal is None:
            best = self._require_best().as_dict()
        elif signal not in self.runtime_signals:
            raise ValueError(
                f"signal {signal!r} cannot be computed at run time; runtime signals: {self.runtime_signals}"
            )
        else:
            best = self.fit(signal).as_dict()
        return {
            "signal": best["signal"],
            "target": self.target,
            "degree": self.degree,
            "coefficients": best["coefficients"],
            "r2": best["r2"],
            "pearson": best["pearson"],
            "spearman": best["spearman"],
            "x_range": best["x_range"],
            "num_pairs": best["num_pairs"],
            "num_inference_steps": self.num_inference_steps,
            "num_samples": self.num_samples,
            "recommended_thresh": None,
            "candidates": [{k: v for k, v in c.as_dict().items() if k != "num_pairs"} for c in self.candidates],
        }

    def save(self, path: str | os.PathLike, signal: str | None = None) -> dict:
        """Write (merge) this entry into the JSON file at `path`; other models and lengths are kept.

        `signal`: which runtime signal's fit to save (default: the best). The runtime compares one signal
        for all sequence lengths of a model, so a file whose other lengths of this model use another
        signal is refused: pass that signal, or calibrate those lengths again.
        """
        entry = self.entry(signal)
        data = read_coefficients_file(path, missing_ok=True)
        others = {
            k: e.get("signal") for k, e in data["models"].get(self.model_name, {}).items() if k != str(self.seq_len)
        }
        clash = {k: v for k, v in others.items() if v != entry["signal"]}
        if clash:
            raise ValueError(
                f"{path}: {self.model_name!r} is fitted on {clash} at other sequence lengths, and TeaCache compares one "
                f"signal for all of them; this fit's best is {entry['signal']!r}: save(path, signal=...) with theirs "
                "(its R^2 is in the report), or recalibrate those lengths"
            )
        return merge_entry(path, self.model_name, self.seq_len, entry)

    def plot(self, path: str | os.PathLike) -> None:
        from .plot import plot_calibration

        plot_calibration(self, path)

    def report(self) -> str:
        head = (
            f"Calibration of {self.model_name}: {self.seq_len} image tokens, {self.num_samples} samples x "
            f"{self.num_inference_steps} steps, contexts {', '.join(self.contexts)}; target {self.target!r} "
            f"(rel. L1 between consecutive calls), degree-{self.degree} fits\n"
            "Candidates ranked by R^2 of the fit (how much of the target's step-to-step change the polynomial "
            "of the signal's change explains):"
        )
        width = max(6, *(len(c.signal) for c in self.candidates))
        header = (
            f"  {'rank':>4}  {'signal':<{width}}  {'R^2':>7}  {'Pearson':>7}  {'Spearman':>8}  {'x range':>21}  "
            f"{'pairs':>5}  runtime"
        )
        rows = [header]
        for i, c in enumerate(self.candidates, 1):
            xr = f"[{c.x_range[0]:.4g}, {c.x_range[1]:.4g}]"
            rows.append(
                f"  {i:>4}  {c.signal:<{width}}  {_fmt(c.r2):>7}  {_fmt(c.pearson):>7}  {_fmt(c.spearman):>8}  "
                f"{xr:>21}  {c.num_pairs:>5}  {'yes' if c.signal in self.runtime_signals else 'no'}"
            )
        return "\n".join([head, *rows, self._verdict()])

    def _verdict(self) -> str:
        best, overall = self.best, self.best_overall
        if best is None:
            return (
                f"Best overall: {overall.signal} (R^2 {_fmt(overall.r2)}), but no candidate is a signal the "
                f"runtime computes ({', '.join(self.runtime_signals)}): nothing to save."
            )
        text = (
            f"Best usable at run time: {best.signal}: its fit explains R^2 = {_fmt(best.r2)} of the target's "
            f"variance (Spearman {_fmt(best.spearman)}), the highest among the runtime signals"
        )
        if overall is not best:
            text += f"; {overall.signal} fits better (R^2 {_fmt(overall.r2)}) but the runtime cannot compute it"
        text += f". Coefficients (highest power first): [{', '.join(f'{c:.6g}' for c in best.coefficients)}]"
        return text + "."

    def __str__(self) -> str:
        return self.report()


def _fmt(v: float) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.4f}"
