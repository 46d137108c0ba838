"""`teacache_kernels.compile`: torch.compile a TeaCache-enabled transformer (or a pipeline's transformers) in one line,
with the cached span's branch chosen for the mode.

- `mode=None` / `"default"` / `"max-autotune-no-cudagraphs"`: the `torch.cond` path. One graph per transformer,
  `fullgraph=True`; torch 2.13's Inductor lowers the cond to a host `if` on the flag and runs that graph
  without CUDA graphs.
- `mode="reduce-overhead"` / `"max-autotune"` (the modes that use CUDA graphs): the split path. The span reads
  the flag on the host at one point (`cached_forward._read_flag`, a deliberate graph break): the graphs on
  either side, and each branch's, are separate graphs that Inductor's CUDA-graph trees can capture, with one
  host read per step in between. `fullgraph` must then be False (the break is the point).
- `mode="conditional"` (this package's, not torch's): the zero-sync path. The transformer is compiled by Inductor
  without CUDA graphs and wrapped in a `cudagraph_conditional.CapturedTransformer`, which captures each call whole in
  one CUDA graph with a device-side IF node on the flag (CUDA >= 12.4, torch build and driver; checked here, with
  the missing piece named) and then only replays: no host read of the flag.
`summary()` reports the branch and the host reads (and, for "conditional", the graphs). What the split path gives on a GPU (graphs captured, no
cudagraph skips) is checked by tests/test_gpu.py; no GPU has run it yet.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
CONDITIONAL = "conditional"  # the zero-sync path: our own capture, with a conditional node


def compile(pipe_or_transformer: Any, *, mode: str | None = None, fullgraph: bool | None = None, **kwargs):  # noqa: A001
    """`torch.compile` each TeaCache-enabled transformer of a pipeline (set back on it; returns the pipeline) or a
    transformer (returns the compiled module), choosing the cached span's branch for `mode` (module docstring).
    Other keyword arguments go to `torch.compile`."""
    from .api import _installations, _split

    if mode == CONDITIONAL:
        return _compile_conditional(pipe_or_transformer, fullgraph=fullgraph, **kwargs)
    split = mode in CUDAGRAPH_MODES
    if fullgraph is None:
        fullgraph = not split
    if split and fullgraph:
        raise ValueError(
            f"mode={mode!r} uses CUDA graphs, which the cached span gets by a graph break at the decision (the split "
            "path): fullgraph=True cannot hold with it; leave fullgraph unset (or False), or use mode=None for one graph"
        )
    installations = _installations(pipe_or_transformer)  # raises if TeaCache is off
    for _, inst in installations:
        if not hasattr(inst.cache, "compiled_branch"):
            raise ValueError("teacache_kernels.compile needs the fused implementation: enable without reference=True")
        inst.cache.compiled_branch = "split" if split else "cond"
        if inst.cache.eager_branch == CONDITIONAL:  # left by an earlier mode="conditional": eager reads the flag again
            del inst.cache.eager_branch
        inst.cache.cuda_graph_stats = None

    pipeline, _ = _split(pipe_or_transformer)
    if pipeline is None:
        return torch.compile(pipe_or_transformer, mode=mode, fullgraph=fullgraph, **kwargs)
    for name, _ in installations:
        module: nn.Module = getattr(pipeline, name)
        setattr(pipeline, name, torch.compile(getattr(module, "_orig_mod", module), mode=mode, fullgraph=fullgraph, **kwargs))
    return pipe_or_transformer


def _compile_conditional(pipe_or_transformer: Any, *, fullgraph: bool | None, clone_outputs: bool = True, **kwargs):
    """mode="conditional": each TeaCache transformer wrapped in a CapturedTransformer (set back on the pipeline)."""
    from .api import _installations, _split
    from .cudagraph_conditional import CapturedTransformer, require_conditional_nodes

    if fullgraph:
        raise ValueError(
            "mode='conditional' captures the IF node through two graph breaks around the cached blocks: fullgraph=True "
            "cannot hold with it; leave fullgraph unset"
        )
    installations = _installations(pipe_or_transformer)  # raises if TeaCache is off
    pipeline, _ = _split(pipe_or_transformer)
    targets = [(name, getattr(pipeline, name) if pipeline is not None else pipe_or_transformer) for name, _ in installations]
    for _, module in targets:  # every check before any change
        module = getattr(module, "_orig_mod", module)
        param = next(module.parameters(), None)
        require_conditional_nodes(param.device if param is not None else None)
    wrapped = [CapturedTransformer(getattr(m, "_orig_mod", m), clone_outputs=clone_outputs, **kwargs) for _, m in targets]
    if pipeline is None:
        return wrapped[0]
    for (name, _), module in zip(targets, wrapped):
        setattr(pipeline, name, module)
    return pipe_or_transformer
