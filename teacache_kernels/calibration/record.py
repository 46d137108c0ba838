"""Recording what calibration fits: per transformer call and CFG context, the signals' and target's distances.

Forward hooks only (no diffusers forward is copied). For consecutive calls i-1, i of one generation
(one `run(sample)`) in one CFG context, each candidate signal s gives x = rel_l1(s_i, s_{i-1}) and the
target gives y = rel_l1(t_i, t_{i-1}), with `reference.rel_l1` (mean|a - b| / mean|b|, float64): the
same distance TeaCache computes at run time. Only these numbers are kept, never whole tensors (beyond
the previous call's, needed for the next distance).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.base import parameter_names
from ..reference import rel_l1
from ..state import sequence_length
from .probes import Probe, first_tensor, probes_for, resolve_signal

DEFAULT_CONTEXT = "default"  # calls made outside any cache_context
_MISSING = object()


class ContextTracker:
    """Knows which `cache_context(name)` the transformer is called in, by wrapping the instance's method.

    The wrapper is an instance attribute shadowing the class's `cache_context` (diffusers' CacheMixin);
    leaving the `with` block restores exactly what was there, also when the body raised.
    """

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer
        self.stack: list[str] = []
        self._shadowed: Any = _MISSING

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else DEFAULT_CONTEXT

    def __enter__(self) -> ContextTracker:
        t = self.transformer
        self._shadowed = vars(t).get("cache_context", _MISSING)
        original = getattr(t, "cache_context", None)

        @contextlib.contextmanager
        def cache_context(name: str, *args, **kwargs):
            with original(name, *args, **kwargs) if original is not None else contextlib.nullcontext():
                self.stack.append(str(name))
                try:
                    yield
                finally:
                    self.stack.pop()

        t.cache_context = cache_context
        return self

    def __exit__(self, *exc) -> None:
        t = self.transformer
        if "cache_context" in vars(t):
            del t.cache_context
        if self._shadowed is not _MISSING:
            t.cache_context = self._shadowed
        self.stack.clear()


@dataclass
class Recording:
    """Distances of consecutive calls: one row per pair (sample, context, step i vs i-1)."""

    signals: tuple[str, ...]
    target: str
    x: dict[str, list[float]] = field(default_factory=dict)  # signal -> x per pair
    y: list[float] = field(default_factory=list)  # target distance per pair
    step: list[int] = field(default_factory=list)  # i: the later call's index in its generation/context
    sample: list[int] = field(default_factory=list)
    context: list[str] = field(default_factory=list)
    calls: dict[tuple[int, str], int] = field(default_factory=dict)  # (sample, context) -> calls (steps)
    seq_lens: set[int] = field(default_factory=set)  # tokens of the span's input stream (`state.sequence_length`)

    def __post_init__(self) -> None:
        for s in self.signals:
            self.x.setdefault(s, [])

    @property
    def num_pairs(self) -> int:
        return len(self.y)

    def arrays(self, signal: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, step) as float64/int arrays for `signal`, pairs with a non-finite x or y left out."""
        x = np.asarray(self.x[signal], dtype=np.float64)
        y = np.asarray(self.y, dtype=np.float64)
        step = np.asarray(self.step, dtype=np.int64)
        keep = np.isfinite(x) & np.isfinite(y)
        return x[keep], y[keep], step[keep]

    @property
    def seq_len(self) -> int:
        if len(self.seq_lens) != 1:
            raise ValueError(f"expected one sequence length across the recording, got {sorted(self.seq_lens)}")
        return next(iter(self.seq_lens))

    @property
    def steps(self) -> int:
        """Calls per generation and context (the most common count, when they differ)."""
        counts = list(self.calls.values())
        return max(set(counts), key=counts.count) if counts else 0


