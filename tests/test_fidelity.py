"""Fidelity to the original TeaCache implementations, per family, on the tiny random diffusers pipelines.

The yardsticks are independent ports of the originals (tests/originals/): the original's patched transformer
forward, with its own signal, distance, np.poly1d rescale, accumulator, counters, forced calls, CFG handling
and residual streams, installed on a second copy of the same tiny pipeline. For each family, at several
thresholds, over two generations (a new pipeline call each, CFG as the pipeline does it), the schedule of
`enable_teacache(pipe, rel_l1_thresh=t)` (the fused path) must equal the port's, call for call, per state.

Error budget for the outputs: zero (bitwise). Both sides run the same diffusers modules on the same inputs in
the same order, eagerly on CPU in float32; a computed call stores `out - in` and a reused call returns
`in + residual` in float32 on both sides. The one computation that differs is the distance x (the package
sums exact element differences in fp32 and divides in float64; the originals take two fp32 means and
`.item()`), and x only feeds the decision: every non-forced decision of the port is asserted clear of the
threshold by far more than the difference between the two accumulators, so it cannot flip.

Where the package deviates on purpose (family docstrings, reference.py), the comparison isolates it
(Qwen-Image: cooldown_steps=0 against vLLM-Omni's code; FLUX with true CFG: the original run per branch), and
a test below measures each deviation: what the original does, what the package does, computed calls and
the output difference against the uncached pipeline. Run with `-s` to see the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels.tiny_families import TINY
from teacache_kernels.tiny_models import tiny_flux_pipeline, tiny_flux_prompt

from originals import cogvideox, flux, lumina2, mochi, qwen_image

STEPS = 10
GENERATIONS = 2
X_RTOL = 1e-5  # package x vs the original's x (measured: ~1e-7, fp32 means vs exact sums)
TIE_MARGIN = 1e-4  # least |accumulator - threshold| at a non-forced decision, absolute (x max(1, thresh))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


# -- the families ---------------------------------------------------------------------------------------------


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline():
    return _quiet(tiny_flux_pipeline())


def flux_generate(pipe, steps, cfg=True, **kw):
    prompt, negative = tiny_flux_prompt(), tiny_flux_prompt(seed=3)
    extra = {}
    if cfg:  # true CFG: "cond" and "uncond" calls each step
        extra = dict(negative_prompt_embeds=negative["prompt_embeds"], negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"], true_cfg_scale=3.0)  # fmt: skip
    return pipe(**prompt, **extra, num_inference_steps=steps, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).images  # fmt: skip


@dataclass(frozen=True)
class Case:
    thresh: float
    cfg: bool = True
    port: dict = field(default_factory=dict)  # extra arguments of the port
    package: dict = field(default_factory=dict)  # extra fields of enable_teacache

    def __str__(self):
        extra = {**self.port, **self.package}
        return f"thresh={self.thresh}{'' if self.cfg else ' no-cfg'}{' ' + str(extra) if extra else ''}"


@dataclass(frozen=True)
class Family:
    pipeline: Callable[[], Any]
    generate: Callable[..., torch.Tensor]
    install: Callable[[Any, Case], Any]  # the original on a pipeline -> its recorder
    context: Callable[[str], str] = lambda key: key  # the port's state key -> the package's context name
    before: Callable[[Any, Case], None] = lambda port, case: None  # what runs before each generation
    cases: tuple[Case, ...] = ()


def _tiny(name):
    fam = TINY[name]
    return lambda: _quiet(fam.pipeline()), fam.generate


FAMILIES: dict[str, Family] = {
    "flux": Family(
        flux_pipeline, flux_generate,
        # With true CFG the original (one state) is run per branch: one copy of its state per cache context.
        lambda pipe, case: flux.enable(pipe, case.thresh, STEPS, per_context=case.cfg),
        context=lambda key: "cond" if key == "transformer" else key,
        cases=(Case(0.3), Case(0.6), Case(1.5), Case(0.3, cfg=False), Case(0.6, cfg=False), Case(1.5, cfg=False)),
    ),
    "qwen-image": Family(
        *_tiny("qwen-image"),
        lambda pipe, case: qwen_image.enable(pipe, case.thresh),
        context={"positive": "cond", "negative": "uncond"}.get,
        before=lambda port, case: port.refresh(do_true_cfg=case.cfg),  # vLLM-Omni: worker refresh + pipeline flag
        # vLLM-Omni's code forces only the first call: the package's guide-following last call is off here.
        cases=tuple(Case(t, package=dict(cooldown_steps=0)) for t in (0.1, 0.3, 0.6))
        + (Case(0.3, cfg=False, package=dict(cooldown_steps=0)),),
    ),
    "lumina2": Family(
        *_tiny("lumina2"),
        lambda pipe, case: lumina2.enable(pipe, case.thresh, STEPS, **case.port),
        cases=(Case(0.3), Case(0.7), Case(0.4, port=dict(coefficients=lumina2.V2), package=dict(coefficients="lumina2-v2"))),
    ),
    "cogvideox": Family(
        *_tiny("cogvideox"),
        lambda pipe, case: cogvideox.enable(pipe, case.thresh, STEPS, **case.port),
        # The tiny model is a 5b variant: its set's polynomial goes negative on the random model's distances
        # (all reuse at any threshold), so two other polynomials vary the schedule.
        cases=(
            Case(0.3, port=dict(coefficients="CogVideoX-5b")),
            Case(1.0, port=dict(coefficients="CogVideoX1.5-5B"), package=dict(coefficients="cogvideox1.5-5b")),
            Case(2.0, port=dict(coefficients="CogVideoX1.5-5B"), package=dict(coefficients="cogvideox1.5-5b")),
            Case(0.5, port=dict(coefficients=[1.0, 0.0]), package=dict(coefficients=[1.0, 0.0])),
        ),
    ),
    "mochi": Family(
        *_tiny("mochi"),
        lambda pipe, case: mochi.enable(pipe, case.thresh, STEPS),
        cases=(Case(0.1), Case(0.3), Case(1.0)),
    ),
}


# -- comparing ------------------------------------------------------------------------------------------------


def package_schedules(pipe) -> dict[str, str]:
    return {name: c.schedule for name, c in tk.summary(pipe).contexts.items()}


def compare_decisions(pipe, port, family: Family, thresh: float) -> float:
    """Per state, call for call: the package's x against the original's, and every non-forced decision of
    the original clear of the threshold by far more than the two accumulators differ. Returns max rel. x error."""
    summary = tk.summary(pipe)
    by_key: dict[str, list] = {}
    for call in port.calls:
        by_key.setdefault(family.context(call.key), []).append(call)
    assert set(by_key) == set(summary.contexts), (set(by_key), set(summary.contexts))
    worst_x = 0.0
    for name, calls in by_key.items():
        steps = summary.contexts[name].steps
        assert len(steps) == len(calls) == STEPS, (name, len(steps), len(calls))
        acc_before = 0.0
        for i, (s, c) in enumerate(zip(steps, calls)):
            assert c.cnt == i, f"{name} call {i}: the original's counter reads {c.cnt}"  # counter == step index
            if not c.forced:
                assert math.isfinite(s.x), f"{name} call {i}: the package has no x where the original compared"
                worst_x = max(worst_x, abs(s.x - c.x) / abs(c.x))
                pkg_candidate = acc_before + s.y
                gap = abs(pkg_candidate - c.candidate)
                margin = abs(c.candidate - thresh)
                assert margin > max(TIE_MARGIN * max(1.0, thresh), 100 * gap), (
                    f"{name} call {i}: near tie (accumulator {c.candidate!r} vs threshold {thresh}, package {pkg_candidate!r})"
                )
            acc_before = s.acc
    assert worst_x <= X_RTOL, worst_x
    return worst_x


@pytest.mark.parametrize("name", list(FAMILIES))
def test_schedules_and_outputs_match_the_original(name):
    family = FAMILIES[name]
    middles, lines = "", []
    for case in family.cases:
        pipe, original = family.pipeline(), family.pipeline()
        tk.enable_teacache(pipe, rel_l1_thresh=case.thresh, **case.package)
        port = family.install(original, case)
        for generation in range(GENERATIONS):
            port.clear()
            family.before(port, case)
            out = family.generate(pipe, STEPS, cfg=case.cfg)
            expected = family.generate(original, STEPS, cfg=case.cfg)
            schedules, theirs = package_schedules(pipe), port.schedules(family.context)
            assert schedules == theirs, f"{case}, generation {generation + 1}: package {schedules} != original {theirs}"
            x_error = compare_decisions(pipe, port, family, case.thresh)
            error = (out - expected).abs().max().item()
            assert torch.equal(out, expected), (str(case), generation, error)
            middles += "".join(s[1:-1] for s in schedules.values())
        lines.append(f"  {case}: {schedules}  (x rel. error {x_error:.1e}, output max|diff| {error:g})")
    print(f"\n{name}: package == original, {GENERATIONS} generations of {STEPS} steps each\n" + "\n".join(lines))
    assert "R" in middles and "C" in middles, f"{name}: the cases exercise only one outcome ({middles})"


# -- deviations, measured -------------------------------------------------------------------------------------


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def computed(schedules: dict[str, str]) -> int:
    return sum(s.count("C") for s in schedules.values())


def test_qwen_image_last_call_forced_by_the_guide_not_by_vllm_omni_code():
    """vLLM-Omni's guide: first and last calls computed; its code forces only the first. The package follows
    the guide (cooldown_steps=1 by default). Where the code reuses the last call, that call is the only difference."""
    family, case = FAMILIES["qwen-image"], Case(0.3)
    plain = family.generate(family.pipeline(), STEPS)
    pipe, original = family.pipeline(), family.pipeline()
    tk.enable_teacache(pipe, rel_l1_thresh=case.thresh)  # defaults: the guide's forced last call
    port = family.install(original, case)
    port.refresh(do_true_cfg=True)
    out, ref = family.generate(pipe, STEPS), family.generate(original, STEPS)
    ours, theirs = package_schedules(pipe), port.schedules(family.context)
    assert set(ours) == set(theirs) == {"cond", "uncond"}
    for name in ours:
        assert ours[name][:-1] == theirs[name][:-1]  # the same decisions up to the last call
        assert theirs[name][-1] == "R" and ours[name][-1] == "C"  # vLLM-Omni reuses it; the package computes it
    print(f"\nqwen-image thresh {case.thresh}: vLLM-Omni code {theirs} ({computed(theirs)} computed), "
          f"package {ours} ({computed(ours)} computed); max|diff| vs uncached: vLLM-Omni {max_diff(ref, plain):.4g}, "
          f"package {max_diff(out, plain):.4g}; package vs vLLM-Omni {max_diff(out, ref):.4g}")  # fmt: skip
    assert not torch.equal(out, ref)


def lumina2_runs(cfg: bool, **kw):
    """Two generations with the package and with the original. Returns per generation: (package schedules,
    original records, package output, original output), and the uncached output."""
    family, case = FAMILIES["lumina2"], Case(0.3)
    plain = family.generate(family.pipeline(), STEPS, cfg=cfg, **kw)
    pipe, original = family.pipeline(), family.pipeline()
    tk.enable_teacache(pipe, rel_l1_thresh=case.thresh)
    port = family.install(original, case)
    runs = []
    for _ in range(GENERATIONS):
        port.clear()
        out, ref = family.generate(pipe, STEPS, cfg=cfg, **kw), family.generate(original, STEPS, cfg=cfg, **kw)
        runs.append((package_schedules(pipe), list(port.calls), out, ref))
    return runs, plain


def test_lumina2_cfg_truncation_freezes_the_original_counter():
    """cfg_trunc_ratio=0.5: the uncond calls stop after half the steps. The original's shared counter advances
    only on them, so it freezes: the last call is not forced and the next generation starts mid-count. The
    package counts each sequence length's calls: first and last computed in every generation."""
    runs, plain = lumina2_runs(True, cfg_trunc_ratio=0.5)
    half = STEPS // 2
    lines = []
    for generation, (ours, calls, out, ref) in enumerate(runs):
        cond = [c for c in calls if c.key == "seq21"]
        uncond = [c for c in calls if c.key == "seq17"]
        assert len(cond) == STEPS and len(uncond) == half
        if generation == 0:
            assert [c.cnt for c in cond] == list(range(half)) + [half] * half  # frozen at 5
            assert not cond[-1].forced  # the last call is never forced
        else:  # starts at 5: the first call compares against the previous generation's last signal
            assert [c.cnt for c in cond] == list(range(half, STEPS)) + [0] * half  # then wraps and sticks at 0
            assert not cond[0].forced and all(c.forced for c in cond[half:])
        assert ours["seq21"][0] == ours["seq21"][-1] == "C" and len(ours["seq21"]) == STEPS
        assert ours["seq17"][0] == "C" and len(ours["seq17"]) == half
        theirs = {"seq21": "".join("C" if c.computed else "R" for c in cond), "seq17": "".join("C" if c.computed else "R" for c in uncond)}
        lines.append(f"  generation {generation + 1}: original {theirs} ({computed(theirs)} computed, cond counter "
                     f"{[c.cnt for c in cond]}), max|diff| vs uncached {max_diff(ref, plain):.4g}; package {ours} "
                     f"({computed(ours)} computed), max|diff| vs uncached {max_diff(out, plain):.4g}")  # fmt: skip
    assert package_schedules_equal(runs)  # the package repeats itself; the original does not
    assert [c.computed for c in runs[0][1]] != [c.computed for c in runs[1][1]]
    print("\nlumina2 thresh 0.3, cfg_trunc_ratio=0.5:\n" + "\n".join(lines))


