"""Cosmos (CosmosTransformer3DModel) on a tiny random-weight model and a tiny CosmosTextToWorldPipeline.

diffusers' Cosmos pipelines call the transformer for cond and uncond without `cache_context`, so TeaCache refuses
them (models/cosmos.py); the family is served on the bare transformer, called per branch in its cache context.
The loop that does so (`cosmos_loop`, the pipeline's own loop) is checked against the real pipeline bit for bit.
As tests/test_hunyuan_video.py: the fused path against `reference=True`, threshold 0 against the plain model,
disable, LoRA, the compiled model. Plus: fidelity to the port of TeaCache4Cosmos (tests/originals/cosmos.py),
the refusals, and a measurement of what one shared state would do on the real pipeline (why it is refused).
"""

from dataclasses import replace

import pytest
import torch
from originals import cosmos as original
from test_families import assert_clear_of_ties, names, schedules, set_processors
from test_fidelity import STEPS as FIDELITY_STEPS
from test_fidelity import Family, compare_decisions, package_schedules

import teacache_kernels as tk
from teacache_kernels.models.base import BlockSpan
from teacache_kernels.models.cosmos import COSMOS
from teacache_kernels.tiny_families.cosmos import (
    cosmos_call,
    cosmos_generate,
    cosmos_loop,
    cosmos_pipeline,
    cosmos_transformer,
    prompts,
)

STEPS = (10, 7)  # two generations, the second with another step count
CASES = [dict(rel_l1_thresh=t) for t in (0.2, 0.3, 0.5)]  # the published set (a tiny model has no default)
SET = dict(coefficients="cosmos-7b")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def generate(model, steps: int, cfg: bool = True):
    if getattr(model, "_teacache", None) is not None or hasattr(model, "_orig_mod"):
        tk.reset_teacache(model, num_inference_steps=steps)  # a new generation on a bare transformer
    return cosmos_loop(model, steps, cfg)


def enabled(reference=False, num_layers=2, **case):
    model = cosmos_transformer(num_layers=num_layers)
    tk.enable_teacache(model, num_inference_steps=STEPS[0], reference=reference, **SET, **case)
    return model


# -- the family -----------------------------------------------------------------------------------------------


def test_the_7b_configuration_gets_the_published_set():
    """diffusers' defaults are Cosmos-1.0-Diffusion-7B's config; other sizes have no default set (on meta: no weights)."""
    sizes = {"7B": {}, "7B-Video2World": dict(in_channels=17), "1.0-14B": dict(num_attention_heads=40, num_layers=36),
             "Predict2-2B": dict(num_attention_heads=16, num_layers=28)}  # fmt: skip
    served = {}
    for name, config in sizes.items():
        with torch.device("meta"):
            model = _big(**config)
        try:
            tk.enable_teacache(model, num_inference_steps=4)
            served[name] = (tk.summary(model).coefficients, tk.summary(model).rel_l1_thresh)
        except ValueError as e:
            served[name] = str(e).split(":")[0]
    no_set = "this model has no published coefficients"
    assert served == {"7B": ("cosmos-7b", 0.3), "7B-Video2World": ("cosmos-7b", 0.3), "1.0-14B": no_set, "Predict2-2B": no_set}


def _big(**config):
    from diffusers import CosmosTransformer3DModel

    return CosmosTransformer3DModel(**config)


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c["rel_l1_thresh"]))
def test_fused_matches_reference_over_two_generations(case):
    fused, ref = enabled(**case), enabled(reference=True, **case)
    for steps in STEPS:
        out, expected = generate(fused, steps), generate(ref, steps)
        assert schedules(fused) == schedules(ref), (case, steps)
        assert set(schedules(fused)) == {"cond", "uncond"}
        assert all(len(s) == steps and s[0] == s[-1] == "C" for s in schedules(fused).values())  # first, last forced
        assert torch.equal(out, expected), (case, steps)
        assert_clear_of_ties(tk.summary(ref), case["rel_l1_thresh"])


def test_the_cases_exercise_both_outcomes():
    seen = ""
    for case in CASES:
        model = enabled(**case)
        generate(model, STEPS[0])
        seen += "".join(s[1:-1] for s in schedules(model).values())
    assert "R" in seen and "C" in seen, seen


