"""enable_teacache(pipe) on a real diffusers FluxPipeline built from tiny components (nothing downloads).

Text encoders are bypassed with prompt_embeds; the transformer and the VAE are real, tiny, random.
True CFG (negative_prompt_embeds, true_cfg_scale > 1) makes the pipeline call the transformer in the
"cond" and "uncond" cache contexts. Eager error budget: zero (bitwise), as in test_flux.py.
"""

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels.tiny_models import TinyFluxShape, tiny_flux_pipeline, tiny_flux_prompt

SHAPE = TinyFluxShape()
PIXELS = 2 * SHAPE.height  # the tiny VAE downsamples by 2


def call(pipe, steps, output_type="latent", cfg=True):
    prompt, negative = tiny_flux_prompt(SHAPE), tiny_flux_prompt(SHAPE, seed=3)
    extra = dict(negative_prompt_embeds=negative["prompt_embeds"], negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"], true_cfg_scale=3.0) if cfg else {}
    return pipe(
        **prompt, **extra, num_inference_steps=steps, height=PIXELS, width=PIXELS, output_type=output_type,
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip


def schedules(pipe):
    return {n: c.schedule for n, c in tk.summary(pipe).contexts.items()}


def test_pipeline_learns_steps_and_matches_reference():
    fused, ref = tiny_flux_pipeline(SHAPE), tiny_flux_pipeline(SHAPE)
    tk.enable_teacache(fused, rel_l1_thresh=0.6)
    tk.enable_teacache(ref, rel_l1_thresh=0.6, reference=True)
    for steps in (12, 7):  # a new call, a new step count: learned from the scheduler, state reset
        a, b = call(fused, steps), call(ref, steps)
        assert torch.equal(a, b)
        assert schedules(fused) == schedules(ref)
        s = tk.summary(fused)
        assert set(s.contexts) == {"cond", "uncond"}
        assert all(len(c.steps) == steps for c in s.contexts.values())
        assert all(c.steps[0].reused is False and c.steps[-1].reused is False for c in s.contexts.values())
    assert "R" in schedules(fused)["cond"]


def test_disable_restores_pipeline_and_scheduler_bit_for_bit():
    pipe, untouched = tiny_flux_pipeline(SHAPE), tiny_flux_pipeline(SHAPE)
    expected = call(untouched, 10)
    tk.enable_teacache(pipe, rel_l1_thresh=0.6)
    assert {"set_timesteps", "set_begin_index"} <= set(vars(pipe.scheduler))  # followed by instance attributes
    assert not torch.equal(call(pipe, 10), expected)
    tk.disable_teacache(pipe)
    assert not {"set_timesteps", "set_begin_index"} & set(vars(pipe.scheduler))  # the class methods again
    assert torch.equal(call(pipe, 10), expected)


def test_disable_after_the_pipeline_swapped_its_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_flux_pipeline(SHAPE)
    tk.enable_teacache(pipe, rel_l1_thresh=0.6)
    patched = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    tk.disable_teacache(pipe)
    assert not {"set_timesteps", "set_begin_index"} & set(vars(patched))


def test_kontext_pipeline_defaults_to_the_kontext_coefficients():
    from diffusers import FluxKontextPipeline

    pipe = tiny_flux_pipeline(SHAPE, pipeline_class=FluxKontextPipeline)
    tk.enable_teacache(pipe)
    assert tk.summary(pipe).coefficients == "flux-kontext" and tk.summary(pipe).rel_l1_thresh == 0.22
    tk.enable_teacache(pipe.transformer, rel_l1_thresh=0.3)  # updating through the transformer keeps the set
    assert tk.summary(pipe).coefficients == "flux-kontext" and tk.summary(pipe).rel_l1_thresh == 0.3
    plain = tiny_flux_pipeline(SHAPE)
    tk.enable_teacache(plain)
    assert tk.summary(plain).coefficients == "flux" and tk.summary(plain).rel_l1_thresh == 0.4


@pytest.mark.slow
def test_compiled_pipeline_end_to_end():
    pipe, ref = tiny_flux_pipeline(SHAPE), tiny_flux_pipeline(SHAPE)
    tk.enable_teacache(pipe, rel_l1_thresh=0.6)
    tk.enable_teacache(ref, rel_l1_thresh=0.6, reference=True)
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    call(pipe, 8)  # warm-up: compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        for steps in (12, 9):  # a new step count is written on the device: no recompile
            out = call(pipe, steps)
            expected = call(ref, steps)
            assert schedules(pipe) == schedules(ref)
            assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
        images = call(pipe, 9, output_type="pil")
    assert images[0].size == (PIXELS, PIXELS)
    assert "uncond" in str(tk.summary(pipe))
    tk.disable_teacache(pipe)  # works through the compiled wrapper too
    assert not hasattr(pipe.transformer._orig_mod, "_teacache")


def test_a_replaced_scheduler_is_followed():
    """Users swap schedulers (`pipe.scheduler = X.from_config(...)`): the new one must drive the generations."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe, ref = tiny_flux_pipeline(SHAPE), tiny_flux_pipeline(SHAPE)
    tk.enable_teacache(pipe, rel_l1_thresh=0.6)
    tk.enable_teacache(ref, rel_l1_thresh=0.6, reference=True)
    call(pipe, 12, cfg=False)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    for steps in (20, 5):
        out, expected = call(pipe, steps, cfg=False), call(ref, steps, cfg=False)
        cond = tk.summary(pipe).contexts["cond"]
        assert len(cond.steps) == steps and cond.schedule[-1] == "C"  # counted from the new scheduler; last forced
        assert torch.equal(out, expected)


def test_switching_to_the_reference_keeps_the_pipeline():
    pipe = tiny_flux_pipeline(SHAPE)
    tk.enable_teacache(pipe)  # the coefficient set's default threshold
    call(pipe, 8)
    with pytest.raises(ValueError, match="rel_l1_thresh is required with explicit coefficients"):
        tk.enable_teacache(pipe, reference=True, coefficients=[1.0, 0.0])  # invalid: nothing may change
    assert tk.summary(pipe).implementation == "fused" and "set_timesteps" in vars(pipe.scheduler)
    tk.enable_teacache(pipe.transformer, reference=True)  # no num_inference_steps needed: the pipeline is known
    call(pipe, 9)
    s = tk.summary(pipe)
    assert s.implementation == "reference" and all(len(c.steps) == 9 for c in s.contexts.values())
    tk.enable_teacache(pipe, rel_l1_thresh=0.3)  # updating a field keeps the implementation the model has
    assert tk.summary(pipe).implementation == "reference" and tk.summary(pipe).rel_l1_thresh == 0.3
    tk.enable_teacache(pipe, reference=False)
    assert tk.summary(pipe).implementation == "fused"


def test_summary_shows_the_contexts_of_the_latest_generation():
    pipe = tiny_flux_pipeline(SHAPE)
    tk.enable_teacache(pipe, rel_l1_thresh=0.6)
    call(pipe, 10, cfg=True)
    call(pipe, 6, cfg=False)
    s = tk.summary(pipe)
    assert list(s.contexts) == ["cond"] and len(s.contexts["cond"].steps) == 6
    assert s.calls == 2 * 10 + 6  # lifetime, all contexts


def test_num_inference_steps_given_with_a_pipeline_warns():
    with pytest.warns(UserWarning, match="learned from the pipeline's scheduler"):
        tk.enable_teacache(tiny_flux_pipeline(SHAPE), num_inference_steps=12)


def test_a_diffusers_cache_already_enabled_is_refused():
    from diffusers import FirstBlockCacheConfig

    pipe = tiny_flux_pipeline(SHAPE)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(RuntimeError, match="FirstBlockCacheConfig.*disable_cache"):
        tk.enable_teacache(pipe)
