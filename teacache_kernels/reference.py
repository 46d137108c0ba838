"""The eager oracle: TeaCache's state machine in plain Python, float64 scalars, readable first.

This file is the specification. The fused Triton kernel, the torch path Inductor compiles on CPU and
every model integration are tested against it: same skip schedule, outputs within a stated budget.
Host reads (`.item()`) are fine here; speed is not the point.

Per forward call of the transformer, with one state per CFG context:
  1. signal m: the model's modulated input (which tensor depends on the model).
  2. A call computes (and resets the accumulator to 0) when it is forced: no previous signal in this
     generation, one of the first `warmup_steps` or last `cooldown_steps` calls of the generation, a
     distance that is not a finite number (NaN/Inf in the signal, or an all-zero previous signal), or
     rel_l1_thresh == 0 (the off switch).
  3. Otherwise x = mean|m - m_prev| / (mean|m_prev| + eps) over all elements (batch included),
     acc += poly(x), and the call reuses the cached residual iff acc is finite and acc < rel_l1_thresh;
     else it computes and acc = 0. eps is 0 and poly(x) is added as it is, as in the authors' scripts,
     except where the coefficient set's implementation does otherwise (qwen-image, from vLLM-Omni:
     eps = 1e-8 and |poly(x)| is added; `abs_rescaled` chooses the latter for any set).
     Options beyond the original, each off by default: x is clamped to `x_range` before the polynomial
     (the log keeps the raw x); a call is forced to compute after `max_consecutive_skips` reuses in a
     row, and outside the steps [min_skip_step, max_skip_step]. Forced calls reset acc as in step 2.
  4. m_prev = m on every call, computed or reused.
  5. Compute: run the block span, residual = span_out - span_in. Reuse: span_out = span_in + residual.
  6. After `num_inference_steps` calls the generation ends: the step counter wraps to 0 and the
     previous signal and accumulator are forgotten, so the next call starts a new generation.

Where this differs from the original TeaCache scripts, and why it cannot change a schedule:
  - x is computed from the exact element values (float64 here, float32 accumulation in the kernel)
    rather than from a mean rounded to the signal's dtype (bf16 in the original).
  - Step 6 forgets the previous signal at a wrap; the original keeps it, but its first call of a
    generation is forced anyway (warmup >= 1), so both compute there. With warmup_steps=0 the original
    would compare against the previous generation's last signal; this package does not.
  - rel_l1_thresh == 0 never reuses. The original compares acc < 0, which a polynomial that goes
    negative (flux-kontext for x > 0.24, mochi, wan ret...) can satisfy. A non-finite acc (a polynomial
    overflowing to -inf) computes instead of poisoning the rest of the generation.
  - The fused kernel sums fp32 element differences: signals with |values| near the float32 limit
    (~1e34 and up, never seen in activations) overflow there and compute, where float64 here would not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .coefficients import polyval
from .config import ResolvedConfig
from .state import layout_key, layout_name, sequence_length


@dataclass(frozen=True)
class StepRecord:
    """One transformer call as the state machine saw it."""

    step: int  # index of the call within its generation
    x: float  # relative L1 distance to the previous signal; NaN when there was none
    y: float  # poly(x); NaN when x is NaN
    acc: float  # accumulator after this call
    reused: bool  # True: the cached residual was applied; False: the blocks ran


def rel_l1(signal: torch.Tensor, prev: torch.Tensor, eps: float = 0.0, group: Any = None) -> float:
    """mean|signal - prev| / (mean|prev| + eps) over all elements, in float64.

    Computed as sum|signal - prev| / (sum|prev| + eps * numel): the same value, with the counts cancelled.
    `group`: the process group over which the signal is split (context parallelism): the sums (and the
    element count) are those of the whole signal, every rank's slice.
    """
    sums = torch.stack([(signal.double() - prev.double()).abs().sum(), prev.double().abs().sum()]).cpu()
    sums = torch.cat([sums, torch.tensor([float(signal.numel())], dtype=torch.float64)])
    if group is not None:
        import torch.distributed as dist

        everyone = [torch.empty_like(sums) for _ in range(dist.get_world_size(group))]
        dist.all_gather(everyone, sums.to(signal.device), group=group)
        sums = sum(t.cpu() for t in everyone)  # in rank order: the same value on every rank
    num, base, numel = sums.tolist()
    den = base + eps * numel
    if not (math.isfinite(num) and math.isfinite(den) and den > 0.0):
        return math.nan
    return num / den


@dataclass
class TeaCacheOracle:
    """One CFG context's TeaCache decisions, step by step."""

    config: ResolvedConfig
    step: int = 0
    acc: float = 0.0
    prev: torch.Tensor | None = None
    history: list[StepRecord] = field(default_factory=list)  # the current (or last finished) generation
    consecutive: int = 0  # reuses in a row so far
    calls: int = 0
    reused: int = 0

    def reset(self) -> None:
        """Start a new generation: forget the previous signal, the accumulator, the step counter and history."""
        self.step, self.acc, self.prev, self.history, self.consecutive = 0, 0.0, None, [], 0

    def decide(self, signal: torch.Tensor, group: Any = None) -> bool:
        """Feed one call's signal; True means reuse the cached residual, False means run the blocks.
        `group`: the ranks that split the signal (context parallelism), whose slices make up the whole."""
        cfg = self.config
        n = cfg.num_inference_steps
        if self.step == 0:  # a new generation's first call: the finished generation's history goes
            self.history = []
        x = rel_l1(signal, self.prev, cfg.denominator_eps, group) if self.prev is not None else math.nan
        x_poly = x if cfg.x_range is None or not math.isfinite(x) else min(max(x, cfg.x_range[0]), cfg.x_range[1])
        y = polyval(cfg.coefficients, x_poly) if math.isfinite(x) else math.nan
        if cfg.abs_rescaled:  # vLLM-Omni's rule (qwen-image): a negative poly(x) still adds
            y = abs(y)
        forced = (
            self.prev is None
            or self.step < cfg.forced_first()
            or (n is not None and self.step >= n - cfg.cooldown_steps)
            or cfg.rel_l1_thresh == 0.0
            or (cfg.max_consecutive_skips is not None and self.consecutive >= cfg.max_consecutive_skips)
            or (cfg.min_skip_step is not None and self.step < cfg.min_skip_step)
            or (cfg.max_skip_step is not None and self.step > cfg.max_skip_step)
        )
        candidate = self.acc + y
        reuse = not forced and math.isfinite(candidate) and candidate < cfg.rel_l1_thresh
        self.acc = candidate if reuse else 0.0
        self.consecutive = self.consecutive + 1 if reuse else 0
        self.history.append(StepRecord(self.step, x, y, self.acc, reuse))
        self.prev = signal.detach().clone()
        self.calls += 1
        self.reused += int(reuse)
        self.step += 1
        if n is not None and self.step >= n:  # generation over: forget m_prev and acc, keep its history
            self.step, self.acc, self.prev, self.consecutive = 0, 0.0, None, 0
        return reuse


