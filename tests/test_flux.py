"""TeaCache on a real diffusers FluxTransformer2DModel (tiny config, random weights), eager.

The reference is `enable_teacache(..., reference=True)`: the oracle driving the same block span with
Python branches and plain torch arithmetic. Error budget, eager on CPU: zero. The fused path's
torch ops and Triton kernels (fp32) do the same float operations in the same order as the reference,
so schedules and outputs must be identical bit for bit.
"""

import math

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels import ops
from teacache_kernels.tiny_models import TinyFluxShape, flow_matching_loop, flux_inputs, tiny_flux_transformer

from conftest import TRITON_DEVICE

SHAPE = TinyFluxShape()
STEPS = 20


@pytest.fixture(scope="module")
def inputs():
    latents, cond = flux_inputs(SHAPE)
    negative = flux_inputs(SHAPE, seed=9)[1]
    return latents, cond, negative


@pytest.fixture(scope="module")
def uncached(inputs):
    latents, cond, negative = inputs
    model = tiny_flux_transformer(SHAPE)
    return {
        "plain": flow_matching_loop(model, latents, cond, STEPS),
        "cfg": flow_matching_loop(model, latents, cond, STEPS, negative=negative, cfg_scale=3.0),
    }


def generate(inputs, cfg=False, model=None, **enable):
    """Final latents and summary of one generation with TeaCache enabled on a fresh tiny FLUX."""
    latents, cond, negative = inputs
    model = model or tiny_flux_transformer(SHAPE)
    tk.enable_teacache(model, num_inference_steps=STEPS, **enable)
    out = flow_matching_loop(model, latents, cond, STEPS, negative=negative if cfg else None, cfg_scale=3.0)
    return out, tk.summary(model), model


def schedules(summary):
    return {name: c.schedule for name, c in summary.contexts.items()}


def assert_clear_of_ties(summary, thresh):
    """Every non-forced decision's candidate accumulator is clearly away from the threshold."""
    for ctx in summary.contexts.values():
        acc = 0.0
        for s in ctx.steps:
            if not math.isnan(s.y):
                assert abs(acc + s.y - thresh) > 1e-4 * max(thresh, 1e-3), f"{ctx.name} step {s.step}: near tie"
            acc = s.acc


@pytest.mark.parametrize("thresh", [0.3, 0.6, 1.5])
@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "true-cfg"])
def test_fused_matches_reference(inputs, thresh, cfg):
    fused, fused_summary, _ = generate(inputs, cfg, rel_l1_thresh=thresh)
    ref, ref_summary, _ = generate(inputs, cfg, rel_l1_thresh=thresh, reference=True)
    assert schedules(fused_summary) == schedules(ref_summary)
    sched = "".join(schedules(ref_summary).values())
    assert "R" in sched and sched.count("C") >= 2 * len(ref_summary.contexts)  # both outcomes exercised
    assert_clear_of_ties(ref_summary, thresh)
    assert torch.equal(fused, ref)


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="Triton interpreter runs (CPU only)")
def test_triton_kernels_in_the_model_loop(inputs):
    """The same generation with the fused ops running as Triton kernels (interpreted) instead of torch ops."""
    torch_out, torch_summary, _ = generate(inputs, True, rel_l1_thresh=0.6)
    with ops.triton_on_cpu():
        triton_out, triton_summary, _ = generate(inputs, True, rel_l1_thresh=0.6)
    assert schedules(triton_summary) == schedules(torch_summary)
    assert torch.equal(triton_out, torch_out)


@pytest.mark.parametrize("reference", [False, True], ids=["fused", "reference"])
def test_threshold_zero_is_the_uncached_model(inputs, uncached, reference):
    out, summary, _ = generate(inputs, True, rel_l1_thresh=0.0, reference=reference)
    assert torch.equal(out, uncached["cfg"])
    assert set(schedules(summary).values()) == {"C" * STEPS}


