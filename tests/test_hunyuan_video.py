"""HunyuanVideo (HunyuanVideoTransformer3DModel) on a tiny random-weight model and a tiny HunyuanVideoPipeline.

As tests/test_families.py: the fused path against `reference=True` (same schedules, bit-identical outputs),
threshold 0 against the plain model, disable, LoRA and attention processors while enabled, and the compiled
model (one graph, no recompile after a warm-up, within the FLUX compile budget). Plus what this family adds:
the rotary embedding reaches the single-stream blocks (the generic span would pass it under the double
blocks' name `freqs_cis`, which the single blocks ignore), and the token-replace blocks are refused by name.
"""

from dataclasses import replace

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels.models.base import BlockSpan
from teacache_kernels.models.hunyuan_video import HUNYUAN_VIDEO

from test_families import assert_clear_of_ties, names, schedules

TEXT_DIM, POOLED_DIM = 16, 8
STEPS = (10, 7)  # two generations, the second with another step count


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def transformer(seed: int = 0, **config):
    from diffusers import HunyuanVideoTransformer3DModel

    args = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 2, 4))  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HunyuanVideoTransformer3DModel(**{**args, **config}).eval()


def _mask(length, valid):
    m = torch.zeros(1, length)
    m[:, :valid] = 1
    return m


def conditioning(seed: int):
    return dict(encoder_hidden_states=_randn(1, 7, TEXT_DIM, seed=seed), encoder_attention_mask=_mask(7, 5 if seed == 2 else 3),
                pooled_projections=_randn(1, POOLED_DIM, seed=seed + 10), guidance=torch.tensor([6000.0]))  # fmt: skip


def transformer_call(seed: int = 1) -> dict:
    return dict(hidden_states=_randn(1, 4, 3, 4, 4, seed=seed), timestep=torch.tensor([700.0]), return_dict=False,
                **conditioning(2))  # fmt: skip


def euler_loop(model, steps: int, cfg: bool = True, cfg_scale: float = 4.0):
    """HunyuanVideoPipeline's loop without its scheduler's shift: Euler from sigma 1 to 0, timestep = 1000 sigma,
    the "cond" call in cache_context("cond") and, with true CFG, the "uncond" call in ("uncond")."""
    cond, uncond = conditioning(2), conditioning(3)
    x = _randn(1, 4, 3, 4, 4, seed=0)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = (sigmas[i : i + 1] * 1000).to(x.dtype)
            with model.cache_context("cond"):
                v = model(hidden_states=x, timestep=t, return_dict=False, **cond)[0]
            if cfg:
                with model.cache_context("uncond"):
                    v_neg = model(hidden_states=x, timestep=t, return_dict=False, **uncond)[0]
                v = v_neg + cfg_scale * (v - v_neg)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def generate(model, steps: int, cfg: bool = True):
    if getattr(model, "_teacache", None) is not None or hasattr(model, "_orig_mod"):
        tk.reset_teacache(model, num_inference_steps=steps)  # a new generation on a bare transformer
    return euler_loop(model, steps, cfg)


CASES = [dict(rel_l1_thresh=t) for t in (0.1, 0.3, 0.6)]


def test_family_is_served_with_the_published_set():
    model = transformer()
    tk.enable_teacache(model, num_inference_steps=4)
    s = tk.summary(model)
    assert (s.coefficients, s.rel_l1_thresh) == ("hunyuan-video", 0.15)