class ReferenceCache:
    """The oracle driving a block span, eagerly: the readable TeaCache the fused path must match.

    Same interface as `cached_forward.FusedCache`; `enable_teacache(..., reference=True)` installs it.
    """

    def __init__(self, config: ResolvedConfig):
        self.config = config
        self.signal = config.signal
        self.contexts: dict[str, TeaCacheOracle] = {"default": TeaCacheOracle(config)}
        self.residuals: dict[str, tuple[torch.Tensor, ...]] = {}  # per context, one per cached stream
        self._layouts: dict[str, tuple] = {}
        self._first_layout: dict[str, tuple] = {}  # context (and state key) -> the shapes of its first call
        self.active = "default"
        self.group = None  # the process group that splits the signal (context parallelism), or None

    def activate(self, name: str) -> str:
        previous = self.active
        if name not in self.contexts:
            self.contexts[name] = TeaCacheOracle(self.config)
            # As FusedCache.activate: a new context starts with the layout the contexts before it have.
            known = [shapes for context, shapes in self._first_layout.items() if "/" not in context]
            if known:
                self._first_layout[name] = known[-1]
        self.active = name
        return previous

    def set_config(self, config: ResolvedConfig) -> None:
        self.config = config
        self.signal = config.signal
        for name, oracle in self.contexts.items():
            layout = self._layouts.get(name)
            oracle.config = config if layout is None else config.for_sequence(layout[-1])

    def reset(self) -> None:
        for oracle in self.contexts.values():
            oracle.reset()

    def at_step(self, step: int) -> None:
        """The active context's next call is call `step` of its generation (0: a new generation starts)."""
        for name, oracle in self.contexts.items():
            if name != self.active and not name.startswith((f"{self.active}/", f"{self.active}@")):
                continue
            n = oracle.config.num_inference_steps
            if step < 0 or (n and step >= n):
                continue
            if step == 0:
                oracle.reset()
            oracle.step = step

    def run(
        self,
        signal: torch.Tensor,
        streams: Sequence[torch.Tensor],
        full: Callable[..., tuple[torch.Tensor, ...]],
        state_key: str | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The span's outputs for `streams` (its inputs): each `stream + residual` if reused, else `full(*streams)`.

        `state_key`: the state is kept per (CFG context, key), as FusedCache does (Lumina2 keys by sequence length).
        """
        streams = tuple(streams)
        name = self.active if state_key is None else (state_key if self.active == "default" else f"{self.active}/{state_key}")
        # One oracle per layout (shapes) of the context, as FusedCache keeps a state per layout: the first layout
        # under the context's own name, each other one under "<name>@<shapes>".
        shapes = layout_key((tuple(signal.shape), None, tuple(tuple(s.shape) for s in streams), None, None))
        first = self._first_layout.setdefault(name, shapes)
        if shapes != first and not self.contexts[name].calls and f"{name}@{layout_name(shapes)}" not in self.contexts:
            first = self._first_layout[name] = shapes  # activate()'s guess of the layout, never called: take it over
        if shapes != first:
            name = f"{name}@{layout_name(shapes)}"
        if name not in self.contexts:
            self.contexts[name] = TeaCacheOracle(self.config)
        layout = (signal.shape, signal.dtype, [(s.shape, s.dtype) for s in streams], sequence_length(streams[0]))
        if self._layouts.get(name) != layout:  # first call of the layout, or a new dtype: start over, as FusedCache
            if name in self._layouts:
                self.contexts[name] = TeaCacheOracle(self.config)
            self.contexts[name].config = self.config.for_sequence(layout[-1])
        self._layouts[name] = layout
        if self.contexts[name].decide(signal, self.group):
            return tuple(s + r for s, r in zip(streams, self.residuals[name]))
        outs = tuple(full(*streams))
        self.residuals[name] = tuple((out - s).detach() for out, s in zip(outs, streams))
        return outs

    def history(self) -> dict[str, tuple[list[StepRecord], int, int, int]]:
        def nbytes(name):  # what the oracle holds between calls: the previous signal and the residuals
            held = [self.contexts[name].prev, *self.residuals.get(name, ())]
            return sum(t.numel() * t.element_size() for t in held if t is not None)

        return {n: (list(o.history), o.calls, o.reused, nbytes(n)) for n, o in self.contexts.items() if o.calls}
