"""HunyuanVideo: what its family adds to tests/test_families.py, its fidelity to the original, and its variants.

tests/test_families.py runs the tiny HunyuanVideoPipeline (`TINY["hunyuan-video"]`) through what every family
gets: fused vs reference with true CFG over two generations, threshold 0, disable, LoRA, compile. Here:
  - the rotary embedding reaches the single-stream blocks (the generic span would pass it under the double
    blocks' name `freqs_cis`, which the single blocks ignore); token-replace blocks refused, latent_concat served;
  - fidelity: the port of TeaCache4HunyuanVideo (tests/originals/hunyuan_video.py) and the package give the
    same schedule call for call and bitwise outputs, over two generations at three thresholds, with true CFG
    (the original run per branch) and without (embedded guidance alone); and the measured deviation: the
    original literally, one state shared by the interleaved cond and uncond calls;
  - the variants built on the same blocks, not subclasses of HunyuanVideoTransformer3DModel (so never served
    through the MRO): FramePack (served, the `hunyuan-video` set, one state per section) and HunyuanVideo 1.5
    (served with the user's coefficients only: none are published).
Run with `-s` to see the numbers.
"""

from dataclasses import replace

import pytest
import torch
from originals import hunyuan_video as original
from test_families import assert_clear_of_ties, schedules
from test_fidelity import GENERATIONS, STEPS, Case, Family, compare_decisions, computed, max_diff

import teacache_kernels as tk
from teacache_kernels.models import family_for
from teacache_kernels.models.base import BlockSpan
from teacache_kernels.models.hunyuan_video import HUNYUAN_VIDEO
from teacache_kernels.tiny_families import TINY
from teacache_kernels.tiny_families import hunyuan_video as tiny