def test_threshold_zero_is_the_uncached_model():
    cached = enabled(rel_l1_thresh=0.0)
    assert torch.equal(generate(cached, 6), cosmos_loop(cosmos_transformer(), 6))
    assert schedules(cached) == {"cond": "C" * 6, "uncond": "C" * 6}
    without_cfg = enabled(rel_l1_thresh=0.0)
    assert torch.equal(generate(without_cfg, 6, cfg=False), cosmos_loop(cosmos_transformer(), 6, cfg=False))
    assert schedules(without_cfg) == {"cond": "C" * 6}


def test_disable_restores_the_model_bit_for_bit():
    model, plain = cosmos_transformer(), cosmos_transformer()
    before = names(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    expected = cosmos_loop(plain, 8)
    tk.enable_teacache(model, num_inference_steps=8, **SET, **CASES[-1])
    assert names(model) == before
    assert not torch.equal(generate(model, 8), expected)
    tk.disable_teacache(model)
    assert names(model) == before and {n: type(m) for n, m in model.named_modules()} == classes
    assert not hasattr(model, "cache_context")  # the class has none; enabling lent one
    assert torch.equal(cosmos_loop(model, 8), expected)


def test_lora_round_trip_and_attention_processors_while_enabled(tmp_path):
    peft = pytest.importorskip("peft")
    call = cosmos_call()
    plain, model = cosmos_transformer(), cosmos_transformer()
    tk.enable_teacache(model, num_inference_steps=4, rel_l1_thresh=0.0, coefficients=[1.0, 0.0])
    for m in (plain, model):
        torch.manual_seed(0)
        m.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
        set_processors(m)  # the class has no AttentionMixin: module by module, by name
    assert names(model) == names(plain)
    with torch.no_grad():
        expected = plain(**call)[0]
        assert not torch.equal(expected, cosmos_transformer()(**call)[0])  # the adapter is in the computation
        with model.cache_context("cond"):
            assert torch.equal(model(**call)[0], expected)
    model.save_lora_adapter(tmp_path, weight_name="lora.safetensors")
    fresh = cosmos_transformer()
    tk.enable_teacache(fresh, num_inference_steps=4, rel_l1_thresh=0.0, coefficients=[1.0, 0.0])
    fresh.load_lora_adapter(tmp_path, weight_name="lora.safetensors", prefix=None)
    with torch.no_grad(), fresh.cache_context("cond"):
        assert torch.equal(fresh(**call)[0], expected)


def test_a_call_outside_a_cache_context_and_controlnet_residuals_are_refused_by_name():
    model, call = enabled(), cosmos_call()
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match=r"transformer.cache_context\('cond'\)"):
            model(**call)
        with pytest.raises(NotImplementedError, match="does not support block_controlnet_hidden_states"), model.cache_context("cond"):
            model(**call, block_controlnet_hidden_states=[torch.zeros(1, 48, 24)])


# -- the pipeline ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
def test_the_loop_is_the_pipeline(cfg):
    """cosmos_loop, which the tests drive, is CosmosTextToWorldPipeline's loop: the same latents, bit for bit."""
    assert torch.equal(cosmos_loop(cosmos_transformer(), 6, cfg), cosmos_generate(cosmos_pipeline(), 6, cfg))


def test_the_pipeline_is_refused_by_name_and_left_as_it_was():
    pipe = cosmos_pipeline()
    for options in ({}, SET):  # whether the family picks the set or the caller gives it
        with pytest.raises(NotImplementedError, match="CosmosTextToWorldPipeline: it calls the transformer .* without transformer.cache_context"):
            tk.enable_teacache(pipe, **options)
        assert type(pipe.transformer.transformer_blocks) is torch.nn.ModuleList and not hasattr(pipe.transformer, "_teacache")
    with pytest.raises(NotImplementedError, match=r"transformer.cache_context\('cond'\)"):  # the bare model, no context
        tk.enable_teacache(pipe.transformer, num_inference_steps=6, **SET)
        cosmos_generate(pipe, 6)


