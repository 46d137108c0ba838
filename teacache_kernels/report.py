"""What TeaCache did: per CFG context, which calls of the generation ran the blocks and which reused."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .reference import StepRecord


@dataclass(frozen=True)
class ContextSummary:
    name: str
    steps: list[StepRecord]  # the current (or last finished) generation, one record per call
    calls: int  # lifetime calls of this context
    reused: int  # lifetime calls that reused the residual
    memory_bytes: int = 0  # device memory the context's state holds (residuals, previous signal, scalars)

    @property
    def computed_steps(self) -> int:
        return sum(not s.reused for s in self.steps)

    @property
    def reused_steps(self) -> int:
        return sum(s.reused for s in self.steps)

    @property
    def schedule(self) -> str:
        """One letter per call: C = blocks computed, R = residual reused."""
        return "".join("R" if s.reused else "C" for s in self.steps)


@dataclass(frozen=True)
class Summary:
    model: str
    implementation: str  # "fused" or "reference"
    coefficients: str  # published set name, or the explicit polynomial
    rel_l1_thresh: float
    contexts: dict[str, ContextSummary]  # the contexts called in the current (or last finished) generation
    calls: int  # since enabled, all contexts
    reused: int
    memory_bytes: int = 0  # device memory of every context's state (also those not called this generation)
    branch: str = "python"  # how a compiled call branches: "cond" (torch.cond), "split" (a host read between graphs)
    # or "conditional" (one CUDA graph per call, the blocks behind a device-side IF node: no host read)
    host_reads: int = 0  # decisions this package read on the host (eager calls and the split path), since enabled
    cuda_graphs: int | None = None  # conditional path: graphs held (one per CFG context and input layout); else None
    graph_replays: int = 0  # conditional path: calls that replayed a graph
    ranks: int = 1  # ranks whose signal slices each decision sums (context parallelism: parallel.py); 1 otherwise

    @property
    def host_reads_per_call(self) -> float:
        return self.host_reads / max(self.calls, 1)

    @classmethod
    def of(cls, inst) -> "Summary":
        from .reference import ReferenceCache

        cfg = inst.cache.config
        history = inst.cache.history()
        stats = getattr(inst.cache, "cuda_graph_stats", None)  # set by cudagraph_conditional.CapturedTransformer
        return cls(
            model=type(inst.transformer).__name__,
            implementation="reference" if isinstance(inst.cache, ReferenceCache) else "fused",
            coefficients=cfg.coefficient_set
            or (f"calibrated for {cfg.calibrated_model!r}" if cfg.calibrated else str(list(cfg.coefficients))),
            rel_l1_thresh=cfg.rel_l1_thresh,
            contexts=_by_context({name: ContextSummary(name, *h) for name, h in history.items() if h[0]}),
            calls=sum(h[1] for h in history.values()),
            reused=sum(h[2] for h in history.values()),
            memory_bytes=sum(h[3] for h in history.values()),
            branch=getattr(inst.cache, "compiled_branch", "python"),
            host_reads=getattr(inst.cache, "host_reads", 0),
            cuda_graphs=stats.graphs if stats is not None else None,
            graph_replays=stats.replays if stats is not None else 0,
            ranks=_group_size(getattr(inst.cache, "group", None)),
        )

    def __str__(self) -> str:
        head = (
            f"TeaCache on {self.model} ({self.implementation}; coefficients {self.coefficients}; "
            f"rel_l1_thresh {self.rel_l1_thresh:g})"
        )
        if not self.contexts:
            return head + f"\n  no calls in this generation yet ({self.calls} since enabled)"
        width = max(7, *(len(n) for n in self.contexts))
        lines = [head, f"  {'context':<{width}}  calls  computed  reused     memory  schedule (C computed, R reused)"]
        for c in self.contexts.values():
            n = len(c.steps)
            lines.append(
                f"  {c.name:<{width}}  {n:>5}  {c.computed_steps:>8}  {c.reused_steps:>6}  {_size(c.memory_bytes):>9}  {c.schedule}"
            )
        lines.append(
            f"  since enabled: {self.calls} calls, {self.reused} reused ({100.0 * self.reused / max(self.calls, 1):.0f}%); "
            f"cache memory {_size(self.memory_bytes)}; compiled branch {self.branch!r}, {self.host_reads} host reads "
            f"({self.host_reads_per_call:.2g} per call)"
            + (f"; {self.cuda_graphs} CUDA graphs, {self.graph_replays} replays" if self.cuda_graphs is not None else "")
            + (f"; each decision summed over {self.ranks} ranks (context parallel)" if self.ranks > 1 else "")
        )
        return "\n".join(lines)

    def table(self, context: str | None = None) -> str:
        """Per call: x (relative L1 to the previous signal), poly(x), accumulator, decision."""
        name = context if context is not None else next(iter(self.contexts), None)
        if name not in self.contexts:
            raise KeyError(f"no calls recorded in context {name!r}; contexts: {sorted(self.contexts)}")
        rows = [f"{'step':>4}  {'x':>10}  {'poly(x)':>10}  {'acc':>10}  decision"]
        for s in self.contexts[name].steps:
            fmt = lambda v: "-" if math.isnan(v) else f"{v:.5f}"  # noqa: E731
            rows.append(f"{s.step:>4}  {fmt(s.x):>10}  {fmt(s.y):>10}  {s.acc:>10.5f}  {'reused' if s.reused else 'computed'}")
        return "\n".join(rows)

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "implementation": self.implementation,
            "coefficients": self.coefficients,
            "rel_l1_thresh": self.rel_l1_thresh,
            "calls": self.calls,
            "reused": self.reused,
            "memory_bytes": self.memory_bytes,
            "branch": self.branch,
            "host_reads": self.host_reads,
            "cuda_graphs": self.cuda_graphs,
            "graph_replays": self.graph_replays,
            "ranks": self.ranks,
            "contexts": {
                n: {"schedule": c.schedule, "calls": c.calls, "reused": c.reused, "memory_bytes": c.memory_bytes,
                    "steps": [s.__dict__ for s in c.steps]}  # fmt: skip
                for n, c in self.contexts.items()
            },
        }


def _group_size(group) -> int:
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)


@dataclass(frozen=True)
class StagedSummary:
    """A pipeline with TeaCache on two transformers (Wan 2.2): each one's Summary, by pipeline attribute."""

    stages: dict[str, Summary]  # "transformer", "transformer_2"

    @property
    def contexts(self) -> dict[str, ContextSummary]:
        """Every stage's contexts, named "<attribute>/<context>"."""
        return {f"{stage}/{name}": c for stage, s in self.stages.items() for name, c in s.contexts.items()}

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.stages.values())

    @property
    def reused(self) -> int:
        return sum(s.reused for s in self.stages.values())

    @property
    def memory_bytes(self) -> int:
        return sum(s.memory_bytes for s in self.stages.values())

    def __str__(self) -> str:
        return "\n".join(f"{stage}: {s}" for stage, s in self.stages.items())

    def as_dict(self) -> dict:
        return {"stages": {stage: s.as_dict() for stage, s in self.stages.items()}}


def _by_context(contexts: dict[str, ContextSummary]) -> dict[str, ContextSummary]:
    """A context's states for other layouts are named "<context>@<shapes>" (cached_forward keeps a state per
    batch size or resolution). Where only one state of a context has calls to show, it goes by the context's name."""
    bases = [name.split("@")[0] for name in contexts]
    out = {}
    for name, c in contexts.items():
        base = name.split("@")[0]
        if "@" in name and bases.count(base) == 1:
            c = dataclasses.replace(c, name=base)
        out[c.name] = c
    return out


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"