def test_rotary_embedding_reaches_the_single_blocks():
    """Threshold 0 equals the plain model only because the span passes the rotary embedding under both
    names; the generic span, calling every block by block 0's names, loses it in the single blocks."""
    call = transformer_call()
    with torch.no_grad():
        expected = transformer()(**call)[0]
        for span_class, equal in ((None, True), (BlockSpan, False)):
            family = HUNYUAN_VIDEO if span_class is None else replace(HUNYUAN_VIDEO, span_class=span_class)
            tk.register_model(family)
            try:
                model = transformer()
                tk.enable_teacache(model, num_inference_steps=4, rel_l1_thresh=0.0)
                assert torch.equal(model(**call)[0], expected) is equal
            finally:
                tk.register_model(HUNYUAN_VIDEO)


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c["rel_l1_thresh"]))
def test_fused_matches_reference_over_two_generations(case):
    fused, ref = transformer(), transformer()
    tk.enable_teacache(fused, num_inference_steps=STEPS[0], **case)
    tk.enable_teacache(ref, num_inference_steps=STEPS[0], reference=True, **case)
    seen = ""
    for steps in STEPS:
        out, expected = generate(fused, steps), generate(ref, steps)
        assert schedules(fused) == schedules(ref), (case, steps)
        assert set(schedules(fused)) == {"cond", "uncond"}
        assert all(len(s) == steps and s[0] == s[-1] == "C" for s in schedules(fused).values())  # first, last forced
        assert torch.equal(out, expected), (case, steps)
        assert_clear_of_ties(tk.summary(ref), case["rel_l1_thresh"])
        seen += "".join(s[1:-1] for s in schedules(fused).values())


def test_the_cases_exercise_both_outcomes():
    seen = ""
    for case in CASES:
        model = transformer()
        tk.enable_teacache(model, num_inference_steps=STEPS[0], **case)
        generate(model, STEPS[0])
        seen += "".join(s[1:-1] for s in schedules(model).values())
    assert "R" in seen and "C" in seen, seen


def test_threshold_zero_is_the_uncached_model():
    cached, plain = transformer(), transformer()
    tk.enable_teacache(cached, num_inference_steps=6, rel_l1_thresh=0.0)
    assert torch.equal(generate(cached, 6), euler_loop(plain, 6))
    assert all(s == "C" * 6 for s in schedules(cached).values())


def test_disable_restores_the_model_bit_for_bit():
    model, plain = transformer(), transformer()
    before = names(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    expected = euler_loop(plain, 8)
    tk.enable_teacache(model, num_inference_steps=8, **CASES[-1])
    assert names(model) == before
    assert not torch.equal(generate(model, 8), expected)
    tk.disable_teacache(model)
    assert names(model) == before and {n: type(m) for n, m in model.named_modules()} == classes
    assert torch.equal(euler_loop(model, 8), expected)


def test_lora_round_trip_and_attention_processors_while_enabled(tmp_path):
    peft = pytest.importorskip("peft")
    call = transformer_call()
    plain, enabled = transformer(), transformer()
    tk.enable_teacache(enabled, num_inference_steps=4, rel_l1_thresh=0.0, coefficients=[1.0, 0.0])
    for model in (plain, enabled):
        torch.manual_seed(0)
        model.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
        model.set_attn_processor({name: type(p)() for name, p in model.attn_processors.items()})
    assert names(enabled) == names(plain)
    with torch.no_grad():
        expected = plain(**call)[0]
        assert not torch.equal(expected, transformer()(**call)[0])  # the adapter is in the computation
        assert torch.equal(enabled(**call)[0], expected)
    enabled.save_lora_adapter(tmp_path, weight_name="lora.safetensors")
    fresh = transformer()
    tk.enable_teacache(fresh, num_inference_steps=4, rel_l1_thresh=0.0, coefficients=[1.0, 0.0])
    fresh.load_lora_adapter(tmp_path, weight_name="lora.safetensors", prefix=None)
    with torch.no_grad():
        assert torch.equal(fresh(**call)[0], expected)


def test_token_replace_blocks_are_refused_by_name():
    model = transformer(image_condition_type="token_replace")
    with pytest.raises(NotImplementedError, match="token_replace"):
        tk.enable_teacache(model, num_inference_steps=4)
    assert type(model.transformer_blocks) is torch.nn.ModuleList  # nothing was installed


def test_latent_concat_variant_is_served():
    """HunyuanVideo-I2V's latent_concat variant: the ordinary blocks, more input channels."""
    call = dict(transformer_call(), hidden_states=_randn(1, 9, 3, 4, 4, seed=1))
    plain, model = transformer(in_channels=9, image_condition_type="latent_concat"), transformer(in_channels=9, image_condition_type="latent_concat")
    tk.enable_teacache(model, num_inference_steps=4, rel_l1_thresh=0.0)
    with torch.no_grad():
        assert torch.equal(model(**call)[0], plain(**call)[0])


# -- the pipeline ---------------------------------------------------------------------------------------------


def pipeline(seed: int = 0):
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4).eval()  # fmt: skip
    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer(seed), vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None)  # fmt: skip


