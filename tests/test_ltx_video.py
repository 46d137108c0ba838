"""LTX-Video (LTXVideoTransformer3DModel) on a tiny random-weight model in the real LTXPipeline.

As tests/test_hunyuan_video.py: the fused path against `reference=True` over two generations (same schedules,
bit-identical outputs), threshold 0 against the plain pipeline, disable, LoRA and attention processors while
enabled, and the compiled model (one graph, no recompile after a warm-up, within the FLUX compile budget).
Fidelity, as tests/test_fidelity.py: against tests/originals/ltx_video.py, the authors' TeaCache4LTX-Video
ported onto diffusers 0.42.1, with the one deviation (residual before `norm_out`, models/ltx_video.py) isolated
in the port; a test below measures that deviation against the port as written. Run with `-s` for the numbers.
"""

import math

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels.tiny_families import TINY

from originals import ltx_video as original
from _compiled import check_compiled_pipeline, graph_breaks
from test_families import assert_clear_of_ties, names, schedules
from test_fidelity import GENERATIONS, Case, Family, compare_decisions, computed, max_diff, package_schedules
from test_fidelity import STEPS as FIDELITY_STEPS

FAM = TINY["ltx-video"]
STEPS = (10, 7)  # two generations, the second with another step count
CASES = [dict(rel_l1_thresh=t) for t in (0.05, 0.1, 0.2)]  # 0.05: the published set's threshold


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def pipeline():
    pipe = FAM.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_family_is_served_with_the_published_set():
    for target, steps in ((pipeline(), {}), (FAM.transformer(), dict(num_inference_steps=4))):
        tk.enable_teacache(target, **steps)
        s = tk.summary(target)
        assert (s.model, s.coefficients, s.rel_l1_thresh) == ("LTXVideoTransformer3DModel", "ltx-video", 0.05)


def test_signal_is_what_block_0_modulates():
    """The signal is the first thing block 0 computes: attn1's input, captured from the block itself."""
    from teacache_kernels.models.ltx_video import LTX_VIDEO

    model, call = FAM.transformer(), FAM.transformer_call()
    seen = {}
    block = model.transformer_blocks[0]
    block.register_forward_pre_hook(lambda m, args, kwargs: seen.update(call=kwargs), with_kwargs=True)
    block.attn1.register_forward_pre_hook(lambda m, a, kwargs: seen.update(attn1=kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model(**call)
        signal = LTX_VIDEO.signals["modulated_input"](block, seen["call"])
    assert torch.equal(signal, seen["attn1"])


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c["rel_l1_thresh"]))
def test_pipeline_fused_matches_reference_over_two_generations(case, cfg):
    fused, ref = pipeline(), pipeline()
    tk.enable_teacache(fused, **case)
    tk.enable_teacache(ref, reference=True, **case)
    for steps in STEPS:
        out, expected = FAM.generate(fused, steps, cfg), FAM.generate(ref, steps, cfg)
        assert schedules(fused) == schedules(ref), (case, steps)
        assert set(schedules(fused)) == {"cond_uncond"}  # one call per step, uncond and cond batched
        assert all(len(s) == steps and s[0] == s[-1] == "C" for s in schedules(fused).values())  # first, last forced
        assert torch.equal(out, expected), (case, steps)
        assert_clear_of_ties(tk.summary(ref), case["rel_l1_thresh"])


def test_the_cases_exercise_both_outcomes():
    seen = ""
    for case in CASES:
        pipe = pipeline()
        tk.enable_teacache(pipe, **case)
        for steps in STEPS:
            FAM.generate(pipe, steps)
            seen += "".join(s[1:-1] for s in schedules(pipe).values())
    assert "R" in seen and "C" in seen, seen


def test_threshold_zero_is_the_uncached_pipeline():
    cached, plain = pipeline(), pipeline()
    tk.enable_teacache(cached, rel_l1_thresh=0.0)
    assert torch.equal(FAM.generate(cached, 6), FAM.generate(plain, 6))
    assert schedules(cached) == {"cond_uncond": "C" * 6}