FAM = TINY["hunyuan-video"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_family_is_served_with_the_published_set():
    model = FAM.transformer()
    tk.enable_teacache(model, num_inference_steps=4)
    s = tk.summary(model)
    assert (model._teacache.family.name, s.coefficients, s.rel_l1_thresh) == ("hunyuan-video", "hunyuan-video", 0.15)


def test_rotary_embedding_reaches_the_single_blocks():
    """Threshold 0 equals the plain model only because the span passes the rotary embedding under both
    names; the generic span, calling every block by block 0's names, loses it in the single blocks."""
    call = FAM.transformer_call()
    with torch.no_grad():
        expected = FAM.transformer()(**call)[0]
        for span_class, equal in ((None, True), (BlockSpan, False)):
            family = HUNYUAN_VIDEO if span_class is None else replace(HUNYUAN_VIDEO, span_class=span_class)
            tk.register_model(family)
            try:
                model = FAM.transformer()
                tk.enable_teacache(model, num_inference_steps=4, rel_l1_thresh=0.0)
                assert torch.equal(model(**call)[0], expected) is equal
            finally:
                tk.register_model(HUNYUAN_VIDEO)


def test_token_replace_blocks_are_refused_by_name():
    model = FAM.transformer(image_condition_type="token_replace")
    with pytest.raises(NotImplementedError, match="token_replace"):
        tk.enable_teacache(model, num_inference_steps=4)
    assert type(model.transformer_blocks) is torch.nn.ModuleList  # nothing was installed


def test_latent_concat_variant_is_served():
    """HunyuanVideo-I2V's latent_concat variant: the ordinary blocks, more input channels."""
    latents = torch.randn(1, 9, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    call = dict(FAM.transformer_call(), hidden_states=latents)
    plain, model = (FAM.transformer(in_channels=9, image_condition_type="latent_concat") for _ in range(2))
    tk.enable_teacache(model, num_inference_steps=4, rel_l1_thresh=0.0)
    with torch.no_grad():
        assert torch.equal(model(**call)[0], plain(**call)[0])


def test_embedded_guidance_alone_fused_matches_reference():
    """Without true CFG (test_families runs it with): one "cond" call a step, the released model's usual run."""
    fused, ref = quiet(FAM.pipeline()), quiet(FAM.pipeline())
    tk.enable_teacache(fused, rel_l1_thresh=0.3)
    tk.enable_teacache(ref, rel_l1_thresh=0.3, reference=True)
    for steps in (10, 7):
        out, expected = FAM.generate(fused, steps, cfg=False), FAM.generate(ref, steps, cfg=False)
        assert schedules(fused) == schedules(ref) and set(schedules(fused)) == {"cond"}
        assert torch.equal(out, expected)
        assert_clear_of_ties(tk.summary(ref), 0.3)
    assert "R" in schedules(fused)["cond"][1:-1]


# -- fidelity to TeaCache4HunyuanVideo ------------------------------------------------------------------------

FIDELITY = Family(
    lambda: quiet(FAM.pipeline()), FAM.generate,
    # With true CFG the original (one state) is run per branch: one copy of its state per cache context.
    lambda pipe, case: original.enable(pipe, case.thresh, STEPS, per_context=case.cfg),
    context=lambda key: "cond" if key == "transformer" else key,
    cases=tuple(Case(t, cfg=cfg) for cfg in (True, False) for t in (0.1, 0.3, 0.6)),
)  # fmt: skip


def test_schedules_and_outputs_match_the_original():
    middles, lines = "", []
    for case in FIDELITY.cases:
        pipe, port_pipe = FIDELITY.pipeline(), FIDELITY.pipeline()
        tk.enable_teacache(pipe, rel_l1_thresh=case.thresh)
        port = FIDELITY.install(port_pipe, case)
        for generation in range(GENERATIONS):
            port.clear()
            out = FIDELITY.generate(pipe, STEPS, cfg=case.cfg)
            expected = FIDELITY.generate(port_pipe, STEPS, cfg=case.cfg)
            ours, theirs = schedules(pipe), port.schedules(FIDELITY.context)
            assert ours == theirs, f"{case}, generation {generation + 1}: package {ours} != original {theirs}"
            x_error = compare_decisions(pipe, port, FIDELITY, case.thresh)
            assert torch.equal(out, expected), (str(case), generation, max_diff(out, expected))
            middles += "".join(s[1:-1] for s in ours.values())
        lines.append(f"  {case}: {ours}  (x rel. error {x_error:.1e}, output max|diff| {max_diff(out, expected):g})")
    print(f"\nhunyuan-video: package == original, {GENERATIONS} generations of {STEPS} steps each\n" + "\n".join(lines))
    assert "R" in middles and "C" in middles, middles


def test_the_port_never_reusing_is_the_uncached_pipeline():
    """The port's transcribed forward is diffusers' own when nothing is reused: bit for bit."""
    plain = FIDELITY.generate(FIDELITY.pipeline(), STEPS)
    port_pipe = FIDELITY.pipeline()
    port = original.enable(port_pipe, -float("inf"), STEPS, per_context=True)  # acc < -inf never holds
    out = FIDELITY.generate(port_pipe, STEPS)
    assert all(c.computed for c in port.calls) and len(port.calls) == 2 * STEPS
    assert torch.equal(out, plain)


def test_true_cfg_the_original_shares_one_state_across_branches():
    """TeaCache4HunyuanVideo keeps one state and counts calls with `num_steps = infer_steps`: with diffusers' true
    CFG the cond and uncond calls interleave in it (each compared with the other branch's signal) and the counter
    wraps mid-generation. The package keeps one state per cache context (= the original run per branch, which
    test_schedules_and_outputs_match_the_original holds it to)."""
    thresh = 0.3
    plain = FIDELITY.generate(FIDELITY.pipeline(), STEPS)
    pipe, port_pipe = FIDELITY.pipeline(), FIDELITY.pipeline()
    tk.enable_teacache(pipe, rel_l1_thresh=thresh)
    port = original.enable(port_pipe, thresh, STEPS)  # the script, literally
    out, ref = FIDELITY.generate(pipe, STEPS), FIDELITY.generate(port_pipe, STEPS)
    ours = schedules(pipe)
    assert [c.cnt for c in port.calls] == [i % STEPS for i in range(2 * STEPS)]  # wraps after half the steps
    assert [i for i, c in enumerate(port.calls) if c.forced] == [0, STEPS - 1, STEPS, 2 * STEPS - 1]
    theirs = {"cond": "".join("C" if c.computed else "R" for c in port.calls[0::2]),
              "uncond": "".join("C" if c.computed else "R" for c in port.calls[1::2])}  # fmt: skip
    branch_x = [round(c.x, 3) for c in port.calls if not c.forced]
    print(f"\nhunyuan-video thresh {thresh}, true CFG: original (one shared state) {theirs} ({computed(theirs)}/"
          f"{2 * STEPS} computed, x between branches {branch_x[:4]}...), max|diff| vs uncached "
          f"{max_diff(ref, plain):.4g}; package {ours} ({computed(ours)}/{2 * STEPS} computed), max|diff| vs uncached "
          f"{max_diff(out, plain):.4g}")  # fmt: skip
    assert theirs != ours


# -- the variants: FramePack and HunyuanVideo 1.5 -------------------------------------------------------------


def test_variants_are_families_of_their_own():
    """Neither class subclasses HunyuanVideoTransformer3DModel, so family_for's MRO walk could not serve them
    through it; each is registered by name."""
    from diffusers import (
        HunyuanVideo15Transformer3DModel,
        HunyuanVideoFramepackTransformer3DModel,
        HunyuanVideoTransformer3DModel,
    )

    for cls in (HunyuanVideo15Transformer3DModel, HunyuanVideoFramepackTransformer3DModel):
        assert not issubclass(cls, HunyuanVideoTransformer3DModel)
    assert family_for(tiny.hunyuan_video_framepack_transformer()).name == "hunyuan-video-framepack"
    assert family_for(tiny.hunyuan_video15_transformer()).name == "hunyuan-video-1.5"


def framepack_sections(pipe, steps: int, cfg: bool = False):
    """The output, and the schedules of each section (read at its last step: the next section starts anew)."""
    seen = []

    def at_step_end(pipe, i, t, kwargs):
        if i == steps - 1:
            seen.append(schedules(pipe))
        return kwargs

    out = tiny.hunyuan_video_framepack_generate(pipe, steps, cfg=cfg, callback_on_step_end=at_step_end)
    return out, seen


def test_framepack_is_served_per_section():
    """FramePack's own TeaCache (the HunyuanVideo set, a new state per section) on the tiny pipeline: two
    sections, threshold 0 the plain pipeline, fused == reference for each section at two thresholds."""
    plain, zero = (quiet(tiny.hunyuan_video_framepack_pipeline()) for _ in range(2))
    tk.enable_teacache(zero, rel_l1_thresh=0.0)
    out, sections = framepack_sections(zero, 6)
    assert torch.equal(out, tiny.hunyuan_video_framepack_generate(plain, 6))
    assert sections == [{"default": "C" * 6}] * 2
    assert tk.summary(zero).coefficients == "hunyuan-video"
    middles = ""
    for thresh in (0.1, 0.3):
        fused, ref = (quiet(tiny.hunyuan_video_framepack_pipeline()) for _ in range(2))
        tk.enable_teacache(fused, rel_l1_thresh=thresh)
        tk.enable_teacache(ref, rel_l1_thresh=thresh, reference=True)
        for steps in (8, 6):
            (out, ours), (expected, theirs) = framepack_sections(fused, steps), framepack_sections(ref, steps)
            assert ours == theirs and torch.equal(out, expected), (thresh, steps)
            assert all(len(s["default"]) == steps and s["default"][0] == s["default"][-1] == "C" for s in ours)
            middles += "".join(s["default"][1:-1] for s in ours)
    assert "R" in middles and "C" in middles, middles


def test_framepack_true_cfg_shares_one_state():
    """diffusers' FramePack pipeline enters no cache_context: with true CFG both branches run in one state,
    whose counter (the section's step count) wraps mid-section, as in FramePack's own code with cfg > 1."""
    steps, thresh = 8, 0.3
    plain = tiny.hunyuan_video_framepack_generate(quiet(tiny.hunyuan_video_framepack_pipeline()), steps, cfg=True)
    pipe = quiet(tiny.hunyuan_video_framepack_pipeline())
    tk.enable_teacache(pipe, rel_l1_thresh=thresh)
    out, sections = framepack_sections(pipe, steps, cfg=True)
    summary = tk.summary(pipe)
    assert [set(s) for s in sections] == [{"default"}] * 2 and summary.calls == 2 * 2 * steps  # 2 sections, 2 branches
    assert len(summary.contexts["default"].steps) == steps  # the counter wrapped: the log holds its last pass
    print(f"\nhunyuan-video-framepack thresh {thresh}, true CFG: one state for both branches, schedules of each "
          f"section's last {steps} of {2 * steps} calls {[s['default'] for s in sections]}, "
          f"{summary.calls - summary.reused}/{summary.calls} computed, max|diff| vs uncached {max_diff(out, plain):.4g}")  # fmt: skip


def test_hunyuan_video15_asks_for_coefficients():
    with pytest.raises(ValueError, match=r"no published coefficients: give coefficients=\[.*coefficients_file="):
        tk.enable_teacache(tiny.hunyuan_video15_transformer(), num_inference_steps=4)
    with pytest.raises(ValueError, match="no published coefficients"):
        tk.enable_teacache(quiet(tiny.hunyuan_video15_pipeline()), rel_l1_thresh=0.3)


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
def test_hunyuan_video15_pipeline_fused_matches_reference(cfg):
    """The span is exact (threshold 0: the plain pipeline, bit for bit); with given coefficients the fused path
    follows the reference per guider context ("pred_cond", "pred_uncond") over two generations."""
    coefficients = [1.0, 0.0]  # none are published: a stand-in polynomial (x itself)
    plain, zero = (quiet(tiny.hunyuan_video15_pipeline()) for _ in range(2))
    tk.enable_teacache(zero, rel_l1_thresh=0.0, coefficients=coefficients)
    assert torch.equal(tiny.hunyuan_video15_generate(zero, 6, cfg), tiny.hunyuan_video15_generate(plain, 6, cfg))
    contexts = {"pred_cond", "pred_uncond"} if cfg else {"pred_cond"}
    assert schedules(zero) == {name: "C" * 6 for name in contexts}
    fused, ref = (quiet(tiny.hunyuan_video15_pipeline()) for _ in range(2))
    tk.enable_teacache(fused, rel_l1_thresh=0.1, coefficients=coefficients)
    tk.enable_teacache(ref, rel_l1_thresh=0.1, coefficients=coefficients, reference=True)
    for steps in (8, 6):
        out, expected = tiny.hunyuan_video15_generate(fused, steps, cfg), tiny.hunyuan_video15_generate(ref, steps, cfg)
        assert schedules(fused) == schedules(ref) and set(schedules(fused)) == contexts
        assert torch.equal(out, expected)
        assert_clear_of_ties(tk.summary(ref), 0.1)
        assert all("R" in s[1:-1] and "C" in s[1:-1] for s in schedules(fused).values()), schedules(fused)