def pipeline_generate(pipe, steps: int, cfg: bool = True):
    cond, uncond = conditioning(2), conditioning(3)
    kw = dict(prompt_embeds=cond["encoder_hidden_states"], prompt_attention_mask=cond["encoder_attention_mask"],
              pooled_prompt_embeds=cond["pooled_projections"])  # fmt: skip
    if cfg:
        kw.update(negative_prompt_embeds=uncond["encoder_hidden_states"], true_cfg_scale=4.0,
                  negative_prompt_attention_mask=uncond["encoder_attention_mask"],
                  negative_pooled_prompt_embeds=uncond["pooled_projections"])  # fmt: skip
    return pipe(**kw, height=32, width=32, num_frames=9, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0)).frames  # fmt: skip


@pytest.mark.parametrize("cfg", [True, False], ids=["true-cfg", "embedded-guidance"])
def test_pipeline_fused_matches_reference(cfg):
    fused, ref = pipeline(), pipeline()
    tk.enable_teacache(fused, rel_l1_thresh=0.3)
    tk.enable_teacache(ref, rel_l1_thresh=0.3, reference=True)
    for steps in STEPS:
        out, expected = pipeline_generate(fused, steps, cfg), pipeline_generate(ref, steps, cfg)
        assert schedules(fused) == schedules(ref) and torch.equal(out, expected)
        assert set(schedules(fused)) == ({"cond", "uncond"} if cfg else {"cond"})
        assert all(len(s) == steps and s[0] == s[-1] == "C" for s in schedules(fused).values())
    assert "R" in "".join(schedules(fused).values())
    plain, zero = pipeline(), pipeline()
    tk.enable_teacache(zero, rel_l1_thresh=0.0)
    assert torch.equal(pipeline_generate(zero, 6, cfg), pipeline_generate(plain, 6, cfg))


# -- compile --------------------------------------------------------------------------------------------------


def breaks(model, call):
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**call)
    torch._dynamo.reset()
    return explained.graph_break_count


@pytest.mark.slow
def test_compiled_pipeline_matches_eager_without_recompiles():
    """fullgraph=True, one warm-up generation, then no recompile across generations, step counts and CFG branches;
    compiled vs the eager reference within twice what compiling changes in the uncached pipeline + 1e-6 of scale."""
    call = transformer_call()
    enabled_model = transformer()
    tk.enable_teacache(enabled_model, num_inference_steps=4)
    assert breaks(enabled_model, call) == 0

    case = dict(rel_l1_thresh=0.3)
    pipe, ref, plain = pipeline(), pipeline(), pipeline()
    tk.enable_teacache(pipe, **case)
    tk.enable_teacache(ref, reference=True, **case)
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    pipeline_generate(pipe, 6)  # warm-up
    plain_eager = pipeline_generate(plain, 8)
    plain.transformer = torch.compile(plain.transformer, fullgraph=True)
    compile_error = (pipeline_generate(plain, 8) - plain_eager).abs().max().item()
    scale = plain_eager.abs().max().item()
    seen = ""
    with torch._dynamo.config.patch(error_on_recompile=True):
        for steps in (8, 5):
            out, expected = pipeline_generate(pipe, steps), pipeline_generate(ref, steps)
            assert schedules(pipe) == schedules(ref)
            seen += "".join(s[1:-1] for s in schedules(pipe).values())
            error = (out - expected).abs().max().item()
            assert error <= 2 * compile_error + 1e-6 * scale, (steps, error, compile_error)
    assert "R" in seen and "C" in seen, seen
