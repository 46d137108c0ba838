"""The generic cached forward: signal -> fused decision -> torch.cond(reuse, full) -> fused residual op.

A model family (see `models/`) wraps its transformer's block lists in one span module whose forward
computes the signal and calls `FusedCache.run`. The decision is made on the device: `ops.decide`
produces a 0-d bool tensor, `torch.cond` branches on it without a graph break, and
`ops.apply_residual_` reads the same flag on the device to store or apply the residual. (Inductor lowers
the `torch.cond` itself to a host `if` on the flag: torch 2.13's one remaining read per step, which the
CUDA-graph path is to remove.)

Eagerly (no torch.compile), skipping the blocks needs the decision on the host: one host read per step,
as in every eager TeaCache. Eager `torch.cond` reads the flag on the host just the same, with more
dispatch around it; bench/bench_branch.py measures the two, and eager runs the Python branch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import state as S
from .config import ResolvedConfig
from .ops.apply_residual import apply_residual_
from .ops.decide import decide
from .reference import StepRecord


def _fresh_output(full: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    # torch.cond needs both branches' outputs to agree in storage offset and strides. Blocks may return a
    # view (FLUX's single blocks slice the joint sequence), so the compute branch hands over a fresh
    # contiguous copy: one extra pass over the stream on computed steps only.
    def branch(*operands):
        return full(*operands).clone(memory_format=torch.contiguous_format)

    return branch


class FusedCache:
    """Per-CFG-context TeaCache state on the device, and the cached run of a block span."""

    # How eager (uncompiled) calls branch: "python" (one host read) or "cond" (torch.cond run eagerly, which
    # reads the flag on the host as well). bench/bench_branch.py measures both; "python" was faster.
    eager_branch = "python"

    def __init__(self, config: ResolvedConfig):
        self.config = config
        self.signal = config.signal  # a plain string the span reads: guarded by value, whatever the config object
        self.contexts: dict[str, S.ContextState] = {}
        self._active: S.ContextState = S.ContextState("default")
        self.contexts["default"] = self._active

    @property
    def active(self) -> str:
        return self._active.name

    def activate(self, name: str) -> str:
        """Make `name` the context the next calls use; returns the previous one's name. Host-side only."""
        previous = self._active.name
        if name not in self.contexts:
            self.contexts[name] = S.ContextState(name)
        self._active = self.contexts[name]
        return previous

    def set_config(self, config: ResolvedConfig) -> None:
        self.config = config
        self.signal = config.signal
        for st in self.contexts.values():
            st.write_config(config)

    def reset(self) -> None:
        for st in self.contexts.values():
            st.reset()

    def run(
        self,
        signal: torch.Tensor,
        stream: torch.Tensor,
        full: Callable[..., torch.Tensor],
        operands: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """The span's output for `stream` (its input): `full(*operands)`, or `stream + residual` when reused."""
        st = self._active
        if not st.matches(signal, stream):  # first call, or new shape/dtype/device: (re)allocate, state fresh
            st.allocate(signal, stream, self.config)
        reuse = decide(signal, st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket)
        if torch.compiler.is_compiling() or self.eager_branch == "cond":
            out = torch.cond(reuse, lambda *_: torch.empty_like(stream), _fresh_output(full), tuple(operands))
        elif reuse.item():  # host-ok: eager has to know on the host whether to launch the blocks
            out = torch.empty_like(stream)
        else:
            out = full(*operands).contiguous()
        apply_residual_(reuse, stream, out, st.residual)
        return out

    def history(self) -> dict[str, tuple[list[StepRecord], int, int]]:
        """Per context: the current (or last finished) generation's steps, lifetime calls, lifetime reuses."""
        out = {}
        for name, st in self.contexts.items():
            if not st.allocated:
                continue
            scalars = st.scalars.tolist()  # host-ok: summaries are read off the per-step path
            rows = st.log[: int(scalars[S.LOGGED])].tolist()  # host-ok
            records = [
                StepRecord(i, r[S.LOG_X], r[S.LOG_Y], r[S.LOG_ACC], r[S.LOG_REUSED] > 0) for i, r in enumerate(rows)
            ]
            out[name] = (records, int(scalars[S.CALLS]), int(scalars[S.REUSED]))
        return out
