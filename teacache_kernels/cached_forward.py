"""The generic cached forward: signal -> fused decision -> torch.cond(reuse, full) -> fused residual op.

The span (`models.base.BlockSpan`, which the transformer's first block list yields while TeaCache is on)
computes the signal and calls `FusedCache.run` with the streams that carry a residual. The decision is
made on the device: `ops.decide` produces a 0-d bool tensor, `torch.cond` branches on it without a graph
break, and `ops.apply_residual_` reads the same flag on the device to store or apply each stream's
residual: one decision launch plus one residual pass per cached stream. (Inductor lowers
the `torch.cond` itself to a host `if` on the flag: torch 2.13's one remaining read per step, which the
CUDA-graph path is to remove.)

Eagerly (no torch.compile), skipping the blocks needs the decision on the host: one host read per step,
as in every eager TeaCache. Eager `torch.cond` reads the flag on the host just the same, with more
dispatch around it; bench/bench_branch.py measures the two, and eager runs the Python branch.
"""

from __future__ import annotations

import copy
import functools
import itertools
import weakref
from typing import Any, Callable, Sequence

import torch
from torch._dynamo.comptime import comptime

from . import _inductor_cond_fix, parallel
from . import state as S
from .config import ResolvedConfig
from .cudagraph_conditional import close_if_computing, open_if_computing
from .ops.apply_residual import apply_residual_
from .ops.decide import decide
from .reference import StepRecord


_inductor_cond_fix.install()  # torch 2.13: branch inputs keep their traced strides (see the module)


def _empty(stream: torch.Tensor) -> torch.Tensor:
    # Contiguous whatever the stream's layout (HunyuanVideo's image stream is a transposed view): the
    # residual op writes `out` by flat index, and the compute branch's outputs are contiguous too.
    return torch.empty_like(stream, memory_format=torch.contiguous_format)


