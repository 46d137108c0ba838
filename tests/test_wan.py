"""Wan (WanTransformer3DModel) on tiny random-weight WanPipeline / WanImageToVideoPipeline / Wan 2.2 two-stage pipelines.

- The fused path against `reference=True` (the eager oracle on the same span): same schedules, outputs bit for bit
  (eager budget: zero), both of the authors' modes (chosen by the coefficient set), over two generations.
- Fidelity to the authors' TeaCache4Wan2.1 (tests/originals/wan.py, its even/odd counter on the same pipeline):
  schedules identical call for call per branch, outputs bit for bit, every non-forced decision clear of a tie.
- What the pipeline says: `cache_context(step_index=...)` sets the step; Wan 2.2's two transformers each run
  their own share with their own state, forced calls and step count.
- Threshold 0 is the plain pipeline; disable restores; LoRA while enabled; VACE refused by name; default sets
  from the config (real classes on the meta device: nothing is allocated).
- Compiled (slow): fullgraph, 0 graph breaks, no recompile after a warm-up, compiled vs eager within twice what
  compiling changes in the uncached pipeline + 1e-6 of its scale (the FLUX budget, tests/test_compile.py).
"""

import math

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels.report import StagedSummary
from teacache_kernels.tiny_families.wan import wan_call, wan_generate, wan_i2v_pipeline, wan_pipeline, wan_transformer

from originals import wan as original

