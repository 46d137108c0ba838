"""Options beyond the original TeaCache, and calibrated coefficient files.

Each option is off by default. The oracle's behaviour is checked against schedules worked out by hand;
the fused op (torch path and Triton kernel) against the oracle call by call, with test_decide's budget;
the FLUX integration against the reference implementation (bit-identical, as in test_flux).
"""

import dataclasses
import json
import math

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels import state as S
from teacache_kernels.coefficients import FILE_FORMAT, CalibratedSet, nearest
from teacache_kernels.config import ResolvedConfig, TeaCacheConfig
from teacache_kernels.reference import TeaCacheOracle
from teacache_kernels.tiny_models import TinyFluxShape, flow_matching_loop, flux_inputs, tiny_flux_transformer

from test_decide import check_against_oracle, random_walk
from test_reference import make_config, schedule, signals_with_distances

D = [0.05] * 9  # ten calls, each 5% away from the previous one


def with_options(config, **options):
    return dataclasses.replace(config, **options)


# --- the oracle, by hand ------------------------------------------------------------------------------


def test_max_consecutive_skips_forces_a_compute_after_the_limit():
    config = with_options(make_config(thresh=50.0), max_consecutive_skips=2)
    assert schedule(TeaCacheOracle(config), signals_with_distances(D)) == "CRRCRRCRRC"


def test_zero_consecutive_skips_never_reuses():
    config = with_options(make_config(thresh=50.0), max_consecutive_skips=0)
    assert schedule(TeaCacheOracle(config), signals_with_distances(D)) == "C" * 10


def test_skip_window_is_inclusive_at_both_ends():
    config = with_options(make_config(thresh=50.0), min_skip_step=3, max_skip_step=6)
    assert schedule(TeaCacheOracle(config), signals_with_distances(D)) == "CCCRRRRCCC"


def test_forced_calls_in_the_window_reset_the_accumulator():
    # thresh 0.12 with x = 0.05: reuse twice (0.05, 0.10), compute at 0.15. The window forces step 5.
    config = with_options(make_config(thresh=0.12), max_skip_step=4)
    oracle = TeaCacheOracle(config)
    assert schedule(oracle, signals_with_distances(D)) == "CRRCRCCCCC"
    assert [r.acc for r in oracle.history][4:] == [pytest.approx(0.05)] + [0.0] * 5


def test_clamp_x_evaluates_the_polynomial_at_the_range_edge_and_logs_the_raw_x():
    distances = [0.05, 0.50, 0.05, 0.05, 0.05]
    plain = TeaCacheOracle(make_config(thresh=0.45, steps=6))
    clamped = TeaCacheOracle(with_options(make_config(thresh=0.45, steps=6), x_range=(0.0, 0.1)))
    signals = signals_with_distances(distances)
    assert schedule(plain, signals) == "CRCRRC"  # 0.05, then 0.55 >= 0.45 computes; 0.05, 0.10
    assert schedule(clamped, signals) == "CRRRRC"  # 0.05, 0.15 (0.5 counts as 0.1), 0.20, 0.25
    assert [r.x for r in clamped.history][1:5] == pytest.approx(distances[:4])
    assert [r.y for r in clamped.history][1:5] == pytest.approx([0.05, 0.1, 0.05, 0.05])


def test_abs_rescaled_adds_negative_polynomial_values():
    # poly(x) = x - 0.1: -0.05 at every call. Signed, the accumulator only falls (reuse to the end);
    # with abs it rises by 0.05 per call: reuse twice, compute at 0.15 >= 0.12.
    signed = with_options(make_config(thresh=0.12), coefficients=(1.0, -0.1))
    absolute = with_options(signed, abs_rescaled=True)
    signals = signals_with_distances(D)
    assert schedule(TeaCacheOracle(signed), signals) == "CRRRRRRRRC"
    assert schedule(TeaCacheOracle(absolute), signals) == "CRRCRRCRRC"


def test_denominator_eps_is_added_to_the_mean_of_the_previous_signal():
    signals = signals_with_distances([0.05, 0.05])
    eps = float(signals[0].abs().mean())  # doubles the denominator: x halves
    oracle = TeaCacheOracle(with_options(make_config(thresh=50.0), denominator_eps=eps))
    schedule(oracle, signals)
    assert oracle.history[1].x == pytest.approx(0.025, rel=1e-6)
    zeros = [torch.zeros(8), torch.ones(8)]  # a zero previous signal: x = 1 / eps instead of a forced compute
    oracle = TeaCacheOracle(with_options(make_config(thresh=1e12), denominator_eps=1e-8, coefficients=(1.0, 0.0)))
    assert schedule(oracle, zeros) == "CR" and oracle.history[1].x == pytest.approx(1e8)