def _tensor_at(probe: Probe, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    if probe.where == "output":
        return first_tensor(output, probe.index)
    if probe.fn is not None:
        call = dict(zip(parameter_names(module), args))
        call.update(kwargs)
        return first_tensor(probe.fn(module, call))
    if args:
        return first_tensor(args[0] if probe.index is None else args[probe.index])
    return first_tensor(tuple(v for v in kwargs.values() if isinstance(v, torch.Tensor)))


def _call_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    h = kwargs.get("hidden_states", args[0] if args else None)
    return h if isinstance(h, torch.Tensor) else None


def _hook(transformer: nn.Module, probe: Probe, fn):
    """Register `fn(module, args, kwargs, output=None)` where `probe` reads; returns the handle."""
    sub = transformer.get_submodule(probe.module)
    if probe.where == "output":
        return sub.register_forward_hook(fn, with_kwargs=True)
    return sub.register_forward_pre_hook(fn, with_kwargs=True)


def track_sequence_lengths(transformer: nn.Module, seq_lens: set[int]):
    """Add to `seq_lens` the length of every call, as the runtime keys calibrated sets: the tokens of the span's
    input stream (`state.sequence_length`); for a class with no known family, the call's hidden_states.shape[1].
    Returns the hook's handle."""
    family = probes_for(transformer)
    if family is None:

        def from_call(module, args, kwargs):
            h = _call_input(args, kwargs)
            if h is not None and h.dim() >= 2:
                seq_lens.add(int(h.shape[1]))

        return transformer.register_forward_pre_hook(from_call, with_kwargs=True)

    def from_span(module, args, kwargs, output=None):
        seq_lens.add(sequence_length(_tensor_at(family.span_input, module, args, kwargs, output)))

    return _hook(transformer, family.span_input, from_span)


class Recorder:
    """Hooks on a transformer that fill a `Recording`; a context manager (hooks and cache_context restored on exit)."""

    def __init__(self, transformer: nn.Module, signals: Sequence[str], target: str = "output"):
        if target not in ("output", "residual"):
            raise ValueError(f"target must be 'output' or 'residual', got {target!r}")
        if isinstance(signals, str):
            signals = (signals,)
        if not signals:
            raise ValueError("at least one signal is needed")
        if len(set(signals)) != len(signals):
            raise ValueError(f"signals must be distinct, got {list(signals)}")
        self.transformer = transformer
        self.probes = {name: resolve_signal(transformer, name) for name in signals}
        family = probes_for(transformer)
        if target == "residual" and family is None:
            raise ValueError(
                f"target 'residual' needs the span of the model family; {type(transformer).__name__} has none "
                "(register its ModelFamily: docs/adding_a_model.md), or use target='output'"
            )
        self.taps = dict(self.probes)  # what each call reads
        if target == "residual":
            self.taps["span_input"], self.taps["span_output"] = family.span_input, family.span_output
        self.recording = Recording(tuple(signals), target)
        self.tracker = ContextTracker(transformer)
        self.sample = 0
        self._handles: list = []
        self._call: dict[str, torch.Tensor] | None = None  # tensors seen in the current transformer call
        self._prev: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    # --- hooks -------------------------------------------------------------------------------------------
    def _on_call_start(self, module, args, kwargs):
        self._call = {}

    def _capture(self, key: str, probe: Probe):
        def hook(module, args, kwargs, output=None):
            if self._call is not None and key not in self._call:  # the first call of the module per forward
                self._call[key] = _tensor_at(probe, module, args, kwargs, output).detach()

        return hook

    def _on_call_end(self, module, args, kwargs, output):
        call, self._call = self._call, None
        if call is None:
            return
        missing = [s for s in self.taps if s not in call]
        if missing:
            raise RuntimeError(
                f"signal(s) {missing} were not computed during a {type(module).__name__} call "
                f"(modules {[self.taps[s].module for s in missing]} never ran)"
            )
        if "span_output" in call:
            target = call.pop("span_output").double() - call.pop("span_input").double()
        else:
            target = first_tensor(output).detach()
        rec = self.recording
        key = (self.sample, self.tracker.current)
        step = rec.calls.get(key, 0)
        rec.calls[key] = step + 1
        current = {s: call[s].clone() for s in self.probes}
        current["__target__"] = target.clone()
        prev = self._prev.get(key)
        if prev is not None:
            for s in self.probes:
                rec.x[s].append(rel_l1(current[s], prev[s]) if current[s].shape == prev[s].shape else math.nan)
            same = current["__target__"].shape == prev["__target__"].shape
            rec.y.append(rel_l1(current["__target__"], prev["__target__"]) if same else math.nan)
            rec.step.append(step)
            rec.sample.append(self.sample)
            rec.context.append(key[1])
        self._prev[key] = current

    # --- lifetime ----------------------------------------------------------------------------------------
    def new_sample(self, index: int) -> None:
        """Start a new generation: the next call of each context has no predecessor."""
        self.sample = index
        self._prev.clear()

    def __enter__(self) -> Recorder:
        t = self.transformer
        try:
            self.tracker.__enter__()
            self._handles.append(t.register_forward_pre_hook(self._on_call_start, with_kwargs=True))
            self._handles.append(track_sequence_lengths(t, self.recording.seq_lens))
            for key, probe in self.taps.items():
                self._handles.append(_hook(t, probe, self._capture(key, probe)))
            self._handles.append(t.register_forward_hook(self._on_call_end, with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._prev.clear()
        self._call = None
        self.tracker.__exit__(*exc)


def count_calls(recording: Recording) -> dict[str, int]:
    """Calls per context summed over samples."""
    out: dict[str, int] = defaultdict(int)
    for (_, ctx), n in recording.calls.items():
        out[ctx] += n
    return dict(out)


def uncached_transformer(obj: Any, purpose: str = "calibration") -> nn.Module:
    """The transformer of `obj` (a transformer, a compiled one, or a pipeline), refusing a cached one."""
    if not isinstance(obj, nn.Module) and isinstance(getattr(obj, "transformer", None), nn.Module):
        obj = obj.transformer
    if not isinstance(obj, nn.Module):
        raise TypeError(f"expected a transformer module (or a pipeline with .transformer), got {type(obj).__name__}")
    t = getattr(obj, "_orig_mod", obj)
    if getattr(t, "_teacache", None) is not None:
        raise RuntimeError(
            f"TeaCache is enabled on this {type(t).__name__}: {purpose} needs the uncached model; "
            "call teacache_kernels.disable_teacache() first"
        )
    if getattr(t, "is_cache_enabled", False):
        raise RuntimeError(
            f"a diffusers cache is enabled on this {type(t).__name__}: {purpose} needs the uncached model; "
            "call transformer.disable_cache() first"
        )
    return t