STEPS = (10, 7)  # two generations, the second with another step count
DEFAULT, RET = "wan2.1-t2v-1.3b", "wan2.1-t2v-1.3b-ret"
# Thresholds giving computed and reused calls on the tiny model, per mode (0.1 in ret mode sits near a tie).
CASES = [(DEFAULT, t) for t in (0.1, 0.3, 0.6)] + [(RET, t) for t in (0.05, 0.3, 0.6)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def schedules(pipe_or_model):
    return {name: c.schedule for name, c in tk.summary(pipe_or_model).contexts.items()}


def names(model):
    return [n for n, _ in model.named_modules()], list(model.state_dict())


def forced_ok(coefficients: str, schedule: str) -> bool:
    """The set's forced calls computed: ret mode the first 5 (the last may reuse), default the first and last."""
    if coefficients.endswith("-ret"):
        return schedule[:5] == "C" * min(5, len(schedule))
    return schedule[0] == schedule[-1] == "C"


# -- the fused path against the oracle -------------------------------------------------------------------------


@pytest.mark.parametrize("coefficients", [DEFAULT, RET])
def test_fused_matches_reference_over_two_generations(coefficients):
    seen = ""
    for set_, thresh in [c for c in CASES if c[0] == coefficients]:
        fused, ref = quiet(wan_pipeline()), quiet(wan_pipeline())
        tk.enable_teacache(fused, coefficients=set_, rel_l1_thresh=thresh)
        tk.enable_teacache(ref, coefficients=set_, rel_l1_thresh=thresh, reference=True)
        for steps in STEPS:
            out, expected = wan_generate(fused, steps), wan_generate(ref, steps)
            assert schedules(fused) == schedules(ref), (set_, thresh, steps)
            assert set(schedules(fused)) == {"cond", "uncond"}
            assert all(len(s) == steps and forced_ok(set_, s) for s in schedules(fused).values())
            assert torch.equal(out, expected), (set_, thresh, steps)
            seen += "".join(s[5:] if set_.endswith("-ret") else s[1:-1] for s in schedules(fused).values())
    assert "R" in seen and "C" in seen, seen


def test_the_set_chooses_the_signal():
    """Default mode compares the time embedding before the projection (the captured `temb`), ret mode the
    projection the blocks receive: their first distances differ, and each equals the one recomputed here."""
    call = wan_call()
    model = wan_transformer()
    with torch.no_grad():
        embedder = model.condition_embedder
        t0, t1 = torch.tensor([900.0]), torch.tensor([800.0])
        e = [embedder(t, call["encoder_hidden_states"])[0] for t in (t0, t1)]
        e0 = [embedder(t, call["encoder_hidden_states"])[1] for t in (t0, t1)]
    for set_, (a, b) in ((DEFAULT, e), (RET, e0)):
        m = wan_transformer()
        tk.enable_teacache(m, num_inference_steps=4, coefficients=set_, rel_l1_thresh=0.3)
        with torch.no_grad():
            for t in (t0, t1):
                m(**dict(call, timestep=t))
        x = tk.summary(m).contexts["default"].steps[1].x
        expected = ((b.double() - a.double()).abs().sum() / a.double().abs().sum()).item()
        assert math.isclose(x, expected, rel_tol=1e-6), (set_, x, expected)
        assert tk.summary(m).coefficients == set_


# -- fidelity to the authors' script ---------------------------------------------------------------------------


def original_schedules(port) -> dict[str, str]:
    return port.schedules({"even": "cond", "odd": "uncond"}.get)


@pytest.mark.parametrize("coefficients, thresh", CASES, ids=[f"{c}-{t}" for c, t in CASES])
def test_schedules_and_outputs_match_the_original(coefficients, thresh):
    ret = coefficients.endswith("-ret")
    pipe, other = quiet(wan_pipeline()), quiet(wan_pipeline())
    tk.enable_teacache(pipe, coefficients=coefficients, rel_l1_thresh=thresh)
    port = original.enable(other, thresh, STEPS[0], "t2v-1.3B", use_ret_steps=ret)
    for generation in range(2):
        port.clear()
        out, expected = wan_generate(pipe, STEPS[0]), wan_generate(other, STEPS[0])
        ours, theirs = schedules(pipe), original_schedules(port)
        assert ours == theirs, (generation, ours, theirs)
        assert torch.equal(out, expected), generation
        # The original's decisions, each clear of the threshold by far more than the two distances differ.
        summary = tk.summary(pipe)
        for name, key in (("cond", "even"), ("uncond", "odd")):
            calls = [c for c in port.calls if c.key == key]
            steps = summary.contexts[name].steps
            assert [c.cnt for c in calls] == [2 * i + (key == "odd") for i in range(STEPS[0])]
            acc = 0.0
            for s, c in zip(steps, calls):
                if not c.forced:
                    assert abs(s.x - c.x) <= 1e-5 * abs(c.x), (name, s.step, s.x, c.x)
                    margin, gap = abs(c.candidate - thresh), abs(acc + s.y - c.candidate)
                    assert margin > max(1e-4 * max(1.0, thresh), 100 * gap), (name, s.step, c.candidate)
                acc = s.acc
    print(f"\nwan {coefficients} thresh {thresh}: package == original {ours}")


def test_without_cfg_the_original_alternates_states():
    """guidance_scale=1: one call per step. The original still keys its state by the counter's parity: even steps
    and odd steps are two interleaved states (each compares with the signal two steps back), its forced counters
    {0, 1, 2N-2, 2N-1} are steps 0, 1 and (the counter wrapping only every other generation) never the last. The
    package keeps one state for the one context: first and last step forced. Measured, not asserted equal."""
    steps, thresh = STEPS[0], 0.3
    plain = wan_generate(quiet(wan_pipeline()), steps, cfg=False)
    pipe, other = quiet(wan_pipeline()), quiet(wan_pipeline())
    tk.enable_teacache(pipe, coefficients=DEFAULT, rel_l1_thresh=thresh)
    port = original.enable(other, thresh, steps, "t2v-1.3B")
    lines = []
    for generation in range(2):
        port.clear()
        out, ref = wan_generate(pipe, steps, cfg=False), wan_generate(other, steps, cfg=False)
        ours = schedules(pipe)["cond"]
        theirs = "".join("C" if c.computed else "R" for c in port.calls)
        assert len(port.calls) == steps and forced_ok(DEFAULT, ours)
        assert [c.cnt for c in port.calls] == [(generation * steps + i) % (2 * steps) for i in range(steps)]
        lines.append(f"  generation {generation + 1}: original {theirs} ({theirs.count('C')} computed, max|diff| vs "
                     f"uncached {(ref - plain).abs().max().item():.4g}); package {ours} ({ours.count('C')} computed, "
                     f"max|diff| vs uncached {(out - plain).abs().max().item():.4g})")  # fmt: skip
    print(f"\nwan {DEFAULT} thresh {thresh}, no CFG:\n" + "\n".join(lines))


def test_the_port_never_reusing_is_the_uncached_pipeline():
    plain = wan_generate(quiet(wan_pipeline()), 6)
    other = quiet(wan_pipeline())
    port = original.enable(other, -math.inf, 6, "t2v-1.3B")
    assert torch.equal(wan_generate(other, 6), plain) and all(c.computed for c in port.calls)


# -- what the pipeline says: step_index, Wan 2.2's stages ------------------------------------------------------


def manual_loop(model, steps: int):
    """A hand-written loop that says which step each call is, as WanPipeline does: cond and uncond per step."""
    call = wan_call()
    negative = dict(call, encoder_hidden_states=torch.zeros_like(call["encoder_hidden_states"]))
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([1000.0 * (1 - i / steps)])
            for name, kw in (("cond", call), ("uncond", negative)):
                with model.cache_context(name, step_index=i, num_inference_steps=steps):
                    outs.append(model(**dict(kw, timestep=t))[0])
    return torch.stack(outs)


def test_step_index_sets_the_step_in_both_implementations():
    """A bare transformer enabled for 10 steps, driven by loops that pass step_index and num_inference_steps:
    a 6-step generation has its last call forced (the count came from the loop, not the config), and the next
    generation starts at its step 0 without reset_teacache."""
    fused, ref = wan_transformer(), wan_transformer()
    for m, reference in ((fused, False), (ref, True)):
        tk.enable_teacache(m, num_inference_steps=10, coefficients=DEFAULT, rel_l1_thresh=0.6, reference=reference)
    for steps in (6, 6, 8):
        assert torch.equal(manual_loop(fused, steps), manual_loop(ref, steps))
        assert schedules(fused) == schedules(ref)
        assert all(len(s) == steps and s[0] == s[-1] == "C" for s in schedules(fused).values()), schedules(fused)
    assert "R" in "".join(schedules(fused).values())


def test_wan22_two_stages_each_with_its_own_state_and_steps():
    """transformer: the high-noise steps (t >= boundary_ratio * 1000), transformer_2 the rest, each its own state
    per CFG context, forced first and last call of its own share, its own threshold (transformer_2=...)."""
    options = dict(coefficients=DEFAULT, rel_l1_thresh=0.3, transformer_2=dict(rel_l1_thresh=0.6))
    fused, ref = quiet(wan_pipeline(two_stage=True)), quiet(wan_pipeline(two_stage=True))
    tk.enable_teacache(fused, **options)
    tk.enable_teacache(ref, reference=True, **options)
    seen = ""
    for steps in STEPS:
        out, expected = wan_generate(fused, steps), wan_generate(ref, steps)
        summary = tk.summary(fused)
        assert isinstance(summary, StagedSummary) and schedules(fused) == schedules(ref)
        assert torch.equal(out, expected)
        timesteps = fused.scheduler.timesteps
        high = int((timesteps >= fused.config.boundary_ratio * 1000).sum())
        assert 0 < high < steps
        lengths = {"transformer": high, "transformer_2": steps - high}
        for name, s in schedules(fused).items():
            stage = name.split("/")[0]
            assert len(s) == lengths[stage] and s[0] == s[-1] == "C", (name, s)
            seen += s[1:-1]
        assert summary.stages["transformer_2"].rel_l1_thresh == 0.6 and summary.stages["transformer"].rel_l1_thresh == 0.3
    assert "R" in seen, seen
    assert "transformer_2:" in str(summary) and summary.memory_bytes > 0


def test_wan22_default_needs_coefficients_and_disable_restores_both():
    pipe, plain = quiet(wan_pipeline(two_stage=True)), quiet(wan_pipeline(two_stage=True))
    with pytest.raises(ValueError, match="no published coefficients for a two-stage"):
        tk.enable_teacache(pipe)
    assert getattr(pipe.transformer, "_teacache", None) is None and getattr(pipe.transformer_2, "_teacache", None) is None
    with pytest.raises(ValueError, match="rel_l1_thresh must be"):  # the second's config is validated before any change
        tk.enable_teacache(pipe, coefficients=DEFAULT, transformer_2=dict(rel_l1_thresh=-1.0))
    assert getattr(pipe.transformer, "_teacache", None) is None
    expected = wan_generate(plain, 8)
    before = [names(pipe.transformer), names(pipe.transformer_2)]
    tk.enable_teacache(pipe, coefficients=DEFAULT, rel_l1_thresh=0.6)
    assert not torch.equal(wan_generate(pipe, 8), expected)
    tk.disable_teacache(pipe)
    assert [names(pipe.transformer), names(pipe.transformer_2)] == before
    assert not {"set_timesteps", "set_begin_index", "_teacache_followers"} & set(vars(pipe.scheduler))  # unpatched
    assert torch.equal(wan_generate(pipe, 8), expected)
    zero = quiet(wan_pipeline(two_stage=True))
    tk.enable_teacache(zero, coefficients=DEFAULT, rel_l1_thresh=0.0)
    assert torch.equal(wan_generate(zero, 8), expected)


def test_image_to_video_pipeline_matches_reference():
    fused, ref = quiet(wan_i2v_pipeline()), quiet(wan_i2v_pipeline())
    tk.enable_teacache(fused, coefficients="wan2.1-i2v-14b-480p", rel_l1_thresh=0.2)
    tk.enable_teacache(ref, coefficients="wan2.1-i2v-14b-480p", rel_l1_thresh=0.2, reference=True)
    for steps in STEPS:
        out, expected = wan_generate(fused, steps), wan_generate(ref, steps)
        assert schedules(fused) == schedules(ref) and torch.equal(out, expected)
        assert all(len(s) == steps and s[0] == s[-1] == "C" for s in schedules(fused).values())
    assert "R" in "".join(schedules(fused).values())


# -- the model as it was -----------------------------------------------------------------------------------------


def test_threshold_zero_is_the_uncached_pipeline_and_disable_restores():
    plain, pipe = quiet(wan_pipeline()), quiet(wan_pipeline())
    expected = wan_generate(plain, 8)
    tk.enable_teacache(pipe, coefficients=DEFAULT, rel_l1_thresh=0.0)
    assert torch.equal(wan_generate(pipe, 8), expected)
    before = names(pipe.transformer)
    hooks = dict(pipe.transformer.condition_embedder._forward_hooks)
    tk.enable_teacache(pipe, rel_l1_thresh=0.6)
    assert names(pipe.transformer) == before and not torch.equal(wan_generate(pipe, 8), expected)
    tk.disable_teacache(pipe)
    assert names(pipe.transformer) == before and not pipe.transformer.condition_embedder._forward_hooks
    assert len(hooks) == 1  # the capture hook, while enabled
    assert torch.equal(wan_generate(pipe, 8), expected)


def test_lora_round_trip_while_enabled(tmp_path):
    peft = pytest.importorskip("peft")
    call = wan_call()
    plain, enabled = wan_transformer(), wan_transformer()
    tk.enable_teacache(enabled, num_inference_steps=4, rel_l1_thresh=0.0, coefficients=DEFAULT)
    for model in (plain, enabled):
        torch.manual_seed(0)
        model.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    assert names(enabled) == names(plain)
    with torch.no_grad():
        expected = plain(**call)[0]
        assert torch.equal(enabled(**call)[0], expected)
    enabled.save_lora_adapter(tmp_path, weight_name="lora.safetensors")
    fresh = wan_transformer()
    tk.enable_teacache(fresh, num_inference_steps=4, rel_l1_thresh=0.0, coefficients=DEFAULT)
    fresh.load_lora_adapter(tmp_path, weight_name="lora.safetensors", prefix=None)
    with torch.no_grad():
        assert torch.equal(fresh(**call)[0], expected)


def meta_transformer(cls_name="WanTransformer3DModel", **config):
    import diffusers

    with torch.device("meta"):  # the real class and config; no memory
        return getattr(diffusers, cls_name)(**{"num_layers": 1, "ffn_dim": 16, **config})


@pytest.mark.parametrize(
    "config, expected",
    [
        (dict(num_attention_heads=12, attention_head_dim=128), "wan2.1-t2v-1.3b"),
        (dict(num_attention_heads=40, attention_head_dim=128), "wan2.1-t2v-14b"),
        (dict(num_attention_heads=40, attention_head_dim=128, in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
         "wan2.1-i2v-14b-480p"),  # fmt: skip
    ],
)
def test_default_set_from_the_config(config, expected):
    model = meta_transformer(**config)
    tk.enable_teacache(model, num_inference_steps=50)
    assert tk.summary(model).coefficients == expected and tk.summary(model).rel_l1_thresh > 0


def test_no_published_set_is_an_error_naming_the_way_out():
    model = meta_transformer(num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48)  # TI2V-5B
    with pytest.raises(ValueError, match="hidden size 3072.*coefficients="):
        tk.enable_teacache(model, num_inference_steps=50)
    tk.enable_teacache(model, num_inference_steps=50, coefficients="wan2.1-t2v-1.3b-ret")  # given: served


def test_vace_is_refused_by_name():
    model = meta_transformer("WanVACETransformer3DModel", num_attention_heads=2, attention_head_dim=12, vace_layers=[0])
    with pytest.raises(NotImplementedError, match="WanVACETransformer3DModel: its forward adds VACE control hints"):
        tk.enable_teacache(model, num_inference_steps=4, coefficients=DEFAULT)


def test_a_ret_set_on_a_family_without_its_signal_is_refused():
    from teacache_kernels.tiny_models import tiny_flux_transformer

    with pytest.raises(ValueError, match="'wan2.1-t2v-1.3b-ret' was fitted on the signal 'timestep_projection'"):
        tk.enable_teacache(tiny_flux_transformer(), num_inference_steps=4, coefficients=RET)


# -- compile ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_pipelines_match_eager_without_recompiles():
    """Both modes (ret on WanPipeline, default on the two-stage pipeline): 0 graph breaks, one warm-up generation, then no recompile across
    generations, step counts and CFG contexts; compiled vs the eager reference within the FLUX budget."""
    model = wan_transformer()
    tk.enable_teacache(model, num_inference_steps=4, coefficients=DEFAULT)
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch._dynamo.explain(model)(**wan_call()).graph_break_count == 0
    torch._dynamo.reset()

    plain = quiet(wan_pipeline(two_stage=True))
    plain_eager = wan_generate(plain, 8)
    plain.transformer, plain.transformer_2 = torch.compile(plain.transformer), torch.compile(plain.transformer_2)
    compile_error = (wan_generate(plain, 8) - plain_eager).abs().max().item()
    scale = plain_eager.abs().max().item()
    for coefficients, two_stage in ((RET, False), (DEFAULT, True)):
        pipe, ref = quiet(wan_pipeline(two_stage=two_stage)), quiet(wan_pipeline(two_stage=two_stage))
        tk.enable_teacache(pipe, coefficients=coefficients, rel_l1_thresh=0.3)
        tk.enable_teacache(ref, coefficients=coefficients, rel_l1_thresh=0.3, reference=True)
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
        if two_stage:
            pipe.transformer_2 = torch.compile(pipe.transformer_2, fullgraph=True)
        wan_generate(pipe, 6)  # warm-up
        with torch._dynamo.config.patch(error_on_recompile=True):
            for steps in (8, 5):
                out, expected = wan_generate(pipe, steps), wan_generate(ref, steps)
                assert schedules(pipe) == schedules(ref), (coefficients, two_stage, steps)
                error = (out - expected).abs().max().item()
                assert error <= 2 * compile_error + 1e-6 * scale, (coefficients, two_stage, steps, error, compile_error)
        print(f"\nwan {coefficients} two-stage={two_stage}: compiled vs eager {error:.3g} (plain compile error {compile_error:.3g})")