def test_qwen_image_set_carries_vllm_omni_rule_and_explicit_sets_do_not():
    qwen = ResolvedConfig.resolve(TeaCacheConfig(num_inference_steps=10), "qwen-image")
    assert qwen.abs_rescaled and qwen.denominator_eps == 1e-8 and qwen.rel_l1_thresh == 0.2
    flux = ResolvedConfig.resolve(TeaCacheConfig(num_inference_steps=10), "flux")
    assert not flux.abs_rescaled and flux.denominator_eps == 0.0
    explicit = ResolvedConfig.resolve(TeaCacheConfig(rel_l1_thresh=0.2, coefficients=qwen.coefficients), None)
    assert not explicit.abs_rescaled and explicit.denominator_eps == 0.0
    assert ResolvedConfig.resolve(TeaCacheConfig(abs_rescaled=False), "qwen-image").abs_rescaled is False
    assert ResolvedConfig.resolve(TeaCacheConfig(abs_rescaled=True), "flux").abs_rescaled is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_op_matches_the_oracle_with_the_qwen_image_rule(impl, dtype):
    # Distances of 0.1-0.5 %, where the qwen-image polynomial is negative (it is from 0 to 0.0069).
    config = ResolvedConfig.resolve(TeaCacheConfig(rel_l1_thresh=0.02, num_inference_steps=12), "qwen-image")
    signals = random_walk(3000, 26, dtype, seed=3, step_sizes=(0.002, 0.005, 0.003, 0.001, 0.004))
    got, _ = check_against_oracle(signals, config, impl)
    signed, _ = check_against_oracle(signals, dataclasses.replace(config, abs_rescaled=False), impl)
    assert got != signed, "abs_rescaled did not change the schedule: the test would not catch it being ignored"


def test_options_default_off():
    config = ResolvedConfig.resolve(TeaCacheConfig(rel_l1_thresh=0.4, num_inference_steps=10), "flux")
    values = S.config_values(config)
    assert values[S.MAX_CONSECUTIVE] == math.inf and values[S.MAX_SKIP_STEP] == math.inf
    assert values[S.MIN_SKIP_STEP] == 0.0 and (values[S.X_LO], values[S.X_HI]) == (-math.inf, math.inf)


# --- the fused op against the oracle ------------------------------------------------------------------

OPTIONS = {
    "max-consecutive-1": dict(max_consecutive_skips=1),
    "max-consecutive-3": dict(max_consecutive_skips=3),
    "window": dict(min_skip_step=3, max_skip_step=8),
    "clamp": dict(clamp_x=(0.0, 0.015)),
    "all": dict(max_consecutive_skips=2, min_skip_step=2, max_skip_step=9, clamp_x=(0.0, 0.05)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_fused_op_matches_the_oracle_with_options(impl, dtype, name):
    config = ResolvedConfig.resolve(
        TeaCacheConfig(rel_l1_thresh=1.5, num_inference_steps=12, **OPTIONS[name]), "flux"
    )
    signals = random_walk(3000, 26, dtype, seed=7)
    got, oracle = check_against_oracle(signals, config, impl)
    plain, _ = check_against_oracle(signals, dataclasses.replace(
        config, max_consecutive_skips=None, min_skip_step=None, max_skip_step=None, x_range=None), impl)
    assert got != plain, f"option {name} did not change the schedule: the test would not catch it being ignored"


# --- config validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(max_consecutive_skips=-1), "max_consecutive_skips must be an integer >= 0, got -1"),
        (dict(max_consecutive_skips=1.5), "max_consecutive_skips must be an integer >= 0, got 1.5"),
        (dict(min_skip_step=5, max_skip_step=2), "min_skip_step (5) must be <= max_skip_step (2)"),
        (dict(clamp_x=(0.3, 0.1)), "clamp_x must be a finite range with lo < hi, got (0.3, 0.1)"),
        (dict(clamp_x="yes"), "clamp_x must be False, True or a (lo, hi) pair of numbers, got 'yes'"),
        (dict(clamp_x=True), "clamp_x=True clamps to a calibrated x range"),
        (dict(coefficients="flux", coefficients_file="c.json"), "give coefficients or coefficients_file, not both"),
        (dict(calibrated_model="m"), "calibrated_model names a model of a coefficients_file"),
        (dict(abs_rescaled="yes"), "abs_rescaled must be True, False or None, got 'yes'"),
    ],
)
def test_bad_options_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TeaCacheConfig(rel_l1_thresh=0.3, **fields)


# --- calibrated coefficient files ----------------------------------------------------------------------

SMALL = TinyFluxShape(height=8, width=8)  # 16 image tokens
LARGE = TinyFluxShape()  # 64 image tokens
FLUX_POLY = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]


def entry(coefficients, x_range=(0.01, 0.2), thresh=0.5, signal="modulated_input"):
    return dict(signal=signal, target="output", degree=len(coefficients) - 1, coefficients=coefficients, r2=0.9,
                pearson=0.9, spearman=0.9, x_range=list(x_range), num_pairs=10, num_inference_steps=20,
                num_samples=1, recommended_thresh=thresh, candidates=[])


