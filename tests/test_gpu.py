"""GPU-only checks: real model shapes, the model on CUDA, and the decision inside a captured CUDA graph.

Skipped without CUDA. Run them whenever a GPU is available: `pytest -m gpu`.
(The kernel tests in test_decide.py / test_apply_residual.py also run on CUDA there, via the `impl` fixture.)
"""

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels import state as S
from teacache_kernels.ops.apply_residual import apply_residual_
from teacache_kernels.ops.decide import decide
from teacache_kernels.reference import TeaCacheOracle
from teacache_kernels.tiny_models import TinyFluxShape, flow_matching_loop, flux_inputs, tiny_flux_transformer

from conftest import requires_cuda
from test_decide import assert_no_near_ties, check_against_oracle, flux_config, random_walk

pytestmark = [pytest.mark.gpu, requires_cuda]

REAL_SIGNALS = {
    "flux-1024px": (1, 4096, 3072),  # FLUX.1 at 1024x1024: the modulated image tokens
    "flux-batch2-512px": (2, 1024, 3072),
    "odd": (1, 333, 77),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", list(REAL_SIGNALS.values()), ids=list(REAL_SIGNALS))
def test_decide_real_shapes_match_oracle(shape, dtype):
    numel = 1
    for d in shape:
        numel *= d
    config = flux_config(thresh=0.5, steps=8)
    signals = [s.view(shape) for s in random_walk(numel, 10, dtype, seed=1)]
    schedule, oracle = check_against_oracle(signals, config, "cuda")
    assert "R" in schedule
    assert_no_near_ties(oracle, config)


def test_apply_residual_real_shape():
    x, out, res = (torch.randn(1, 4096, 3072, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    expected = x + res
    apply_residual_(torch.tensor(True, device="cuda"), x, out, res)
    assert torch.equal(out, expected)
    out2 = torch.randn_like(x)
    apply_residual_(torch.tensor(False, device="cuda"), x, out2, res)
    assert torch.equal(res, out2 - x)


def test_decision_replays_inside_a_cuda_graph():
    """No host sync and no allocation outside the graph pool: the decision can be captured and replayed."""
    config = flux_config(thresh=0.5, steps=12)
    signals = random_walk(4096 * 64, 14, torch.bfloat16, seed=2)
    st = S.ContextState("graph")
    st.allocate(signals[0].cuda(), signals[0].cuda(), config)
    signal_in = torch.empty_like(st.prev_signal)

    # warm up on a side stream (launch caches), then reset the state and capture one decision
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        decide(signal_in.copy_(signals[0].cuda()), st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket)
    torch.cuda.current_stream().wait_stream(s)
    st.allocate(signals[0].cuda(), signals[0].cuda(), config)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        reuse = decide(signal_in, st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket)

    oracle = TeaCacheOracle(config)
    got, expected = [], []
    for sig in signals:
        signal_in.copy_(sig.cuda())
        graph.replay()
        got.append(bool(reuse))
        expected.append(oracle.decide(sig))
    assert got == expected and any(expected)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_flux_on_gpu_matches_reference(compiled):
    shape, steps = TinyFluxShape(), 16
    latents, cond = flux_inputs(shape, device="cuda")
    negative = flux_inputs(shape, seed=9, device="cuda")[1]

    def run(reference):
        model = tiny_flux_transformer(shape).cuda()
        tk.enable_teacache(model, rel_l1_thresh=0.6, num_inference_steps=steps, reference=reference)
        runner = torch.compile(model, fullgraph=True) if compiled and not reference else model
        if compiled and not reference:
            flow_matching_loop(runner, latents, cond, steps, negative=negative, cfg_scale=3.0)  # warm-up
        out = flow_matching_loop(runner, latents, cond, steps, negative=negative, cfg_scale=3.0)
        return out, {n: c.schedule for n, c in tk.summary(model).contexts.items()}

    out, sched = run(False)
    ref, ref_sched = run(True)
    assert {k: v for k, v in sched.items() if k in ref_sched} == ref_sched
    assert "R" in ref_sched["cond"]
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)  # TF32/SDPA kernels may differ in the last bits


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("family", ["qwen-image", "lumina2", "cogvideox", "mochi", "hunyuan-video", "ltx-video", "hidream", "wan"])
def test_family_pipeline_on_gpu_matches_reference(family, compiled):
    """Each new family's tiny pipeline on CUDA: the Triton kernels inside the span, against the oracle.
    (Written without a GPU at hand; run it whenever one is lent.)"""
    from teacache_kernels.tiny_families import TINY

    fam, steps = TINY[family], 8
    case = {"cogvideox": dict(rel_l1_thresh=1.2, coefficients=[1.0, 0.0]),
            "wan": dict(rel_l1_thresh=0.2, coefficients="wan2.1-i2v-14b-480p")}.get(family, dict(rel_l1_thresh=0.3))  # fmt: skip

    def run(reference):
        pipe = fam.pipeline().to("cuda")
        tk.enable_teacache(pipe, reference=reference, **case)
        if compiled and not reference:
            pipe.transformer = torch.compile(pipe.transformer, fullgraph=family != "lumina2")
            fam.generate(pipe, steps)  # warm-up
        out = fam.generate(pipe, steps)
        return out, {n: c.schedule for n, c in tk.summary(pipe).contexts.items()}

    out, sched = run(False)
    ref, ref_sched = run(True)
    assert sched == ref_sched
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)  # TF32/SDPA kernels may differ in the last bits


def test_split_path_is_cuda_graphed_without_skips():
    """tk.compile(mode="reduce-overhead"): every graph of the split path captured by CUDA-graph trees (no cudagraph
    skip; cudagraph_or_error turns any into an error), schedules equal the eager reference's, one host read per call.
    (Written without a GPU at hand; run it whenever one is lent.)"""
    from torch._dynamo.utils import counters

    shape = TinyFluxShape()
    latents, cond = flux_inputs(shape, device="cuda")
    _, negative = flux_inputs(shape, seed=7, device="cuda")
    model, ref = tiny_flux_transformer(shape).cuda(), tiny_flux_transformer(shape).cuda()
    for m, reference in ((model, False), (ref, True)):
        tk.enable_teacache(m, num_inference_steps=8, rel_l1_thresh=0.6, reference=reference)
    torch._dynamo.reset()
    counters.clear()
    compiled = tk.compile(model, mode="reduce-overhead")
    with torch._inductor.config.patch({"triton.cudagraph_or_error": True}):
        for _ in range(3):  # warm-up, record, replay
            tk.reset_teacache(model)
            out = flow_matching_loop(compiled, latents, cond, 8, negative=negative, cfg_scale=3.0)
    expected = flow_matching_loop(ref, latents, cond, 8, negative=negative, cfg_scale=3.0)
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert {n: c.schedule for n, c in tk.summary(model).contexts.items()} == {n: c.schedule for n, c in tk.summary(ref).contexts.items()}
    assert tk.summary(model).host_reads == 3 * 16
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


def test_a_model_moved_to_the_gpu_after_enabling_starts_its_state_there():
    """Enabled and run on the CPU, then `.to("cuda")`: the next call's signal is on another device, so its state is
    allocated afresh there; the generation equals a model moved first and enabled after (fault matrix, GPU half)."""
    shape = TinyFluxShape()
    latents, cond = flux_inputs(shape)
    moved, first = tiny_flux_transformer(shape), tiny_flux_transformer(shape).cuda()
    for m in (moved, first):
        tk.enable_teacache(m, num_inference_steps=8, rel_l1_thresh=0.6)
    flow_matching_loop(moved, latents, cond, 8)
    moved.cuda()
    tk.reset_teacache(moved)
    cuda_latents, cuda_cond = latents.cuda(), {k: v.cuda() for k, v in cond.items()}
    out = flow_matching_loop(moved, cuda_latents, cuda_cond, 8)
    assert moved._teacache.cache.contexts["cond"].residual.device.type == "cuda"
    torch.testing.assert_close(out, flow_matching_loop(first, cuda_latents, cuda_cond, 8), rtol=0, atol=0)


def test_sequential_cpu_offload_while_enabled():
    """`enable_sequential_cpu_offload` (accelerate hooks on every leaf module) with TeaCache on: threshold 0 equals the
    plain offloaded pipeline, and a threshold reuses. (On CPU diffusers' sequential offload itself fails.)"""
    from teacache_kernels.tiny_models import tiny_flux_pipeline, tiny_flux_prompt

    def generate(pipe):
        return pipe(**tiny_flux_prompt(), num_inference_steps=8, height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    plain, zero, cached = tiny_flux_pipeline(), tiny_flux_pipeline(), tiny_flux_pipeline()
    tk.enable_teacache(zero, rel_l1_thresh=0.0)
    tk.enable_teacache(cached, rel_l1_thresh=0.6)
    for pipe in (plain, zero, cached):
        pipe.set_progress_bar_config(disable=True)
        pipe.enable_sequential_cpu_offload()
    assert torch.equal(generate(zero), generate(plain))
    generate(cached)
    assert "R" in tk.summary(cached).contexts["cond"].schedule
