"""`teacache_kernels.compile`: the split path (mode="reduce-overhead": a graph break at the decision, one host read
per step, every graph CUDA-graph capturable) and the cond path (one graph, fullgraph), on a tiny FLUX with true CFG.

On this CPU machine Inductor captures no CUDA graphs (there are none); what is checked here is everything else:
the schedules equal the eager reference's, the outputs stay within the FLUX compile budget (tests/test_compile.py),
exactly one host read per transformer call on the split path and none in compiled calls on the cond path, a fixed
set of graphs after a warm-up that saw both branches (error_on_recompile over new generations, step counts, CFG
contexts and a new threshold). That the graphs are then captured and replayed without a skip is tests/test_gpu.py's.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import teacache_kernels as tk
from teacache_kernels.tiny_models import TinyFluxShape, flow_matching_loop, flux_inputs, tiny_flux_transformer

SHAPE = TinyFluxShape()
THRESH = 0.6


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def generate(model, inputs, steps):
    latents, cond, negative = inputs
    return flow_matching_loop(model, latents, cond, steps, negative=negative, cfg_scale=3.0)


def schedules(model):
    return {n: c.schedule for n, c in tk.summary(model).contexts.items()}


def inputs():
    latents, cond = flux_inputs(SHAPE)
    _, negative = flux_inputs(SHAPE, seed=7)
    return latents, cond, negative


def test_fullgraph_with_a_cudagraph_mode_is_refused_by_name():
    model = tiny_flux_transformer(SHAPE)
    tk.enable_teacache(model, num_inference_steps=4)
    with pytest.raises(ValueError, match="mode='reduce-overhead' uses CUDA graphs.*fullgraph=True cannot hold"):
        tk.compile(model, mode="reduce-overhead", fullgraph=True)
    with pytest.raises(RuntimeError, match="TeaCache is not enabled"):
        tk.compile(tiny_flux_transformer(SHAPE), mode="reduce-overhead")
    ref = tiny_flux_transformer(SHAPE)
    tk.enable_teacache(ref, num_inference_steps=4, reference=True)
    with pytest.raises(ValueError, match="needs the fused implementation"):
        tk.compile(ref)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reduce-overhead"], ids=["split"])  # the cond path (mode None): tests/test_compile.py
def test_compiled_paths_match_the_reference_with_their_host_reads(mode):
    data = inputs()
    model, ref, plain = (tiny_flux_transformer(SHAPE) for _ in range(3))
    tk.enable_teacache(model, num_inference_steps=8, rel_l1_thresh=THRESH)
    tk.enable_teacache(ref, num_inference_steps=8, rel_l1_thresh=THRESH, reference=True)
    compiled = tk.compile(model, mode=mode)
    plain_eager = generate(plain, data, 8)
    compile_error = (generate(torch.compile(plain, mode=mode), data, 8) - plain_eager).abs().max().item()
    scale = plain_eager.abs().max().item()

    generate(compiled, data, 8)  # warm-up: both branches, both contexts
    assert {"C", "R"} <= set("".join(schedules(model).values()))
    graphs = counters["stats"]["unique_graphs"]
    reads = tk.summary(model).host_reads
    with torch._dynamo.config.patch(error_on_recompile=True):
        for steps, thresh in ((8, THRESH), (6, THRESH), (8, 1.5)):
            for m in (model, ref):
                tk.enable_teacache(m, rel_l1_thresh=thresh)
                tk.reset_teacache(m, steps)
            out, expected = generate(compiled, data, steps), generate(ref, steps=steps, inputs=data)
            assert schedules(model) == schedules(ref), (mode, steps, thresh)
            error = (out - expected).abs().max().item()
            assert error <= 2 * compile_error + 1e-6 * scale, (mode, steps, error, compile_error)
            calls = 2 * steps
            summary = tk.summary(model)
            assert summary.host_reads - reads == (calls if mode else 0), summary  # one read per call, or none
            reads = summary.host_reads
    assert counters["stats"]["unique_graphs"] == graphs  # the warm-up compiled every graph there is
    assert tk.summary(model).branch == ("split" if mode else "cond")
    if mode:
        assert graphs > 1  # the break at the decision cuts the forward into graphs
    print(f"\n{mode or 'default'}: {tk.summary(model).branch} path, {graphs} graphs, compiled vs eager {error:.3g} "
          f"(plain compile error {compile_error:.3g})")  # fmt: skip


@pytest.mark.slow
def test_a_pipeline_is_compiled_in_one_line():
    from teacache_kernels.tiny_models import tiny_flux_pipeline, tiny_flux_prompt

    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    tk.enable_teacache(pipe, rel_l1_thresh=THRESH)
    assert tk.compile(pipe, mode="reduce-overhead") is pipe and hasattr(pipe.transformer, "_orig_mod")
    pipe(**tiny_flux_prompt(), num_inference_steps=6, height=32, width=32, output_type="latent")
    summary = tk.summary(pipe)
    assert summary.branch == "split" and summary.host_reads == 6 and "6 host reads" in str(summary)
