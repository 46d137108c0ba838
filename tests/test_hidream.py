"""HiDream-I1 (HiDreamImageTransformer2DModel) on a tiny random-weight model in the real HiDreamImagePipeline.

As tests/test_hunyuan_video.py: per coefficient set (hidream-full with CFG, hidream-dev and hidream-fast without,
as the models are run), the fused path against `reference=True` over two generations (same schedules,
bit-identical outputs), threshold 0 against the plain pipeline (square and non-square latents), disable, LoRA and
attention processors while enabled, and the compiled model. Plus what this family adds: each set's forced calls
(Full: the first tenth rounded up, not the last; Dev, Fast: the first) and the per-block Llama states of its span.
Fidelity, as tests/test_fidelity.py: against tests/originals/hidream.py (the authors' TeaCache4HiDream-I1 for
Full, ComfyUI-TeaCache's HiDream forward for Dev and Fast) ported onto diffusers 0.42.1. Run with `-s` for numbers.
"""

import math

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels.tiny_families import hidream as FAM

from originals import hidream as original
from _compiled import check_compiled_pipeline, graph_breaks
from test_families import assert_clear_of_ties, names, schedules, set_processors
from test_fidelity import GENERATIONS, Case, Family, compare_decisions, max_diff, package_schedules
from test_fidelity import STEPS as FIDELITY_STEPS