def package_schedules_equal(runs) -> bool:
    return all(r[0] == runs[0][0] for r in runs) and all(torch.equal(r[2], runs[0][2]) for r in runs)


def test_lumina2_without_cfg_the_original_never_caches():
    """guidance_scale=1: one call per step, all of the first call's length, so the original's counter never
    moves: every call reads cnt == 0, is forced, and the output is the uncached one. The package caches."""
    runs, plain = lumina2_runs(False)
    lines = []
    for generation, (ours, calls, out, ref) in enumerate(runs):
        assert {c.key for c in calls} == {"seq21"} and all(c.cnt == 0 and c.forced and c.computed for c in calls)
        assert torch.equal(ref, plain)
        assert set(ours) == {"seq21"} and "R" in ours["seq21"]
        lines.append(f"  generation {generation + 1}: original {STEPS}/{STEPS} computed, max|diff| vs uncached "
                     f"{max_diff(ref, plain):.4g}; package {ours} ({computed(ours)}/{STEPS} computed), max|diff| vs "
                     f"uncached {max_diff(out, plain):.4g}")  # fmt: skip
    print("\nlumina2 thresh 0.3, guidance_scale=1:\n" + "\n".join(lines))


def test_threshold_zero_turns_caching_off_where_the_original_still_reuses():
    """The originals skip while acc < thresh: at 0 a polynomial that goes negative (cogvideox-5b on the tiny
    model's distances) still reuses. In the package 0 is the off switch: the uncached pipeline, bit for bit."""
    family = FAMILIES["cogvideox"]
    plain = family.generate(family.pipeline(), STEPS)
    pipe, original = family.pipeline(), family.pipeline()
    tk.enable_teacache(pipe, rel_l1_thresh=0.0)
    port = cogvideox.enable(original, 0.0, STEPS, coefficients="CogVideoX-5b")
    out, ref = family.generate(pipe, STEPS), family.generate(original, STEPS)
    ours, theirs = package_schedules(pipe), port.schedules()
    assert ours == {"cond_uncond": "C" * STEPS} and torch.equal(out, plain)
    assert "R" in theirs["cond_uncond"] and any(c.y < 0 for c in port.calls if not c.forced)
    print(f"\ncogvideox (cogvideox-5b set) thresh 0: original {theirs} ({computed(theirs)}/{STEPS} computed, "
          f"max|diff| vs uncached {max_diff(ref, plain):.4g}); package {ours} ({STEPS}/{STEPS} computed, "
          f"max|diff| vs uncached {max_diff(out, plain):.4g})")  # fmt: skip