def test_counter_wraps_into_identical_generations(inputs):
    latents, cond, _ = inputs
    first, summary, model = generate(inputs, rel_l1_thresh=0.6)
    second = flow_matching_loop(model, latents, cond, STEPS)
    assert torch.equal(first, second)  # the device counter wrapped: generation 2 started from a clean state
    assert tk.summary(model).contexts["cond"].schedule == summary.contexts["cond"].schedule
    assert tk.summary(model).contexts["cond"].calls == 2 * STEPS


def test_cfg_contexts_keep_separate_state(inputs):
    """cond and uncond interleave; each must decide as if it ran alone.

    With the negative conditioning equal to the positive one, both branches see exactly the signals of a
    run without CFG, so with per-context state both schedules equal that run's. Shared state would see
    each uncond call as a repeat of the cond call before it (x = 0) and decide differently.
    """
    latents, cond, _ = inputs
    _, alone, _ = generate(inputs, rel_l1_thresh=0.6)
    model = tiny_flux_transformer(SHAPE)
    tk.enable_teacache(model, rel_l1_thresh=0.6, num_inference_steps=STEPS)
    flow_matching_loop(model, latents, cond, STEPS, negative=cond, cfg_scale=3.0)
    both = tk.summary(model)
    assert both.contexts["cond"].schedule == both.contexts["uncond"].schedule == alone.contexts["cond"].schedule
    assert [s.x for s in both.contexts["uncond"].steps][1:] == [s.x for s in alone.contexts["cond"].steps][1:]


def test_bf16_model(inputs):
    latents, cond, _ = inputs
    bf16_inputs = (latents.bfloat16(), {k: (v.bfloat16() if k.endswith("states") or k == "pooled_projections" else v) for k, v in cond.items()}, None)
    fused, fused_summary, _ = generate(bf16_inputs, model=tiny_flux_transformer(SHAPE, dtype=torch.bfloat16), rel_l1_thresh=0.6)
    ref, ref_summary, _ = generate(bf16_inputs, model=tiny_flux_transformer(SHAPE, dtype=torch.bfloat16), rel_l1_thresh=0.6, reference=True)
    assert fused.dtype == torch.bfloat16
    assert schedules(fused_summary) == schedules(ref_summary) and "R" in fused_summary.contexts["cond"].schedule
    assert torch.equal(fused, ref)


def test_new_resolution_reallocates_the_state(inputs):
    small = TinyFluxShape(height=8, width=8)
    model = tiny_flux_transformer(SHAPE)
    first, _, _ = generate(inputs, model=model, rel_l1_thresh=0.6)
    latents, cond = flux_inputs(small)
    out = flow_matching_loop(model, latents, cond, STEPS)
    ref_model = tiny_flux_transformer(SHAPE)
    tk.enable_teacache(ref_model, rel_l1_thresh=0.6, num_inference_steps=STEPS, reference=True)
    assert torch.equal(out, flow_matching_loop(ref_model, latents, cond, STEPS))
    assert tk.summary(model).contexts["cond"].schedule == tk.summary(ref_model).contexts["cond"].schedule


def test_disable_restores_the_model_bit_for_bit(inputs, uncached):
    latents, cond, negative = inputs
    model = tiny_flux_transformer(SHAPE)
    blocks, singles = model.transformer_blocks, model.single_transformer_blocks
    tk.enable_teacache(model, rel_l1_thresh=0.6, num_inference_steps=STEPS)
    cached = flow_matching_loop(model, latents, cond, STEPS, negative=negative, cfg_scale=3.0)
    assert not torch.equal(cached, uncached["cfg"])
    tk.disable_teacache(model)
    assert model.transformer_blocks is blocks and model.single_transformer_blocks is singles
    assert type(blocks) is torch.nn.ModuleList and type(singles) is torch.nn.ModuleList and len(list(singles)) == SHAPE.single_layers
    assert not hasattr(model, "_teacache") and "cache_context" not in vars(model)
    assert not model._forward_pre_hooks and not model._state_dict_hooks and not model._load_state_dict_pre_hooks
    assert torch.equal(flow_matching_loop(model, latents, cond, STEPS, negative=negative, cfg_scale=3.0), uncached["cfg"])
    tk.disable_teacache(model)  # a second disable is a no-op