def test_disable_restores_the_pipeline_bit_for_bit():
    pipe, plain = pipeline(), pipeline()
    before = names(pipe.transformer)
    classes = {n: type(m) for n, m in pipe.transformer.named_modules()}
    expected = FAM.generate(plain, 8)
    tk.enable_teacache(pipe, **CASES[-1])
    assert names(pipe.transformer) == before
    assert not torch.equal(FAM.generate(pipe, 8), expected)
    tk.disable_teacache(pipe)
    assert names(pipe.transformer) == before and {n: type(m) for n, m in pipe.transformer.named_modules()} == classes
    assert torch.equal(FAM.generate(pipe, 8), expected)


def test_lora_round_trip_and_attention_processors_while_enabled(tmp_path):
    peft = pytest.importorskip("peft")
    call = FAM.transformer_call()
    plain, enabled = FAM.transformer(), FAM.transformer()
    tk.enable_teacache(enabled, num_inference_steps=4, rel_l1_thresh=0.0, coefficients=[1.0, 0.0])
    for model in (plain, enabled):
        torch.manual_seed(0)
        model.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
        model.set_attn_processor({name: type(p)() for name, p in model.attn_processors.items()})
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


def test_image_to_video_pipeline_per_token_timesteps():
    """LTXImageToVideoPipeline gives every token its own timestep (the first frame's tokens 0): temb is
    (batch, tokens, 6 dim) and the signal's modulation is per token, as in block 0."""
    from diffusers import LTXImageToVideoPipeline
    from PIL import Image

    image = Image.new("RGB", (32, 32), (120, 80, 40))

    def i2v():
        p = pipeline()
        p = LTXImageToVideoPipeline(**p.components)
        p.set_progress_bar_config(disable=True)
        return p

    plain, zero, fused, ref = i2v(), i2v(), i2v(), i2v()
    tk.enable_teacache(zero, rel_l1_thresh=0.0)
    assert torch.equal(FAM.generate(zero, 6, image=image), FAM.generate(plain, 6, image=image))
    tk.enable_teacache(fused, rel_l1_thresh=0.1)
    tk.enable_teacache(ref, rel_l1_thresh=0.1, reference=True)
    out, expected = FAM.generate(fused, 8, image=image), FAM.generate(ref, 8, image=image)
    assert schedules(fused) == schedules(ref) and torch.equal(out, expected)
    assert "R" in schedules(fused)["cond_uncond"]


# -- fidelity to TeaCache4LTX-Video ---------------------------------------------------------------------------

BEFORE_NORM_OUT = dict(residual_after_norm_out=False)  # the package's residual, in the port: the deviation isolated
FIDELITY = Family(
    pipeline,
    FAM.generate,
    lambda pipe, case: original.enable(pipe, case.thresh, FIDELITY_STEPS, **case.port),
    cases=(Case(0.05, port=BEFORE_NORM_OUT), Case(0.1, port=BEFORE_NORM_OUT), Case(0.2, port=BEFORE_NORM_OUT),
           Case(0.1, cfg=False, port=BEFORE_NORM_OUT)),
)