def _fresh_outputs(full: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[..., tuple[torch.Tensor, ...]]:
    # torch.cond needs both branches' outputs to agree in storage offset and strides. Blocks may return a
    # view (FLUX's single blocks slice the joint sequence), so the compute branch hands over fresh
    # contiguous copies: one extra pass over each stream on computed steps only.
    def branch(*operands):
        return tuple(out.clone(memory_format=torch.contiguous_format) for out in full(*operands))

    return branch


_FROM_LAYOUT = object()  # prepare()'s default: the layout key is the layout's own (`state.layout_key`)

# FusedCache objects by key: how the trace-time allocation below finds the cache of the call being traced
# (a string local is a constant to Dynamo, whatever the dynamic-shape settings; an object is not).
_LIVE: "weakref.WeakValueDictionary[str, FusedCache]" = weakref.WeakValueDictionary()
_keys = itertools.count()


def _concrete(size) -> int:
    # A symbolic size (torch.compile with dynamic shapes) allocates at the size this call has.
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


def _prepare_while_tracing(ctx) -> None:
    """Run by Dynamo while it traces `FusedCache.run` (torch._dynamo.comptime), with the call's fake tensors.

    It allocates the active context's buffers for real, now, so the graph being traced reads buffers that
    already exist: the first compiled call compiles once (not allocate-then-steady-state), and nothing
    about the allocation is guarded. A call with another layout (batch size, resolution) traces again (its
    inputs' shapes changed) and allocates that layout's state here, once; earlier layouts' states are kept, so
    going back to one finds its graph and its buffers as they were: no recompile.
    """
    cache = _LIVE[ctx.get_local("key").as_python_constant()]
    signal = ctx.get_local("signal").as_fake()
    streams = [proxy.node.meta["example_value"] for proxy in ctx.get_local("streams").as_proxy()]
    layout = (
        tuple(_concrete(d) for d in signal.shape), signal.dtype,
        tuple(tuple(_concrete(d) for d in s.shape) for s in streams), tuple(s.dtype for s in streams),
        signal.device,
    )  # fmt: skip
    symbolic = any(isinstance(d, torch.SymInt) for t in (signal, *streams) for d in t.shape)
    key = None if symbolic else S.layout_key(layout)  # as run() computes it from the traced shapes
    cache.prepare(layout, ctx.get_local("state_key").as_python_constant(), key)
    # torch.cond refuses operands that alias each other (CogVideoX's two streams are views of one tensor):
    # run() reads this, as a constant of the trace, and then hands the branches copies of the later streams.
    storages = [s.untyped_storage()._cdata for s in streams]
    cache.streams_alias = len(set(storages)) < len(storages)


@torch._dynamo.disable
def _read_flag(cache: "FusedCache", reuse: torch.Tensor) -> bool:
    """The one host read of a step's decision, outside any graph: under torch.compile the call is a deliberate
    graph break, so the graphs before and after it (each CUDA-graph capturable) are cut here (the split path)."""
    cache.host_reads += 1
    return bool(reuse.item())  # host-ok: the split path's one read per step


class FusedCache:
    """Per-CFG-context TeaCache state on the device, and the cached run of a block span."""

    # How eager (uncompiled) calls branch: "python" (one host read) or "cond" (torch.cond run eagerly, which
    # reads the flag on the host as well). bench/bench_branch.py measures both; "python" was faster.
    eager_branch = "python"
    # How compiled calls branch: "cond" (torch.cond: one graph, fullgraph=True works; torch 2.13's Inductor reads
    # the flag on the host inside it and gives up CUDA graphs for the graph) or "split" (a graph break at the flag:
    # the graphs before and after it, and each branch's, are separate and each can be CUDA-graphed; one host read
    # per step, counted in `host_reads`). `teacache_kernels.compile` picks "split" for mode="reduce-overhead".
    # "conditional" (set on both attributes by `cudagraph_conditional.CapturedTransformer`, mode="conditional"): no
    # host branch at all; the blocks run between two hooks that, while the runner captures a CUDA graph, open and
    # close a device-side IF node on the flag (outside a capture the blocks run on every call, see run()).
    compiled_branch = "cond"

    def __init__(self, config: ResolvedConfig):
        self.config = config
        self.signal = config.signal  # a plain string the span reads: guarded by value, whatever the config object
        self.contexts: dict[str, S.ContextState] = {}
        self._active: S.ContextState = S.ContextState("default")
        self.contexts["default"] = self._active
        self.streams_alias = False  # set while tracing: do the streams of the traced call share storage?
        self.host_reads = 0  # decisions read on the host by this package (eager calls and the split path)
        self.group = None  # the process group that splits the signal (context parallelism), or None: parallel.py
        self._register()

    def _register(self) -> None:
        self.key = f"teacache-{next(_keys)}"
        _LIVE[self.key] = self

    def __deepcopy__(self, memo: dict) -> "FusedCache":
        new = copy.copy(self)
        memo[id(self)] = new
        # The process group is shared, not copied: a copy runs on the same ranks.
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k not in ("key", "group")})
        new._register()  # its own key: a compiled copy must find its own state
        return new

    def prepare(self, layout: tuple, state_key: str | None = None, layout_key: Any = _FROM_LAYOUT) -> S.ContextState:
        """The active context's state for `layout` (`state.layout_of`), its buffers allocated unless they fit it.

        Each layout (shapes) of a context has a state of its own, kept: a batch size or resolution seen before
        finds its buffers. The same shapes in another dtype or on another device reallocate (fresh state)."""
        key = S.layout_key(layout) if layout_key is _FROM_LAYOUT else layout_key  # None: symbolic sizes (see run)
        base = self._active.state_for(state_key)
        if base.allocated and key not in (None, base.layout_key) and key not in base.layouts and base.never_called():
            base.allocate_layout(layout, self.config)  # activate()'s guess of this context's layout was wrong: take it over
        st = base.for_layout(key)
        if st.layout != layout:  # first call of this layout, or a new dtype/device: fresh state
            st.allocate_layout(layout, self.config)
        return st

    @property
    def active(self) -> str:
        return self._active.name

    def activate(self, name: str) -> str:
        """Make `name` the context the next calls use; returns the previous one's name. Host-side only.

        A context seen for the first time gets buffers of the layout the last allocated context has (CFG
        branches share it), here on the host: a compiled model then runs its first call without recompiling.
        """
        previous = self._active.name
        if name not in self.contexts:
            st = self.contexts[name] = S.ContextState(name)
            known = [c.layout for c in self.contexts.values() if c.layout is not None]
            if known:
                st.allocate_layout(known[-1], self.config)
        self._active = self.contexts[name]
        return previous

    def at_step(self, step: int) -> None:
        """The active context's next call is call `step` of its generation (0: a new generation starts). Host side:
        one small in-place write per state, no sync. A step outside the generation leaves the count as it is."""
        for st in self._active.all_states():
            n = st.steps
            if not st.allocated or step < 0 or (n and step >= n):
                continue
            if step == 0:
                st.reset()
            st.scalars[S.STEP : S.STEP + 1].fill_(float(step))

    def _states(self) -> list[S.ContextState]:
        return [st for context in self.contexts.values() for st in context.all_states()]

    def set_config(self, config: ResolvedConfig) -> None:
        self.config = config
        self.signal = config.signal
        for st in self._states():
            st.write_config(config)

    def reset(self) -> None:
        for st in self._states():
            st.reset()

    def run(
        self,
        signal: torch.Tensor,
        streams: Sequence[torch.Tensor],
        full: Callable[..., tuple[torch.Tensor, ...]],
        state_key: str | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The span's outputs for `streams` (its inputs): `full(*streams)`, or each `stream + residual` when reused.

        `full` must read the streams only through its arguments (torch.cond's operands), not a closure.

        `state_key` (a string, constant under compile) selects a sub-state of the active context: families
        whose original keeps state by something other than the CFG context (Lumina2: the sequence length).
        """
        streams, key = tuple(streams), self.key  # noqa: F841 (key: read by _prepare_while_tracing)
        if torch.compiler.is_compiling():
            comptime(_prepare_while_tracing)  # allocates for real at trace time; the graph looks the state up
            st = self._active.state_for(state_key).for_layout(S.layout_key(S.layout_of(signal, streams)))
        else:
            st = self.prepare(S.layout_of(signal, streams), state_key)
        # Context parallelism: the sums go over the ranks that split the signal (parallel.py), so all decide alike.
        over_ranks = None if self.group is None else functools.partial(parallel.sum_over_ranks, group=self.group)
        reuse = decide(signal, st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket, over_ranks)
        if torch.is_grad_enabled():
            return self._run_differentiable(reuse, streams, st.residuals, full)
        compiling = torch.compiler.is_compiling()
        if (self.compiled_branch if compiling else self.eager_branch) == "conditional":
            # The blocks write into outputs allocated before the IF node, so the graph after it reads the same
            # buffers whether the node ran or not; apply_residual_ below then stores the residual (computed) or
            # overwrites them with stream + residual (reused). Un-captured, the blocks' work on a reused call is
            # thrown away: the reference's outputs, without the skip (warm-up calls, and CPU).
            outs = tuple(_empty(s) for s in streams)
            open_if_computing(reuse)  # graph break; an IF node on `not reuse` while a CapturedTransformer captures
            for out, computed in zip(outs, full(*streams)):
                out.copy_(computed)
            close_if_computing()  # graph break
        elif compiling and self.compiled_branch == "split":
            if _read_flag(self, reuse):  # graph break: the graphs on either side are CUDA-graph capturable
                outs = tuple(_empty(s) for s in streams)
            else:
                outs = tuple(out.contiguous() for out in full(*streams))
        elif compiling or self.eager_branch == "cond":
            operands = streams
            if self.streams_alias:  # one copy of each later stream (the text stream: small) per call
                operands = (streams[0], *(o.clone() for o in streams[1:]))
            reused = lambda *ops: tuple(_empty(o) for o in ops)  # noqa: E731 (apply_residual_ fills them)
            outs = torch.cond(reuse, reused, _fresh_outputs(full), operands)
        elif _read_flag(self, reuse):  # eager has to know on the host whether to launch the blocks
            outs = tuple(_empty(s) for s in streams)
        else:
            outs = tuple(out.contiguous() for out in full(*streams))
        for stream, out, residual in zip(streams, outs, st.residuals):
            apply_residual_(reuse, stream, out, residual)
        return outs

    @staticmethod
    def _run_differentiable(reuse, streams, residuals, full) -> tuple[torch.Tensor, ...]:
        """With autograd on: reused outputs are `stream + residual` (the gradient flows to the stream), computed
        outputs are the blocks' own, and the residual is stored detached. The decision is the same op."""
        if torch.compiler.is_compiling():
            reused = lambda *ops: tuple(o + r for o, r in zip(ops, residuals))  # noqa: E731
            outs = torch.cond(reuse, reused, _fresh_outputs(full), streams)
        elif reuse.item():  # host-ok: as above
            outs = tuple(s + r for s, r in zip(streams, residuals))
        else:
            outs = tuple(full(*streams))
        with torch.no_grad():
            for stream, out, residual in zip(streams, outs, residuals):
                residual.copy_(torch.where(reuse, residual, out - stream))
        return outs

    def history(self) -> dict[str, tuple[list[StepRecord], int, int, int]]:
        """Per context: the current (or last finished) generation's steps, lifetime calls, lifetime reuses, and
        the bytes of device memory its state holds."""
        out = {}
        for st in self._states():
            name = st.name
            if not st.allocated:
                continue
            scalars = st.scalars.tolist()  # host-ok: summaries are read off the per-step path
            rows = st.log[: int(scalars[S.LOGGED])].tolist()  # host-ok
            records = [
                StepRecord(i, r[S.LOG_X], r[S.LOG_Y], r[S.LOG_ACC], r[S.LOG_REUSED] > 0) for i, r in enumerate(rows)
            ]
            out[name] = (records, int(scalars[S.CALLS]), int(scalars[S.REUSED]), st.memory_bytes)
        return out