def test_one_state_for_both_branches_is_what_the_refusal_prevents():
    """Measured on the real pipeline with the generic span (no refusal): the uncond call compares its signal with the
    cond call of the same step (distance 0, the same latents and timestep) and reuses the cond branch's residual."""
    steps, thresh = 10, 0.3
    tk.register_model(replace(COSMOS, span_class=BlockSpan, default_coefficients="cosmos-7b", unsupported_pipeline=lambda p: None))
    try:
        shared = cosmos_pipeline()
        tk.enable_teacache(shared, rel_l1_thresh=thresh)
        out = cosmos_generate(shared, steps)
        summary = tk.summary(shared)
    finally:
        tk.register_model(COSMOS)
    port_pipe = cosmos_pipeline()
    port = original.enable(port_pipe, thresh, steps)
    expected = cosmos_generate(port_pipe, steps)
    plain = cosmos_generate(cosmos_pipeline(), steps)
    (state,) = summary.contexts.values()  # one state, "default", counting cond and uncond calls alike
    xs = [s.x for s in state.steps]
    assert len(xs) == steps and all(x == 0.0 for x in xs[1:-1:2])  # each uncond call: distance 0 to its cond call
    theirs = port.schedules()
    error, port_error = (out - plain).abs().max().item(), (expected - plain).abs().max().item()
    print(f"\none shared state: schedule {state.schedule} over the first {steps} of {2 * steps} calls; "
          f"the original: {theirs}; max|out - uncached|: shared {error:.4g}, original {port_error:.4g}")  # fmt: skip
    assert not torch.equal(out, expected)


# -- fidelity to the original ---------------------------------------------------------------------------------

PORT = Family(pipeline=None, generate=None, install=None, context={"even": "cond", "odd": "uncond"}.get)


@pytest.mark.parametrize("thresh", [0.2, 0.3, 0.5, 1.0])
def test_schedules_and_outputs_match_the_original(thresh):
    """TeaCache4Cosmos ported (tests/originals/cosmos.py) against the package, call for call, two generations."""
    steps = FIDELITY_STEPS  # compare_decisions counts its calls
    model, theirs = enabled(rel_l1_thresh=thresh), cosmos_transformer()
    port = original.enable(theirs, thresh, steps)
    middles = ""
    for generation in range(2):
        port.clear()
        out, expected = generate(model, steps), cosmos_loop(theirs, steps)
        assert package_schedules(model) == port.schedules(PORT.context), generation
        x_error = compare_decisions(model, port, PORT, thresh)
        assert torch.equal(out, expected), (generation, (out - expected).abs().max().item())
        middles += "".join(s[1:-1] for s in package_schedules(model).values())
    print(f"\ncosmos thresh={thresh}: package == original {package_schedules(model)} (x rel. error {x_error:.1e})")
    assert "R" in middles and "C" in middles, middles


def test_the_original_port_uses_the_same_signal_and_stays_apart_per_branch():
    """The port's two branches see the same signal (same latents and timestep) but keep different residuals."""
    theirs = cosmos_transformer()
    port = original.enable(theirs, 0.5, 6)
    cosmos_loop(theirs, 6)
    even, odd = ([c for c in port.calls if c.key == k] for k in ("even", "odd"))
    assert [c.x for c in even[1:]] == [c.x for c in odd[1:]] and even[1].x > 0
    assert not torch.equal(theirs.previous_residual_even, theirs.previous_residual_odd)
    assert prompts()[0].shape == prompts()[1].shape  # nothing in the calls' shapes tells the branches apart


# -- compile --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_model_matches_eager_without_recompiles():
    """fullgraph=True (no graph break: dynamo's counters stay empty; torch._dynamo.explain would trace it all once more,
    ~10 s), one warm-up generation, then no recompile across generations, step counts and CFG branches; compiled vs
    the eager reference within twice what compiling changes in the uncached model + 1e-6 of scale."""
    case = dict(rel_l1_thresh=0.3, num_layers=1)  # one block: half the Inductor work (the eager tests run two)
    model, ref, plain = enabled(**case), enabled(reference=True, **case), cosmos_transformer(num_layers=1)
    compiled = torch.compile(model, fullgraph=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    generate(compiled, 6)  # warm-up: one graph per context (the span reads the context's name)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] >= 2, dict(counters)
    plain_eager = cosmos_loop(plain, 8)
    compile_error = (cosmos_loop(torch.compile(plain, fullgraph=True), 8) - plain_eager).abs().max().item()
    scale = plain_eager.abs().max().item()
    seen = ""
    with torch._dynamo.config.patch(error_on_recompile=True):
        for steps in (8, 5):
            out, expected = generate(compiled, steps), generate(ref, steps)
            assert schedules(model) == schedules(ref)
            seen += "".join(s[1:-1] for s in schedules(model).values())
            error = (out - expected).abs().max().item()
            assert error <= 2 * compile_error + 1e-6 * scale, (steps, error, compile_error)
    assert "R" in seen and "C" in seen, seen