def test_schedules_and_outputs_match_the_original():
    """Call for call over two generations of FIDELITY_STEPS, per threshold: the same decisions, the same
    distances (within X_RTOL), no near ties, and the same final latents bit for bit."""
    middles, lines = "", []
    for case in FIDELITY.cases:
        pipe, theirs_pipe = FIDELITY.pipeline(), FIDELITY.pipeline()
        tk.enable_teacache(pipe, rel_l1_thresh=case.thresh)
        port = FIDELITY.install(theirs_pipe, case)
        for generation in range(GENERATIONS):
            port.clear()
            out = FIDELITY.generate(pipe, FIDELITY_STEPS, cfg=case.cfg)
            expected = FIDELITY.generate(theirs_pipe, FIDELITY_STEPS, cfg=case.cfg)
            ours, theirs = package_schedules(pipe), port.schedules()
            assert ours == theirs, f"{case}, generation {generation + 1}: package {ours} != original {theirs}"
            x_error = compare_decisions(pipe, port, FIDELITY, case.thresh)
            assert torch.equal(out, expected), (str(case), generation, max_diff(out, expected))
            middles += "".join(s[1:-1] for s in ours.values())
        lines.append(f"  {case}: {ours}  (x rel. error {x_error:.1e})")
    print(f"\nltx-video: package == original (residual before norm_out), {GENERATIONS} generations of "
          f"{FIDELITY_STEPS} steps each\n" + "\n".join(lines))  # fmt: skip
    assert "R" in middles and "C" in middles, middles


def test_the_port_never_reusing_is_the_uncached_pipeline():
    """The port's transcribed forward is diffusers' own when nothing is reused: bit for bit, either residual."""
    plain = FAM.generate(pipeline(), FIDELITY_STEPS)
    for after in (True, False):
        theirs = pipeline()
        port = original.enable(theirs, -math.inf, FIDELITY_STEPS, residual_after_norm_out=after)
        assert torch.equal(FAM.generate(theirs, FIDELITY_STEPS), plain)
        assert port.computed() == FIDELITY_STEPS


def test_residual_before_norm_out_measured_against_the_original():
    """The deviation: the original caches the residual after norm_out and the final modulation, the package
    before them. Computed calls agree; a reused call here gets the current step's final modulation, there the
    cached step's. Measured per threshold: schedules, computed calls and max|diff| against the uncached
    pipeline for the original (as written) and the package, and between the two."""
    plain = FAM.generate(pipeline(), FIDELITY_STEPS)
    lines, deviated = [], 0
    for thresh in (0.05, 0.1, 0.2):
        pipe, theirs_pipe = pipeline(), pipeline()
        tk.enable_teacache(pipe, rel_l1_thresh=thresh)
        port = original.enable(theirs_pipe, thresh, FIDELITY_STEPS)  # the script, literally
        out, ref = FAM.generate(pipe, FIDELITY_STEPS), FAM.generate(theirs_pipe, FIDELITY_STEPS)
        ours, theirs = package_schedules(pipe), port.schedules()
        assert set(ours) == set(theirs) == {"cond_uncond"}
        assert "R" in ours["cond_uncond"] and "R" in theirs["cond_uncond"]
        assert not torch.equal(out, ref)  # a reused call differs
        deviated += ours != theirs
        lines.append(f"  thresh {thresh}: original {theirs} ({computed(theirs)}/{FIDELITY_STEPS} computed), max|diff| vs "
                     f"uncached {max_diff(ref, plain):.4g}; package {ours} ({computed(ours)}/{FIDELITY_STEPS} computed), "
                     f"max|diff| vs uncached {max_diff(out, plain):.4g}; package vs original {max_diff(out, ref):.4g}")  # fmt: skip
    print(f"\nltx-video, residual after (original) vs before (package) norm_out, scale of the output "
          f"{plain.abs().max().item():.3g}, schedules differing at {deviated}/3 thresholds:\n" + "\n".join(lines))  # fmt: skip


# -- compile --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_pipeline_matches_eager_without_recompiles():
    """fullgraph=True, one warm-up generation, then no recompile across generations and step counts;
    compiled vs the eager reference within twice what compiling changes in the uncached pipeline + 1e-6 of scale."""
    call = FAM.transformer_call()
    enabled_model = FAM.transformer()
    tk.enable_teacache(enabled_model, num_inference_steps=4)
    assert graph_breaks(enabled_model, call) == 0

    check_compiled_pipeline("ltx-video", pipeline, FAM.generate, CASES[1],
                            interior=lambda s: "".join(x[1:-1] for x in s.values()))  # fmt: skip
