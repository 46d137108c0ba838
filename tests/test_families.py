"""Qwen-Image, Lumina2, CogVideoX and Mochi: each family on its real (tiny, random) diffusers pipeline.

The reference is `enable_teacache(..., reference=True)`: the eager oracle driving the same span with Python
branches. Eager error budget: zero, as for FLUX (tests/test_flux.py): the fused path does the same float
operations in the same order. Compiled: the FLUX budget (tests/test_compile.py), twice what compiling
changes in the uncached model plus 1e-6 of the output's scale. Fidelity to each family's original script
is tests/test_fidelity.py.
"""

import math

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels.tiny_families import TINY, cogvideox_transformer

from _compiled import check_compiled_pipeline, graph_breaks

# Thresholds (and, where the published set's schedule is all reuse on a random model, a second polynomial)
# that give computed and reused calls on each tiny model.
CASES = {
    "qwen-image": [dict(rel_l1_thresh=t) for t in (0.1, 0.3, 0.6)],
    "lumina2": [dict(rel_l1_thresh=t) for t in (0.3, 0.7)] + [dict(rel_l1_thresh=0.4, coefficients="lumina2-v2")],
    "cogvideox": [dict(rel_l1_thresh=0.3)] + [dict(rel_l1_thresh=t, coefficients=[1.0, 0.0]) for t in (0.5, 1.2)],
    "mochi": [dict(rel_l1_thresh=t) for t in (0.1, 0.3, 1.0)],
    "hunyuan-video": [dict(rel_l1_thresh=t) for t in (0.1, 0.3, 0.6)],
}
STEPS = (10, 7)  # two generations, the second with another step count
# The families run here; the others of TINY have a test file of their own (tests/test_<family>.py).
FAMILIES = [name for name in TINY if name in CASES]


def schedules(pipe_or_model):
    return {name: c.schedule for name, c in tk.summary(pipe_or_model).contexts.items()}


def assert_clear_of_ties(summary, thresh):
    for ctx in summary.contexts.values():
        acc = 0.0
        for s in ctx.steps:
            if not math.isnan(s.y) and s.step not in (0, len(ctx.steps) - 1):
                assert abs(acc + s.y - thresh) > 1e-6 * max(thresh, 1e-3), f"{ctx.name} step {s.step}: near tie"
            acc = s.acc