def write(tmp_path, models):
    path = tmp_path / "coefficients.json"
    path.write_text(json.dumps({"format": FILE_FORMAT, "models": models}))
    return path


@pytest.fixture
def calibrated_file(tmp_path):
    # Different polynomials per length (the 16-token one scaled down, so it reuses more).
    return write(tmp_path, {"tiny": {"16": entry([c / 4 for c in FLUX_POLY], thresh=0.6), "64": entry(FLUX_POLY, thresh=0.4)}})


def test_nearest_fitted_length_wins_and_ties_go_to_the_longer():
    sets = [CalibratedSet(n, (1.0,), (0.0, 1.0), None, "modulated_input") for n in (16, 64, 256)]
    assert [nearest(sets, n).seq_len for n in (1, 16, 39, 40, 41, 100, 1000)] == [16, 16, 16, 64, 64, 64, 256]


@pytest.mark.parametrize("shape, length", [(SMALL, "16"), (LARGE, "64")], ids=["16-tokens", "64-tokens"])
def test_each_context_runs_on_its_sequence_length_set(calibrated_file, shape, length):
    model = tiny_flux_transformer(shape)
    tk.enable_teacache(model, coefficients_file=calibrated_file, num_inference_steps=6)
    latents, cond = flux_inputs(shape)
    flow_matching_loop(model, latents, cond, 6)
    st = model._teacache.cache.contexts["cond"]
    expected = json.loads(calibrated_file.read_text())["models"]["tiny"][length]
    assert st.config[S.COEFFS + S.MAX_COEFFICIENTS - 5 :].tolist() == pytest.approx(expected["coefficients"])
    assert st.config[S.THRESH].item() == expected["recommended_thresh"]
    assert tk.summary(model).contexts["cond"].calls == 6


@pytest.mark.parametrize("signal", ["modulated_input", "timestep_embedding"])
def test_calibrated_fused_matches_reference_with_clamp_and_options(tmp_path, signal):
    path = write(tmp_path, {"tiny": {"64": entry(FLUX_POLY, x_range=(0.02, 0.08), thresh=0.8, signal=signal)}})
    latents, cond = flux_inputs(LARGE)
    negative = flux_inputs(LARGE, seed=9)[1]
    runs = {}
    for reference in (False, True):
        model = tiny_flux_transformer(LARGE)
        tk.enable_teacache(model, coefficients_file=path, clamp_x=True, max_consecutive_skips=3,
                           num_inference_steps=20, reference=reference)
        out = flow_matching_loop(model, latents, cond, 20, negative=negative, cfg_scale=3.0)
        runs[reference] = (out, {n: c.schedule for n, c in tk.summary(model).contexts.items()})
    assert runs[False][1] == runs[True][1]
    assert torch.equal(runs[False][0], runs[True][0])
    assert "R" in runs[False][1]["cond"] and "RRRR" not in "".join(runs[False][1].values())


def test_file_without_recommended_threshold_needs_one(tmp_path):
    path = write(tmp_path, {"tiny": {"64": entry(FLUX_POLY, thresh=None)}})
    model = tiny_flux_transformer(LARGE)
    with pytest.raises(ValueError, match=r"rel_l1_thresh is required: .* no recommended_thresh for model 'tiny'"):
        tk.enable_teacache(model, coefficients_file=path, num_inference_steps=6)
    tk.enable_teacache(model, coefficients_file=path, rel_l1_thresh=0.3, num_inference_steps=6)
    assert model._teacache.cache.config.rel_l1_thresh == 0.3


@pytest.mark.parametrize(
    "models, name, message",
    [
        ({"a": {"64": entry(FLUX_POLY)}, "b": {"64": entry(FLUX_POLY)}}, None, r"holds models \['a', 'b'\]: choose one"),
        ({"a": {"64": entry(FLUX_POLY)}}, "c", r"has no model 'c'; it has \['a'\]"),
        ({"a": {"64": entry(FLUX_POLY, signal="norm_out")}}, None, r"fitted on the signal 'norm_out', which TeaCache's flux span does not compute"),
        ({"a": {"64": {"coefficients": FLUX_POLY}}}, None, r"model 'a', sequence length 64: 'x_range'"),
    ],
)
def test_bad_files_are_refused_with_what_is_wrong(tmp_path, models, name, message):
    path = write(tmp_path, models)
    with pytest.raises(ValueError, match=message):
        tk.enable_teacache(tiny_flux_transformer(LARGE), coefficients_file=path, calibrated_model=name,
                           num_inference_steps=6)


def test_missing_or_foreign_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tk.enable_teacache(tiny_flux_transformer(LARGE), coefficients_file=tmp_path / "nope.json", num_inference_steps=6)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a 'teacache_kernels/coefficients/1' file"):
        tk.enable_teacache(tiny_flux_transformer(LARGE), coefficients_file=tmp_path / "other.json", num_inference_steps=6)
