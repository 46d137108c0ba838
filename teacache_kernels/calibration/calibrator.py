"""calibrate(): fit TeaCache's rescale polynomial for a transformer from recorded generations."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .fit import check_degree, fit_polynomial, rank_key
from .probes import DEFAULT_SIGNALS, RUNTIME_SIGNALS, TARGETS, probes_for
from .progress import Progress
from .record import Recorder, uncached_transformer
from .result import CalibrationResult


def calibrate(
    transformer: Any,
    run: Callable[[Any], Any],
    samples: Iterable[Any],
    *,
    signals: Sequence[str] | None = None,
    target: str = "output",
    degree: int = 4,
    model_name: str | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Fit y = poly(x) per candidate signal from the generations `run(sample)` makes, ranked by R^2.

    transformer: the uncached transformer `run` calls (a pipeline's `.transformer`, or any model whose class
        is registered: docs/adding_a_model.md); refused if TeaCache or a diffusers cache is enabled on it.
    run(sample): one full generation for one calibration input, calling the transformer at every step
        (in `cache_context("cond"/"uncond")` for CFG, as pipelines do); its return value is not used.
    signals: built-in names of the family ("modulated_input": what TeaCache compares at run time,
        "timestep_embedding", "hidden_states": the span's input; a registered family offers its own signal
        names and "hidden_states") and/or submodule paths (their output; reported, not selectable at run
        time). None: all of the family's built-in signals.
    target: "output" (the transformer's output) or "residual" (block span output minus input).
    For consecutive calls of one generation and CFG context, x = rel_l1 of a signal, y = rel_l1 of the
    target (mean|a - b| / mean|b|, float64, as `reference.rel_l1`).
    """
    t = uncached_transformer(transformer)
    degree = check_degree(degree)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    samples = list(samples)
    if not samples:
        raise ValueError("calibration needs at least one sample")
    family = probes_for(t)
    if signals is None:
        signals = tuple(family.signals) if family is not None else DEFAULT_SIGNALS
    signals = (signals,) if isinstance(signals, str) else tuple(signals)
    runtime = family.runtime_signals if family is not None else RUNTIME_SIGNALS
    if family is None and any(s in DEFAULT_SIGNALS for s in signals):
        raise ValueError(
            f"{type(t).__name__} is not a registered model, so it has no built-in signals: register its "
            "ModelFamily (teacache_kernels.register_model, docs/adding_a_model.md), or name submodules as signals, "
            "e.g. signals=['blocks.0.norm1']"
        )

    recorder = Recorder(t, signals, target)
    with recorder, Progress(len(samples), "calibrate", progress) as bar, torch.no_grad():
        for i, sample in enumerate(samples):
            recorder.new_sample(i)
            start = time.perf_counter()
            run(sample)
            calls = {ctx: n for (s, ctx), n in recorder.recording.calls.items() if s == i}
            if not calls:
                raise RuntimeError(f"run({sample!r}) never called the transformer being calibrated")
            bar.step(calls=sum(calls.values()), s_per_sample=f"{time.perf_counter() - start:.2f}")
    rec = recorder.recording
    if len(rec.seq_lens) != 1:
        raise ValueError(
            f"the samples ran at several sequence lengths {sorted(rec.seq_lens)}: calibrate one resolution at a time"
        )
    fits = sorted(
        (fit_polynomial(s, *rec.arrays(s)[:2], degree=degree) for s in signals),
        key=rank_key,
    )
    contexts = tuple(dict.fromkeys(ctx for _, ctx in rec.calls))
    return CalibrationResult(
        model_name=model_name or type(t).__name__,
        seq_len=rec.seq_len,
        target=target,
        degree=degree,
        num_inference_steps=rec.steps,
        num_samples=len(samples),
        contexts=contexts,
        candidates=fits,
        runtime_signals=tuple(runtime),
        recording=rec,
    )