def names(model):
    return [n for n, _ in model.named_modules()], list(model.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_matches_reference_over_two_generations(family):
    fam = TINY[family]
    seen = ""
    for case in CASES[family]:
        fused, ref = fam.pipeline(), fam.pipeline()
        tk.enable_teacache(fused, **case)
        tk.enable_teacache(ref, reference=True, **case)
        for steps in STEPS:
            out, expected = fam.generate(fused, steps), fam.generate(ref, steps)
            assert schedules(fused) == schedules(ref), (case, steps)
            assert set(schedules(fused)) == set(fam.contexts)
            assert all(len(s) == steps and s[0] == s[-1] == "C" for s in schedules(fused).values())  # first, last forced
            assert torch.equal(out, expected), (case, steps)
            assert_clear_of_ties(tk.summary(ref), case["rel_l1_thresh"])
            seen += "".join(s[1:-1] for s in schedules(fused).values())
    assert "R" in seen and "C" in seen, f"{family}: the cases exercise only one outcome ({seen})"


@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_zero_is_the_uncached_pipeline(family):
    fam = TINY[family]
    cached, plain = fam.pipeline(), fam.pipeline()
    tk.enable_teacache(cached, rel_l1_thresh=0.0)
    assert torch.equal(fam.generate(cached, 6), fam.generate(plain, 6))
    assert all(s == "C" * 6 for s in schedules(cached).values())


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_restores_the_pipeline_bit_for_bit(family):
    fam = TINY[family]
    pipe, plain = fam.pipeline(), fam.pipeline()
    before = names(pipe.transformer)
    classes = {n: type(m) for n, m in pipe.transformer.named_modules()}
    expected = fam.generate(plain, 8)
    tk.enable_teacache(pipe, **CASES[family][-1])
    assert names(pipe.transformer) == before  # enabled: same names
    assert not torch.equal(fam.generate(pipe, 8), expected)
    tk.disable_teacache(pipe)
    assert names(pipe.transformer) == before and {n: type(m) for n, m in pipe.transformer.named_modules()} == classes
    assert torch.equal(fam.generate(pipe, 8), expected)


def set_processors(model):
    """Fresh attention processors, addressed by the model's module names."""
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor({name: type(p)() for name, p in model.attn_processors.items()})
        return
    # Lumina2Transformer2DModel has no AttentionMixin: set them module by module, by name.
    for name in [n for n, m in model.named_modules() if hasattr(m, "set_processor")]:
        module = model.get_submodule(name)
        module.set_processor(type(module.processor)())


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_round_trip_and_attention_processors_while_enabled(family, tmp_path):
    peft = pytest.importorskip("peft")
    fam = TINY[family]
    call = fam.transformer_call()
    plain, enabled = fam.transformer(), fam.transformer()
    tk.enable_teacache(enabled, num_inference_steps=4, rel_l1_thresh=0.0, coefficients=[1.0, 0.0])
    for model in (plain, enabled):
        torch.manual_seed(0)
        model.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
        set_processors(model)
    assert names(enabled) == names(plain)
    with torch.no_grad():
        expected = plain(**call)[0]
        assert torch.equal(enabled(**call)[0], expected)
    enabled.save_lora_adapter(tmp_path, weight_name="lora.safetensors")
    fresh = fam.transformer()
    tk.enable_teacache(fresh, num_inference_steps=4, rel_l1_thresh=0.0, coefficients=[1.0, 0.0])
    fresh.load_lora_adapter(tmp_path, weight_name="lora.safetensors", prefix=None)
    with torch.no_grad():
        assert torch.equal(fresh(**call)[0], expected)  # the saved file held every adapter weight


def test_qwen_image_controlnet_residuals_are_refused_by_name():
    fam = TINY["qwen-image"]
    model = fam.transformer()
    tk.enable_teacache(model, num_inference_steps=4)
    call = fam.transformer_call()
    with pytest.raises(NotImplementedError, match="does not support controlnet_block_samples"):
        model(**call, controlnet_block_samples=[call["hidden_states"]])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_wrong_coefficient_set_is_named(family):
    with pytest.raises(ValueError, match="unknown coefficient set 'qwen-imag'; known sets: .*qwen-image"):
        tk.enable_teacache(TINY[family].transformer(), num_inference_steps=4, coefficients="qwen-imag")


def test_default_coefficients_per_family():
    expected = {"qwen-image": ("qwen-image", 0.2), "lumina2": ("lumina2", 0.3), "mochi": ("mochi", 0.06)}
    for family, (name, thresh) in expected.items():
        pipe = TINY[family].pipeline()
        tk.enable_teacache(pipe)
        assert (tk.summary(pipe).coefficients, tk.summary(pipe).rel_l1_thresh) == (name, thresh)
    cached = TINY["qwen-image"].pipeline()
    tk.enable_teacache(cached)
    config = cached.transformer._teacache.cache.config
    assert config.abs_rescaled and config.denominator_eps == 1e-8  # vLLM-Omni's rule comes with the set


@pytest.mark.parametrize(
    "variant, pipeline, expected",
    [
        ("2b", None, "cogvideox-2b"),
        ("5b", None, "cogvideox-5b"),
        ("5b-i2v", "CogVideoXImageToVideoPipeline", "cogvideox-5b"),
        ("1.5-5b", None, "cogvideox1.5-5b"),
        ("1.5-5b", "CogVideoXImageToVideoPipeline", "cogvideox1.5-5b-i2v"),
        ("1.5-5b-i2v", None, "cogvideox1.5-5b-i2v"),
    ],
)
def test_cogvideox_set_is_picked_from_the_config(variant, pipeline, expected):
    from teacache_kernels.models.cogvideox import COGVIDEOX

    pipe = type(pipeline, (), {})() if pipeline else None
    assert COGVIDEOX.coefficients_for(cogvideox_transformer(variant=variant), pipe) == expected


def test_lumina2_keeps_state_per_sequence_length_without_a_context():
    fam = TINY["lumina2"]
    pipe = fam.pipeline()
    tk.enable_teacache(pipe, rel_l1_thresh=0.5)
    fam.generate(pipe, 8)
    contexts = tk.summary(pipe).contexts
    assert set(contexts) == {"seq21", "seq17"} and all(len(c.steps) == 8 for c in contexts.values())
    fam.generate(pipe, 6, cfg=False)  # only the prompt's length runs: its state alone, a new generation
    assert {n: len(c.steps) for n, c in tk.summary(pipe).contexts.items()} == {"seq21": 6}


def test_mochi_norm_out_runs_inside_the_span_while_enabled():
    fam = TINY["mochi"]
    model = fam.transformer()
    norm_class = type(model.norm_out)
    tk.enable_teacache(model, num_inference_steps=4)
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    x, temb = torch.randn(2, 5, inner), torch.randn(2, inner)
    assert model.norm_out(x, temb) is x  # the transformer's own call passes the stream through
    tk.disable_teacache(model)
    assert type(model.norm_out) is norm_class and model.norm_out(x, temb) is not x


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["edit", "edit-2511"])
def test_qwen_image_edit_sequence(zero_cond_t):
    """What the Edit pipelines pass: the condition image's latents concatenated to the sequence, img_shapes
    naming both; with zero_cond_t (Edit-2511) the blocks get a modulate_index, which the signal uses too."""
    from teacache_kernels.tiny_families import qwen_image_transformer

    fam = TINY["qwen-image"]
    call = fam.transformer_call()
    condition = torch.randn_like(call["hidden_states"])
    outs, summaries = [], []
    for reference in (False, True):
        model = qwen_image_transformer(zero_cond_t=zero_cond_t)
        tk.enable_teacache(model, num_inference_steps=6, rel_l1_thresh=0.3, reference=reference)
        x, results = call["hidden_states"], []
        with torch.no_grad():
            for step in range(6):
                joint = torch.cat([x, condition], dim=1)
                kwargs = dict(call, hidden_states=joint, img_shapes=[[(1, 4, 4), (1, 4, 4)]], timestep=torch.full((1,), 1.0 - step / 6))
                v = model(**kwargs)[0][:, : x.shape[1]]  # the pipeline keeps the target's tokens
                x = x - v / 6
                results.append(x)
        outs.append(torch.stack(results))
        summaries.append(tk.summary(model).contexts["default"].schedule)
    assert summaries[0] == summaries[1] and "R" in summaries[0]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.slow