def test_flux_true_cfg_the_original_shares_one_state_across_branches():
    """TeaCache4FLUX keeps one state and counts calls with `num_steps = num_inference_steps`: with true CFG
    the cond and uncond calls interleave in it (each compared with the other branch's signal) and the counter
    wraps mid-generation. The package keeps one state per cache context (= the original run per branch,
    which test_schedules_and_outputs_match_the_original holds it to)."""
    family, thresh = FAMILIES["flux"], 0.6
    plain = family.generate(family.pipeline(), STEPS)
    pipe, original = family.pipeline(), family.pipeline()
    tk.enable_teacache(pipe, rel_l1_thresh=thresh)
    port = flux.enable(original, thresh, STEPS)  # the script, literally
    out, ref = family.generate(pipe, STEPS), family.generate(original, STEPS)
    ours = package_schedules(pipe)
    assert [c.cnt for c in port.calls] == [i % STEPS for i in range(2 * STEPS)]  # wraps after half the steps
    assert [i for i, c in enumerate(port.calls) if c.forced] == [0, STEPS - 1, STEPS, 2 * STEPS - 1]
    theirs = {"cond": "".join("C" if c.computed else "R" for c in port.calls[0::2]),
              "uncond": "".join("C" if c.computed else "R" for c in port.calls[1::2])}  # fmt: skip
    branch_x = [round(c.x, 3) for c in port.calls if not c.forced]
    print(f"\nflux thresh {thresh}, true CFG: original (one shared state) {theirs} ({computed(theirs)}/{2 * STEPS} "
          f"computed, x between branches {branch_x[:4]}...), max|diff| vs uncached {max_diff(ref, plain):.4g}; "
          f"package {ours} ({computed(ours)}/{2 * STEPS} computed), max|diff| vs uncached {max_diff(out, plain):.4g}")  # fmt: skip
    assert theirs != ours


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_port_never_reusing_is_the_uncached_pipeline(name):
    """The ports' transcribed forwards are diffusers' own when nothing is reused: bit for bit."""
    family = FAMILIES[name]
    never = 1e-300 if name == "qwen-image" else -math.inf  # vLLM-Omni refuses thresholds <= 0; acc < -inf never holds
    plain = family.generate(family.pipeline(), STEPS)
    original = family.pipeline()
    port = family.install(original, Case(never))
    family.before(port, Case(never))
    out = family.generate(original, STEPS)
    assert all(c.computed for c in port.calls) and len(port.calls) == STEPS * len(port.keys())
    assert torch.equal(out, plain)