STEPS = (12, 7)  # two generations, the second with another step count; 12: hidream-full forces 2 calls
# Per set: the enable_teacache fields of each case, CFG as the model is run, and the forced first calls at n steps.
SETS = {
    "hidream-full": (True, lambda n: math.ceil(n / 10), [dict(rel_l1_thresh=t) for t in (0.3, 0.45, 0.7)]),
    "hidream-dev": (False, lambda n: 1, [dict(coefficients="hidream-dev", rel_l1_thresh=t) for t in (1.0, 2.0)]),
    "hidream-fast": (False, lambda n: 1, [dict(coefficients="hidream-fast", rel_l1_thresh=t) for t in (1.5, 3.0)]),
}
NON_SQUARE = dict(height=12, width=24)  # 4 x 10 latents, padded to max_seq tokens and masked


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def pipeline(**config):
    pipe = FAM.pipeline(**config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_family_is_served_with_the_published_sets():
    for target, steps in ((pipeline(), {}), (FAM.transformer(), dict(num_inference_steps=4))):
        tk.enable_teacache(target, **steps)
        s = tk.summary(target)
        assert (s.model, s.coefficients, s.rel_l1_thresh) == ("HiDreamImageTransformer2DModel", "hidream-full", 0.3)
    for name, signal in (("hidream-full", "timestep_embedding"), ("hidream-dev", "image_tokens"), ("hidream-fast", "image_tokens")):
        model = FAM.transformer()
        tk.enable_teacache(model, num_inference_steps=20, coefficients=name)
        config = model._teacache.cache.config
        assert (config.signal, config.forced_first(), config.cooldown_steps) == (signal, 2 if name == "hidream-full" else 1, 0)


def test_signals_are_what_the_originals_compare():
    """hidream-full: t_embedder's output (not temb = it + p_embedder(pooled)); dev, fast: x_embedder's output."""
    from teacache_kernels.models.hidream import HIDREAM

    model, call = FAM.transformer(), FAM.transformer_call()
    seen = {}
    model.t_embedder.register_forward_hook(lambda m, a, out: seen.update(t=out))
    model.x_embedder.register_forward_hook(lambda m, a, out: seen.update(x=out))
    model.double_stream_blocks[0].register_forward_pre_hook(lambda m, a, kwargs: seen.update(call=kwargs), with_kwargs=True)
    with torch.no_grad():
        model(**call)
    block_call = dict(seen["call"], t_embedder=seen["t"])
    assert torch.equal(HIDREAM.signals["timestep_embedding"](None, block_call), seen["t"])
    assert not torch.equal(seen["t"], seen["call"]["temb"])
    assert torch.equal(HIDREAM.signals["image_tokens"](None, block_call), seen["x"])


@pytest.mark.parametrize("name", SETS)
def test_pipeline_fused_matches_reference_over_two_generations(name):
    cfg, forced, cases = SETS[name]
    seen, last = "", ""
    for case in cases:
        for size in ({}, NON_SQUARE) if case is cases[0] else ({},):
            fused, ref = pipeline(), pipeline()
            tk.enable_teacache(fused, **case)
            tk.enable_teacache(ref, reference=True, **case)
            for steps in STEPS:
                out, expected = FAM.generate(fused, steps, cfg, **size), FAM.generate(ref, steps, cfg, **size)
                assert schedules(fused) == schedules(ref), (case, steps)
                (schedule,) = schedules(fused).values()
                assert set(schedules(fused)) == {"default"}  # one call per step, no cache context
                assert len(schedule) == steps and schedule[: forced(steps)] == "C" * forced(steps), schedule
                assert torch.equal(out, expected), (case, steps)
                assert_clear_of_ties(tk.summary(ref), case["rel_l1_thresh"])
                seen += schedule[forced(steps) : -1]
                last += schedule[-1]
    assert "R" in seen and "C" in seen, f"{name}: the cases exercise only one outcome ({seen})"
    assert "R" in last, f"{name}: the last call is never forced, and some case reuses it ({last})"


@pytest.mark.parametrize("size", [{}, NON_SQUARE], ids=["square", "non-square"])
def test_threshold_zero_is_the_uncached_pipeline(size):
    """Bit for bit: the span gives every block its own Llama layer (llama_layers [3, 1, 0, 2]) and does the
    forward's glue between the lists, masks included for non-square latents."""
    cached, plain = pipeline(), pipeline()
    tk.enable_teacache(cached, rel_l1_thresh=0.0)
    assert torch.equal(FAM.generate(cached, 6, **size), FAM.generate(plain, 6, **size))
    assert schedules(cached) == {"default": "C" * 6}


def test_disable_restores_the_pipeline_bit_for_bit():
    pipe, plain = pipeline(), pipeline()
    before = names(pipe.transformer)
    classes = {n: type(m) for n, m in pipe.transformer.named_modules()}
    hooks = {n: dict(m._forward_hooks) for n, m in pipe.transformer.named_modules()}
    expected = FAM.generate(plain, 8)
    tk.enable_teacache(pipe, rel_l1_thresh=0.7)
    assert names(pipe.transformer) == before
    assert not torch.equal(FAM.generate(pipe, 8), expected)
    tk.disable_teacache(pipe)
    assert names(pipe.transformer) == before and {n: type(m) for n, m in pipe.transformer.named_modules()} == classes
    assert {n: dict(m._forward_hooks) for n, m in pipe.transformer.named_modules()} == hooks  # the captures' hooks went
    assert torch.equal(FAM.generate(pipe, 8), expected)


def test_lora_round_trip_and_attention_processors_while_enabled(tmp_path):
    peft = pytest.importorskip("peft")
    call = FAM.transformer_call()
    plain, enabled = FAM.transformer(), FAM.transformer()
    tk.enable_teacache(enabled, num_inference_steps=4, rel_l1_thresh=0.0, coefficients=[1.0, 0.0])
    for model in (plain, enabled):
        torch.manual_seed(0)
        model.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
        set_processors(model)
    assert names(enabled) == names(plain)
    with torch.no_grad():
        expected = plain(**call)[0]
        assert not torch.equal(expected, FAM.transformer()(**call)[0])  # the adapter is in the computation
        assert torch.equal(enabled(**call)[0], expected)
    enabled.save_lora_adapter(tmp_path, weight_name="lora.safetensors")
    fresh = FAM.transformer()
    tk.enable_teacache(fresh, num_inference_steps=4, rel_l1_thresh=0.0, coefficients=[1.0, 0.0])
    fresh.load_lora_adapter(tmp_path, weight_name="lora.safetensors", prefix=None)
    with torch.no_grad():
        assert torch.equal(fresh(**call)[0], expected)


# -- fidelity to TeaCache4HiDream-I1 (Full) and ComfyUI-TeaCache (Dev, Fast) -----------------------------------

MODEL_TYPE = {"hidream-full": "full", "hidream-dev": "dev", "hidream-fast": "fast"}  # the port's
FIDELITY_THRESHOLDS = {"hidream-full": (0.3, 0.45, 0.7), "hidream-dev": (1.0, 1.5, 2.0), "hidream-fast": (1.5, 2.2, 3.0)}
FIDELITY = Family(
    pipeline,
    FAM.generate,
    lambda pipe, case: original.enable(pipe, case.thresh, FIDELITY_STEPS, **case.port),
    context=lambda key: "default",
    cases=tuple(
        Case(t, cfg=SETS[name][0], port=dict(model_type=MODEL_TYPE[name]), package=dict(coefficients=name))
        for name, thresholds in FIDELITY_THRESHOLDS.items()
        for t in thresholds
    ),
)


def run_fidelity(case, steps: int, check_decisions: bool):
    pipe, theirs_pipe = FIDELITY.pipeline(), FIDELITY.pipeline()
    tk.enable_teacache(pipe, rel_l1_thresh=case.thresh, **case.package)
    port = original.enable(theirs_pipe, case.thresh, steps, **case.port)
    rows = []
    for generation in range(GENERATIONS):
        port.clear()
        out, expected = FAM.generate(pipe, steps, cfg=case.cfg), FAM.generate(theirs_pipe, steps, cfg=case.cfg)
        ours, theirs = package_schedules(pipe), port.schedules(FIDELITY.context)
        assert ours == theirs, f"{case}, {steps} steps, generation {generation + 1}: package {ours} != original {theirs}"
        x_error = compare_decisions(pipe, port, FIDELITY, case.thresh) if check_decisions else math.nan
        assert torch.equal(out, expected), (str(case), generation, max_diff(out, expected))
        rows.append((ours["default"], x_error, [c.cnt for c in port.calls if c.forced]))
    return rows


def test_schedules_and_outputs_match_the_originals():
    """Call for call over two generations of FIDELITY_STEPS, per set and threshold: the same decisions, the same
    distances (within X_RTOL), no near ties, and the same final latents bit for bit."""
    middles, lines = "", []
    for case in FIDELITY.cases:
        rows = run_fidelity(case, FIDELITY_STEPS, check_decisions=True)
        middles += "".join(schedule[1:-1] for schedule, _, _ in rows)
        lines.append(f"  {case}: {[r[0] for r in rows]}  (x rel. error {max(r[1] for r in rows):.1e})")
    print(f"\nhidream: package == original, {GENERATIONS} generations of {FIDELITY_STEPS} steps each\n" + "\n".join(lines))
    assert "R" in middles and "C" in middles, middles


@pytest.mark.parametrize("steps", [12, 7])
def test_full_forces_the_first_tenth_rounded_up(steps):
    """The original's `cnt < num_steps * 0.1`: at 12 steps calls 0 and 1 are forced (int(1.2) would force one),
    at 7 steps call 0; the last call is not forced. Schedules and outputs as the original's."""
    case = FIDELITY.cases[0]
    for schedule, _, forced in run_fidelity(case, steps, check_decisions=False):
        assert forced == list(range(math.ceil(steps / 10))), forced
        assert schedule.startswith("C" * len(forced))


def test_comfyui_signal_aliasing_measured():
    """The deviation (models/hidream.py): with ComfyUI's default cache_device (the model's), the stored Dev/Fast
    signal is `hidden_states` itself, so after a reused call the next one compares with the previous tokens plus
    the residual. The package compares the embedded tokens as computed (ComfyUI with the cache on another device).
    Measured per set and threshold: schedules, computed calls, max|diff| against the uncached pipeline."""
    plain = FAM.generate(pipeline(), FIDELITY_STEPS, cfg=False)
    lines, moved = [], 0
    for case in [c for c in FIDELITY.cases if c.port["model_type"] != "full"]:
        pipe, theirs_pipe = pipeline(), pipeline()
        tk.enable_teacache(pipe, rel_l1_thresh=case.thresh, **case.package)
        port = original.enable(theirs_pipe, case.thresh, FIDELITY_STEPS, **case.port, aliased=True)
        out, ref = FAM.generate(pipe, FIDELITY_STEPS, cfg=False), FAM.generate(theirs_pipe, FIDELITY_STEPS, cfg=False)
        ours, theirs = package_schedules(pipe)["default"], port.schedules()["transformer"]
        steps = tk.summary(pipe).contexts["default"].steps
        after_reuse = [i for i in range(1, FIDELITY_STEPS) if theirs[i - 1] == ours[i - 1] == "R" and theirs[: i] == ours[: i]]
        moved += sum(abs(port.calls[i].x - steps[i].x) > 1e-3 * steps[i].x for i in after_reuse)
        lines.append(f"  {case.package['coefficients']} thresh {case.thresh}: ComfyUI (aliased) {theirs} ({theirs.count('C')} "
                     f"computed), max|diff| vs uncached {max_diff(ref, plain):.4g}; package {ours} ({ours.count('C')} computed), "
                     f"max|diff| vs uncached {max_diff(out, plain):.4g}")  # fmt: skip
    print("\nhidream dev/fast, ComfyUI's default cache_device (signal aliased) vs the package:\n" + "\n".join(lines))
    assert moved > 0  # the aliasing changes the distance after a reused call


def test_the_port_never_reusing_is_the_uncached_pipeline():
    """The port's transcribed forward is diffusers' own when nothing is reused: bit for bit, both signals."""
    plain = FAM.generate(pipeline(), FIDELITY_STEPS)
    for model_type in ("full", "dev"):
        theirs = pipeline()
        port = original.enable(theirs, -math.inf, FIDELITY_STEPS, model_type=model_type)
        assert torch.equal(FAM.generate(theirs, FIDELITY_STEPS), plain)
        assert port.computed() == FIDELITY_STEPS


# -- compile --------------------------------------------------------------------------------------------------


COMPILABLE = dict(experts=0, num_layers=1, num_single_layers=1, llama_layers=[3, 1])


@pytest.mark.slow
def test_compiled_pipeline_matches_eager_without_recompiles():
    """Plain feed-forwards (experts=0: diffusers' MoE inference cannot compile with fullgraph=True, with or
    without TeaCache), one block per list (compile time). fullgraph=True, one warm-up generation, then no
    recompile across generations and step counts; compiled vs the eager reference within twice what compiling
    changes in the uncached pipeline + 1e-6 of scale."""
    call = FAM.transformer_call()
    enabled_model = FAM.transformer(**COMPILABLE)
    tk.enable_teacache(enabled_model, num_inference_steps=4)
    assert graph_breaks(enabled_model, call) == 0

    check_compiled_pipeline("hidream", lambda: pipeline(**COMPILABLE), FAM.generate, SETS["hidream-full"][2][1],
                            interior=lambda s: s["default"][1:])  # fmt: skip