def test_qwen_image_edit_pipeline():
    """The real QwenImageEditPipeline (it resizes the condition image to ~1 MP: 16384 tokens, slow on a CPU)."""
    from diffusers import QwenImageEditPipeline
    from PIL import Image

    from teacache_kernels.tiny_families import qwen_image_pipeline

    fam = TINY["qwen-image"]
    fused, ref = qwen_image_pipeline(pipeline_class=QwenImageEditPipeline), qwen_image_pipeline(pipeline_class=QwenImageEditPipeline)
    tk.enable_teacache(fused, rel_l1_thresh=0.3)
    tk.enable_teacache(ref, rel_l1_thresh=0.3, reference=True)
    image = Image.new("RGB", (32, 32), (120, 80, 40))
    out, expected = fam.generate(fused, 3, image=image), fam.generate(ref, 3, image=image)
    assert schedules(fused) == schedules(ref) and torch.equal(out, expected)
    assert set(schedules(fused)) == {"cond", "uncond"}


# -- compile --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_pipeline_matches_eager_without_recompiles(family):
    """fullgraph=True (Lumina2: diffusers' own forward cannot, so no break beyond the plain model's), one
    warm-up generation, then no recompile across generations, step counts and CFG branches."""
    fam = TINY[family]
    call = fam.transformer_call()
    plain_model, enabled_model = fam.transformer(), fam.transformer()
    plain_breaks = graph_breaks(plain_model, call)  # before enabling: a family's dynamo_config is held while enabled
    tk.enable_teacache(enabled_model, num_inference_steps=4)
    fullgraph = family != "lumina2"
    if family == "lumina2":  # reads sequence lengths from the mask on the host; TeaCache adds nothing
        assert graph_breaks(enabled_model, call) == plain_breaks > 0
    else:  # mochi: 0 too, with capture_dynamic_output_shape_ops held while enabled (the plain model breaks
        assert graph_breaks(enabled_model, call) == 0  # at its torch.nonzero unless compiled with fullgraph=True)

    check_compiled_pipeline(family, fam.pipeline, fam.generate, CASES[family][-1], fullgraph=fullgraph)


@pytest.mark.slow
def test_lumina2_span_compiles_fullgraph():
    """diffusers' Lumina2 forward breaks the graph on the host; the cached span itself does not."""
    fam = TINY["lumina2"]
    model = fam.transformer()
    tk.enable_teacache(model, num_inference_steps=4, rel_l1_thresh=0.5)
    (span,) = model.layers
    captured = {}
    span.register_forward_pre_hook(lambda m, args, kwargs: captured.update(args=args, kwargs=kwargs), with_kwargs=True)
    with torch.no_grad():
        model(**fam.transformer_call())
        explained = torch._dynamo.explain(span)(*captured["args"], **captured["kwargs"])
    assert explained.graph_break_count == 0 and explained.graph_count == 1