def test_names_and_state_dict_are_unchanged_while_enabled(tmp_path):
    model = tiny_flux_transformer(SHAPE)
    modules, params, before = [n for n, _ in model.named_modules()], [n for n, _ in model.named_parameters()], model.state_dict()
    tk.enable_teacache(model, rel_l1_thresh=0.6, num_inference_steps=STEPS)
    latents, cond = flux_inputs(SHAPE)
    flow_matching_loop(model, latents, cond, 3)  # allocate the cache buffers
    assert [n for n, _ in model.named_modules()] == modules
    assert [n for n, _ in model.named_parameters()] == params
    during = model.state_dict()
    assert list(during) == list(before)  # same keys, same order; no cache buffers
    assert all(torch.equal(during[k], before[k]) for k in before)
    model.load_state_dict(before, strict=True)
    assert len(model.single_transformer_blocks) == SHAPE.single_layers and len(list(model.single_transformer_blocks)) == 0
    # a checkpoint saved while enabled loads into a plain model
    torch.save(during, tmp_path / "ckpt.pt")
    tiny_flux_transformer(SHAPE, seed=123).load_state_dict(torch.load(tmp_path / "ckpt.pt"), strict=True)


def test_enabling_again_updates_the_config_in_place(inputs):
    _, summary, model = generate(inputs, rel_l1_thresh=0.3)
    (span,) = model.transformer_blocks  # iterating the first list yields the cached span
    tk.enable_teacache(model, rel_l1_thresh=1.5)  # num_inference_steps kept from the first call
    assert list(model.transformer_blocks) == [span]
    latents, cond, _ = inputs
    flow_matching_loop(model, latents, cond, STEPS)
    s = tk.summary(model)
    assert s.rel_l1_thresh == 1.5
    assert s.contexts["cond"].reused_steps > summary.contexts["cond"].reused_steps


def test_controlnet_residuals_are_refused_by_name(inputs):
    latents, cond, _ = inputs
    model = tiny_flux_transformer(SHAPE)
    tk.enable_teacache(model, num_inference_steps=STEPS)
    with pytest.raises(NotImplementedError, match="does not support controlnet_block_samples"):
        model(hidden_states=latents, timestep=torch.ones(1), controlnet_block_samples=[latents], **cond)


def test_errors_name_what_is_wrong():
    model = tiny_flux_transformer(SHAPE)
    with pytest.raises(ValueError, match="num_inference_steps is required"):
        tk.enable_teacache(model)
    with pytest.raises(NotImplementedError, match="not supported for Linear yet; supported classes: .*FluxTransformer2DModel.*docs/adding_a_model.md"):
        tk.enable_teacache(torch.nn.Linear(2, 2), num_inference_steps=4)
    with pytest.raises(TypeError, match="expected a diffusers pipeline"):
        tk.enable_teacache("flux", num_inference_steps=4)
    with pytest.raises(ValueError, match="rel_l1_thresh must be a finite number >= 0, got -1"):
        tk.enable_teacache(model, rel_l1_thresh=-1, num_inference_steps=4)
    with pytest.raises(RuntimeError, match="TeaCache is not enabled"):
        tk.summary(model)


def test_summary_reports_each_call(inputs):
    _, summary, _ = generate(inputs, True, rel_l1_thresh=0.6)
    text = str(summary)
    assert "TeaCache on FluxTransformer2DModel (fused; coefficients flux; rel_l1_thresh 0.6)" in text
    for name in ("cond", "uncond"):
        c = summary.contexts[name]
        assert len(c.steps) == STEPS and c.computed_steps + c.reused_steps == STEPS
        assert f"{name}" in text and c.schedule in text
        assert c.steps[0].reused is False and math.isnan(c.steps[0].x)
    table = summary.table("cond")
    assert len(table.splitlines()) == STEPS + 1 and "reused" in table
    assert summary.as_dict()["contexts"]["cond"]["schedule"] == summary.contexts["cond"].schedule


