"""torch.compile(fullgraph=True) on a TeaCache-enabled FluxTransformer2DModel (Inductor, CPU).

- `torch._dynamo.explain`: zero graph breaks, one graph.
- Warm-up is the first generation, in both CFG contexts: it compiles one graph (the cache buffers are
  allocated while Dynamo traces the first call). After it, `error_on_recompile`: a second
  generation (the device counter wraps), a new threshold (written on the device) and both contexts run
  without recompiling.
- Schedules equal the eager reference's. Error budget for outputs (flash-attention's rule): compiled
  TeaCache may differ from eager TeaCache by at most twice what compiling changes in the uncached model,
  plus 1e-6 of the output's scale.
"""

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels.tiny_models import TinyFluxShape, flow_matching_loop, flux_inputs, tiny_flux_transformer

pytestmark = pytest.mark.slow

SHAPE = TinyFluxShape()
STEPS = 16
THRESHOLDS = (0.6, 1.5)


def generation(model, inputs):
    latents, cond, negative = inputs
    return flow_matching_loop(model, latents, cond, STEPS, negative=negative, cfg_scale=3.0)


def eager_reference(inputs, thresh):
    model = tiny_flux_transformer(SHAPE)
    tk.enable_teacache(model, rel_l1_thresh=thresh, num_inference_steps=STEPS, reference=True)
    out = generation(model, inputs)
    return out, {n: c.schedule for n, c in tk.summary(model).contexts.items()}


def test_compiled_teacache_fullgraph_no_recompiles_matches_eager():
    latents, cond = flux_inputs(SHAPE)
    inputs = (latents, cond, flux_inputs(SHAPE, seed=9)[1])

    model = tiny_flux_transformer(SHAPE)
    tk.enable_teacache(model, rel_l1_thresh=THRESHOLDS[0], num_inference_steps=STEPS)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(hidden_states=latents, timestep=torch.ones(1), **cond)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()

    tk.reset_teacache(model)
    compiled = torch.compile(model, fullgraph=True)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    warmup = generation(compiled, inputs)
    warmup_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    assert warmup_graphs == 1, f"warm-up compiled {warmup_graphs} graphs"

    results = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for thresh in THRESHOLDS:
            tk.enable_teacache(model, rel_l1_thresh=thresh)
            results[thresh] = (generation(compiled, inputs), {n: c.schedule for n, c in tk.summary(model).contexts.items()})
        again = generation(compiled, inputs)  # the threshold is still the last one: same generation again
    assert torch.equal(again, results[THRESHOLDS[-1]][0])

    # the uncached model, compiled and eager, measures what compiling alone changes
    plain = tiny_flux_transformer(SHAPE)
    eager_plain = generation(plain, inputs)
    compiled_plain = generation(torch.compile(plain, fullgraph=True), inputs)
    compile_error = (compiled_plain - eager_plain).abs().max().item()
    scale = eager_plain.abs().max().item()

    for thresh in THRESHOLDS:
        out, sched = results[thresh]
        ref_out, ref_sched = eager_reference(inputs, thresh)
        assert {k: v for k, v in sched.items() if k in ref_sched} == ref_sched
        assert "R" in ref_sched["cond"]
        error = (out - ref_out).abs().max().item()
        assert error <= 2 * compile_error + 1e-6 * scale, (thresh, error, compile_error)
    assert torch.allclose(warmup, results[THRESHOLDS[0]][0], rtol=0, atol=2 * compile_error + 1e-6 * scale)


def _conv_then_cond(x, w, lin, pred):
    # Wan's embedding: the `.contiguous()` copy of a transposed conv output, Inductor lays out as it likes.
    h = torch.nn.functional.conv3d(x, w).flatten(2).transpose(1, 2).contiguous()
    return torch.cond(pred, lambda h, lin: h + 1, lambda h, lin: torch.nn.functional.linear(h, lin), (h, lin))


@pytest.mark.parametrize("fixed", [False, True], ids=["torch-2.13-as-is", "teacache-fix"])
def test_inductor_cond_branches_get_operands_with_their_traced_strides(monkeypatch, fixed):
    """torch 2.13's Inductor hands a torch.cond branch an operand buffer laid out transposed, then asserts the
    traced (contiguous) strides on entry: the compiled call fails. teacache_kernels._inductor_cond_fix (installed
    by the cached forward) requires the traced strides: the compiled cond then matches eager in both branches."""
    from torch._inductor import ir

    import teacache_kernels.cached_forward  # noqa: F401 (installs the fix)

    if not fixed:
        monkeypatch.setattr(ir.Conditional, "create", classmethod(ir.Conditional.create.__wrapped__.__func__))
    x, w, lin = torch.randn(1, 4, 3, 4, 4), torch.randn(8, 4, 1, 2, 2), torch.randn(8, 8)
    torch._dynamo.reset()
    compiled = torch.compile(_conv_then_cond, fullgraph=True)
    try:
        for pred in (torch.tensor(True), torch.tensor(False)):
            if fixed:
                torch.testing.assert_close(compiled(x, w, lin, pred), _conv_then_cond(x, w, lin, pred))
            else:
                with pytest.raises(AssertionError, match="stride"):
                    compiled(x, w, lin, pred)
                break
    finally:
        torch._dynamo.reset()