def test_a_non_finite_distance_computes_in_both():
    """The package forces a compute on a non-finite distance. The authors' scripts compute there too when x is
    NaN (acc becomes NaN, `NaN < thresh` is False, acc resets to 0): a NaN in the signal, then the next call's
    comparison with it. (They differ only at x = +inf, a previous signal with mean 0, where a polynomial with a
    negative leading coefficient gives acc = -inf and reuse until the next forced call: no modulated signal of
    these models is all zeros.) FLUX transformer, direct calls, a NaN latent at call 2."""
    from teacache_kernels.tiny_models import flux_inputs, tiny_flux_transformer

    steps, thresh = 6, 1.5
    latents, cond = flux_inputs()
    outs, records = {}, {}
    for side in ("package", "original"):
        model = tiny_flux_transformer()
        if side == "package":
            tk.enable_teacache(model, rel_l1_thresh=thresh, num_inference_steps=steps)
        else:
            port = flux.enable(model, thresh, steps)
        outs[side] = []
        with torch.no_grad():
            for i in range(steps):
                x = latents.clone()
                if i == 2:
                    x[0, 0, 0] = float("nan")
                outs[side].append(model(hidden_states=x, timestep=torch.full((1,), 1.0 - i / steps), return_dict=False, **cond)[0])
        records[side] = tk.summary(model).contexts["default"].schedule if side == "package" else port.schedules()["transformer"]
    assert records["package"] == records["original"] == "CRCCRC"
    assert math.isnan(port.calls[2].x) and port.calls[2].acc == 0 and math.isnan(port.calls[3].x)
    for a, b in zip(outs["package"], outs["original"]):  # bitwise, NaNs in the same places
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    print(f"\nflux, NaN latent at call 2 of {steps}: package {records['package']}, original {records['original']}")