def test_a_new_shape_mid_generation_gets_its_own_state_in_both_implementations():
    """5 calls into a 20-call generation, then another resolution for 20 calls, then the first again: each shape has
    its own state (under compile, each its own graph and buffers: switching never recompiles). The new shape's
    starts fresh; the first shape's picks up where it was (call 6 of its generation). Fused == reference."""
    small = TinyFluxShape(height=8, width=8)
    runs = {}
    for reference in (False, True):
        model = tiny_flux_transformer(SHAPE)
        tk.enable_teacache(model, rel_l1_thresh=0.6, num_inference_steps=STEPS, reference=reference)
        latents, cond = flux_inputs(SHAPE)
        flow_matching_loop(model, latents, cond, 5)
        small_latents, small_cond = flux_inputs(small)
        out = flow_matching_loop(model, small_latents, small_cond, STEPS)
        flow_matching_loop(model, latents, cond, 3)
        runs[reference] = out, {n: c.schedule for n, c in tk.summary(model).contexts.items()}
    (out, ours), (expected, theirs) = runs[False], runs[True]
    assert ours == theirs and torch.equal(out, expected)
    other = next(name for name in ours if name.startswith("cond@"))
    assert other == "cond@1x16x64|1x16x64" or "x" in other.split("@")[1]  # named by its shapes
    assert ours[other][0] == "C" and len(ours[other]) == STEPS  # fresh, a whole generation
    assert len(ours["cond"]) == 8 and "R" in ours["cond"]  # 5 + 3 calls of one generation


def test_summary_table_names_unknown_contexts(inputs):
    _, summary, _ = generate(inputs, rel_l1_thresh=0.6)
    with pytest.raises(KeyError, match=r"no calls recorded in context 'uncond'; contexts: \['cond'\]"):
        summary.table("uncond")


def test_reset_with_a_new_step_count(inputs):
    latents, cond, _ = inputs
    _, _, model = generate(inputs, rel_l1_thresh=0.6)
    tk.reset_teacache(model, num_inference_steps=8)
    flow_matching_loop(model, latents, cond, 8)
    steps = tk.summary(model).contexts["cond"].steps
    assert len(steps) == 8 and not steps[-1].reused  # the new last call is forced
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1, got 0"):
        tk.reset_teacache(model, num_inference_steps=0)


def test_warmup_and_cooldown_in_the_model(inputs):
    out, summary, _ = generate(inputs, rel_l1_thresh=50.0, warmup_steps=3, cooldown_steps=2)
    ref, ref_summary, _ = generate(inputs, rel_l1_thresh=50.0, warmup_steps=3, cooldown_steps=2, reference=True)
    assert summary.contexts["cond"].schedule == ref_summary.contexts["cond"].schedule == "CCC" + "R" * (STEPS - 5) + "CC"
    assert torch.equal(out, ref)


def test_an_instance_cache_context_is_wrapped_then_restored():
    """A cache_context someone installed on the instance keeps working while enabled and is put back after."""
    import contextlib

    model = tiny_flux_transformer(SHAPE)
    seen, class_method = [], model.cache_context

    @contextlib.contextmanager
    def mine(name, **kwargs):
        seen.append(name)
        with class_method(name, **kwargs):
            yield

    model.cache_context = mine
    tk.enable_teacache(model, num_inference_steps=4)
    latents, cond = flux_inputs(SHAPE)
    with model.cache_context("uncond"):
        model(hidden_states=latents, timestep=torch.ones(1), **cond)
    assert seen == ["uncond"] and "uncond" in tk.summary(model).contexts
    tk.disable_teacache(model)
    assert model.cache_context is mine
