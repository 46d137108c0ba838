"""The compile checks the family tests share: graph breaks of a call, and a compiled pipeline held to the eager oracle."""

from __future__ import annotations

from typing import Callable

import torch

import teacache_kernels as tk


def graph_breaks(model, call: dict) -> int:
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**call)
    torch._dynamo.reset()
    return explained.graph_break_count


def schedules(pipe) -> dict[str, str]:
    return {name: c.schedule for name, c in tk.summary(pipe).contexts.items()}


def check_compiled_pipeline(
    name: str,
    make_pipeline: Callable[[], object],
    generate: Callable[[object, int], torch.Tensor],
    case: dict,
    *,
    fullgraph: bool = True,
    interior: Callable[[dict[str, str]], str] | None = None,
) -> None:
    """TeaCache'd `case` compiled after one warm-up generation, then generations of 8 and 5 steps with no recompile:
    the eager reference's schedules, outputs within twice what compiling changes in the uncached pipeline + 1e-6
    of scale. `interior(schedules)`: the calls no rule forces, which must both reuse and compute somewhere."""
    pipe, ref, plain = make_pipeline(), make_pipeline(), make_pipeline()
    tk.enable_teacache(pipe, **case)
    tk.enable_teacache(ref, reference=True, **case)
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=fullgraph)
    generate(pipe, 6)  # warm-up: compiles
    plain_eager = generate(plain, 8)
    plain.transformer = torch.compile(plain.transformer, fullgraph=fullgraph)
    compile_error = (generate(plain, 8) - plain_eager).abs().max().item()
    scale = plain_eager.abs().max().item()
    seen = ""
    with torch._dynamo.config.patch(error_on_recompile=True):
        for steps in (8, 5):
            out, expected = generate(pipe, steps), generate(ref, steps)
            assert schedules(pipe) == schedules(ref)
            if interior is not None:
                seen += interior(schedules(pipe))
            error = (out - expected).abs().max().item()
            assert error <= 2 * compile_error + 1e-6 * scale, (steps, error, compile_error)
            print(f"\n{name} compiled, {steps} steps: {schedules(pipe)}, max|diff| vs eager reference {error:.3g} "
                  f"(plain model's compile error {compile_error:.3g}, scale {scale:.3g})")  # fmt: skip
    if interior is not None:
        assert "R" in seen and "C" in seen, seen
