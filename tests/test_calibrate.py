"""Calibration (teacache_kernels.calibration): the polynomial fit, recording on a real diffusers FLUX
transformer (tiny, random weights) with true CFG, the coefficients file, the threshold search, the CLI.

Random weights say nothing about quality: these tests check the mechanics against hand computations.
"""

import json
import math

import numpy as np
import pytest
import torch

import teacache_kernels as tk
from teacache_kernels.calibrate import (
    FORMAT,
    CalibrationSetup,
    ThresholdPoint,
    calibrate,
    find_threshold,
    fit_polynomial,
    load_coefficients_file,
)
from teacache_kernels.calibration import cli
from teacache_kernels.calibration.coefficients_file import merge_entry
from teacache_kernels.calibration.fit import ranks, spearman
from teacache_kernels.calibration.threshold import _choose, psnr
from teacache_kernels.reference import rel_l1
from teacache_kernels.tiny_models import TinyFluxShape, flow_matching_loop, flux_inputs, tiny_flux_transformer

SHAPE = TinyFluxShape(layers=1, single_layers=1)
STEPS = 4
SAMPLES = [0, 1]


def make_run(model, steps=STEPS):
    def run(seed):
        latents, cond = flux_inputs(SHAPE, seed=seed)
        negative = flux_inputs(SHAPE, seed=seed + 50)[1]
        return flow_matching_loop(model, latents, cond, steps, negative=negative, cfg_scale=3.0)

    return run


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one thread runs them fastest, and stays fast when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_flux_transformer(SHAPE)


def assert_untouched(model):
    """No hook left on any module, and `cache_context` is the class's method again."""
    assert "cache_context" not in vars(model)
    assert getattr(model, "_teacache", None) is None
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__


# --- the fit --------------------------------------------------------------------------------------------


def test_fit_recovers_a_known_polynomial():
    rng = np.random.default_rng(0)
    true = [40.0, -12.0, 3.0, 0.05]  # highest power first
    x = rng.uniform(0.01, 0.4, 400)
    y = np.polyval(true, x) + rng.normal(0, 1e-6, x.shape)
    fit = fit_polynomial("s", x, y, degree=3)
    assert fit.r2 > 1 - 1e-9
    np.testing.assert_allclose(fit.coefficients, true, rtol=1e-3, atol=1e-4)
    assert 0.9 < fit.pearson < 1 and fit.spearman == pytest.approx(1.0)  # monotonic, not linear
    assert fit.x_range == (x.min(), x.max()) and fit.num_pairs == 400


def test_fit_drops_non_finite_pairs_and_validates():
    x = np.array([0.1, 0.2, 0.3, np.nan, 0.4, 0.5])
    fit = fit_polynomial("s", x, 2 * x + 1, degree=1)
    assert fit.num_pairs == 5
    np.testing.assert_allclose(fit.coefficients, [2.0, 1.0], atol=1e-12)
    for degree in (0, 8, 2.0, True):
        with pytest.raises(ValueError, match=f"got {degree!r}"):
            fit_polynomial("s", x, x, degree=degree)
    with pytest.raises(ValueError, match="'s': 5 finite"):
        fit_polynomial("s", x, x, degree=5)


def test_spearman_handles_ties():
    np.testing.assert_array_equal(ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([1.0, 4.0, 9.0])) == pytest.approx(1.0)
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, 50).astype(float), rng.normal(size=50)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)


# --- recording on the tiny FLUX with true CFG -----------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(model):
    signals = ("modulated_input", "timestep_embedding", "hidden_states", "single_transformer_blocks.0")
    return calibrate(model, make_run(model), SAMPLES, signals=signals, degree=2, model_name="tiny", progress=False)


def test_recording_counts_pairs_per_generation_and_context(calibrated, model):
    rec = calibrated.recording
    assert calibrated.contexts == ("cond", "uncond")
    assert rec.calls == {(s, c): STEPS for s in SAMPLES for c in ("cond", "uncond")}
    assert rec.num_pairs == len(SAMPLES) * 2 * (STEPS - 1)  # no pair across samples or contexts
    assert sorted(rec.step) == sorted(list(range(1, STEPS)) * len(SAMPLES) * 2)
    assert calibrated.seq_len == SHAPE.image_tokens and calibrated.num_inference_steps == STEPS
    assert calibrated.num_samples == len(SAMPLES)
    assert_untouched(model)


def test_recorded_x_and_y_are_rel_l1_by_hand(calibrated, model):
    seen = {"norm1": [], "out": []}
    h1 = model.transformer_blocks[0].norm1.register_forward_hook(lambda m, a, o: seen["norm1"].append(o[0].clone()))
    h2 = model.register_forward_hook(lambda m, a, o: seen["out"].append(o[0].clone()))
    try:
        make_run(model)(SAMPLES[1])  # calls alternate cond, uncond: cond's steps 1 and 2 are calls 2 and 4
    finally:
        h1.remove()
        h2.remove()
    rec = calibrated.recording
    i = next(k for k in range(rec.num_pairs) if (rec.sample[k], rec.context[k], rec.step[k]) == (1, "cond", 2))
    assert rec.x["modulated_input"][i] == pytest.approx(rel_l1(seen["norm1"][4], seen["norm1"][2]), rel=1e-12)
    assert rec.y[i] == pytest.approx(rel_l1(seen["out"][4], seen["out"][2]), rel=1e-12)
    j = next(k for k in range(rec.num_pairs) if (rec.sample[k], rec.context[k], rec.step[k]) == (1, "uncond", 1))
    assert rec.x["modulated_input"][j] == pytest.approx(rel_l1(seen["norm1"][3], seen["norm1"][1]), rel=1e-12)


def test_ranking_best_and_report(calibrated):
    r2 = [c.r2 for c in calibrated.candidates]
    assert r2 == sorted(r2, reverse=True)
    assert calibrated.best.signal in ("modulated_input", "timestep_embedding")
    assert calibrated.best_overall is calibrated.candidates[0]
    text = calibrated.report()
    assert "ranked by R^2" in text and f"Best usable at run time: {calibrated.best.signal}" in text
    assert "single_transformer_blocks.0" in text


def test_residual_target_and_user_module(model):
    result = calibrate(
        model,
        make_run(model),
        [0],
        signals=["modulated_input", "transformer_blocks.0.ff"],
        target="residual",
        degree=1,
        progress=False,
    )
    assert result.target == "residual" and result.recording.num_pairs == 2 * (STEPS - 1)
    assert result.model_name == "FluxTransformer2DModel"
    assert all(0 < y < math.inf for y in result.recording.y)
    assert_untouched(model)


def test_model_and_cache_context_restored_when_run_raises(model):
    def shadow(name, **kwargs):
        return type(model).cache_context(model, name, **kwargs)

    model.cache_context = shadow  # an instance attribute already there must come back, the same object
    calls = []

    def failing(seed):
        make_run(model, steps=1)(seed)
        calls.append(seed)
        raise KeyError("boom")

    try:
        with pytest.raises(KeyError, match="boom"):
            calibrate(model, failing, [0], progress=False)
        assert calls == [0] and vars(model)["cache_context"] is shadow
    finally:
        del model.cache_context
    assert_untouched(model)


def test_refuses_cached_models_and_bad_arguments(model):
    tk.enable_teacache(model, rel_l1_thresh=0.1, num_inference_steps=STEPS)
    try:
        with pytest.raises(RuntimeError, match="TeaCache is enabled"):
            calibrate(model, make_run(model), [0], progress=False)
        with pytest.raises(RuntimeError, match="TeaCache is enabled"):
            find_threshold(model, make_run(model), [0], min_psnr=30, progress=False)
    finally:
        tk.disable_teacache(model)
    model._cache_config = object()  # what diffusers' enable_cache sets
    try:
        with pytest.raises(RuntimeError, match="diffusers cache"):
            calibrate(model, make_run(model), [0], progress=False)
    finally:
        model._cache_config = None
    with pytest.raises(ValueError, match="'no.such.module'"):
        calibrate(model, make_run(model), [0], signals=["no.such.module"], progress=False)
    with pytest.raises(ValueError, match="'latent'"):
        calibrate(model, make_run(model), [0], target="latent", progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        find_threshold(model, make_run(model), [0], min_psnr=30, min_speedup=2, progress=False)
    assert_untouched(model)


# --- the coefficients file ------------------------------------------------------------------------------


def test_save_merge_load_round_trip(calibrated, tmp_path):
    path = tmp_path / "c.json"
    calibrated.save(path)
    other = dict(calibrated.entry(), coefficients=[1.0, 2.0])
    merge_entry(path, "tiny", 256, other)
    merge_entry(path, "another-model", 64, other)
    calibrated.save(path)  # saving again replaces its own entry only
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and sorted(data["models"]) == ["another-model", "tiny"]
    assert list(data["models"]["tiny"]) == ["64", "256"]
    entry = data["models"]["tiny"]["64"]
    assert set(entry) == {
        "signal", "target", "degree", "coefficients", "r2", "pearson", "spearman", "x_range", "num_pairs",
        "num_inference_steps", "num_samples", "recommended_thresh", "candidates",
    }  # fmt: skip
    assert entry["signal"] == calibrated.best.signal and entry["recommended_thresh"] is None
    assert entry["coefficients"] == list(calibrated.best.coefficients) and len(entry["coefficients"]) == 3
    assert [c["signal"] for c in entry["candidates"]] == [c.signal for c in calibrated.candidates]
    assert entry["num_inference_steps"] == STEPS and entry["num_samples"] == 2
    assert entry["num_pairs"] == calibrated.recording.num_pairs

    loaded = load_coefficients_file(path, "tiny", 64)
    assert loaded["coefficients"] == entry["coefficients"] and loaded["seq_len"] == 64
    assert load_coefficients_file(path, "tiny", 100)["seq_len"] == 64
    assert load_coefficients_file(path, "tiny", 160)["seq_len"] == 256  # a tie goes to the larger
    assert load_coefficients_file(path, "tiny", 4096)["coefficients"] == [1.0, 2.0]
    assert load_coefficients_file(path, "another-model")["seq_len"] == 64  # one length: no seq_len needed


def test_one_runtime_signal_per_model(calibrated, tmp_path):
    path = tmp_path / "c.json"
    other = next(s for s in ("modulated_input", "timestep_embedding") if s != calibrated.best.signal)
    merge_entry(path, "tiny", 256, calibrated.entry(signal=other))
    with pytest.raises(ValueError, match=f"'256': '{other}'"):
        calibrated.save(path)  # the runtime compares one signal for all lengths of a model
    calibrated.save(path, signal=other)
    entry = load_coefficients_file(path, "tiny", 64)
    assert entry["signal"] == other and entry["coefficients"] == list(calibrated.fit(other).coefficients)
    with pytest.raises(ValueError, match="'hidden_states' cannot be computed at run time"):
        calibrated.entry(signal="hidden_states")


def test_coefficients_file_errors_name_the_problem(calibrated, tmp_path):
    path = tmp_path / "c.json"
    with pytest.raises(FileNotFoundError, match="c.json"):
        load_coefficients_file(path)
    path.write_text('{"format": "something/else", "models": {}}')
    with pytest.raises(ValueError, match="'something/else'"):
        load_coefficients_file(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_coefficients_file(path)
    path.unlink()
    calibrated.save(path)
    merge_entry(path, "b", 64, calibrated.entry())
    merge_entry(path, "tiny", 256, calibrated.entry())
    with pytest.raises(ValueError, match="several models.*b, tiny"):
        load_coefficients_file(path)
    with pytest.raises(ValueError, match="'nope'.*b, tiny"):
        load_coefficients_file(path, "nope")
    with pytest.raises(ValueError, match=r"several sequence lengths.*\[64, 256\]"):
        load_coefficients_file(path, "tiny")


# --- the threshold search -------------------------------------------------------------------------------


def test_psnr():
    ref = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    assert psnr(ref.clone(), ref) == math.inf
    out = ref + torch.tensor([0.3, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert psnr(out, ref) == pytest.approx(10 * math.log10(9 / (0.09 / 4)))


def _point(thresh, min_psnr, computed):
    return ThresholdPoint(thresh, computed, 20, 1.0, 1.0, min_psnr, min_psnr)


def test_choice_is_largest_passing_for_psnr_and_smallest_for_speed():
    # Not monotonic: 0.4 fails, 0.8 passes again; the floor picks the largest passing.
    points = [_point(0.1, 50, 18), _point(0.2, 40, 12), _point(0.4, 25, 8), _point(0.8, 31, 5), _point(1.6, 20, 4)]
    assert _choose("min_psnr", 30, points) == 0.8
    assert _choose("min_psnr", 60, points) is None
    assert _choose("min_speedup", 2.0, points) == 0.4  # 20/8 = 2.5x, the smallest reaching 2x
    assert _choose("min_speedup", 10, points) is None


def test_find_threshold_on_tiny_flux(model, tmp_path):
    run = make_run(model, steps=6)
    result = find_threshold(
        model, run, SAMPLES, min_psnr=1.0, thresholds=[0.0, 1e-4, 0.3, 100.0], coefficients=[1.0, 0.0], progress=False
    )  # poly(x) = x
    assert_untouched(model)
    by_t = {p.threshold: p for p in result.points}
    assert sorted(by_t) == [0.0, 1e-4, 0.3, 100.0]
    for t in (0.0, 1e-4):  # nothing reused: the uncached output, bit for bit
        assert by_t[t].min_psnr == math.inf and by_t[t].calls_speedup == 1.0 and by_t[t].computed_fraction == 1.0
    assert by_t[0.3].computed < by_t[1e-4].computed and by_t[100.0].computed <= by_t[0.3].computed
    total = len(SAMPLES) * 2 * 6
    assert all(p.total == total for p in result.points)
    assert by_t[100.0].computed == len(SAMPLES) * 2 * 2  # first and last call of each generation and context
    passing = [p.threshold for p in result.points if p.min_psnr >= 1.0]
    assert result.threshold == max(passing)
    assert result.seq_len == SHAPE.image_tokens and result.num_inference_steps == 6  # counted uncached
    text = result.report()
    assert "Chosen rel_l1_thresh" in text and "<- chosen" in text
    result.plot(tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 10_000

    # A floor only identical outputs meet: bisection between 1e-4 (passes) and 0.3 (fails).
    strict = find_threshold(
        model, run, SAMPLES, min_psnr=1e6, thresholds=[1e-4, 0.3], refine=2, coefficients=[1.0, 0.0], progress=False
    )
    assert len(strict.points) == 4 and all(1e-4 <= p.threshold <= 0.3 for p in strict.points)
    assert strict.threshold == max(p.threshold for p in strict.points if p.min_psnr == math.inf)
    none = find_threshold(
        model, run, SAMPLES, min_speedup=50, thresholds=[0.3], coefficients=[1.0, 0.0], progress=False
    )
    assert none.threshold is None and "No threshold tried reaches a 50x" in none.report()
    assert_untouched(model)


def test_threshold_saved_into_the_coefficients_file(model, calibrated, tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    calibrated.save(path)
    enabled = []
    real_enable = tk.enable_teacache
    monkeypatch.setattr(tk, "enable_teacache", lambda t, **kw: enabled.append(kw) or real_enable(t, **kw))
    result = find_threshold(
        model, make_run(model), [0], min_speedup=1.0, thresholds=[0.0, 0.5], coefficients_file=path, progress=False
    )
    assert enabled and all(kw["coefficients_file"] == str(path) for kw in enabled)  # the runtime uses its signal
    assert result.model_name == "tiny" and result.coefficients == tuple(calibrated.best.coefficients)
    assert result.threshold == 0.0  # the smallest meeting 1x
    result.save_to(path)
    entry = load_coefficients_file(path, "tiny", SHAPE.image_tokens)
    assert entry["recommended_thresh"] == 0.0
    assert entry["recommended_criterion"]["min_speedup"] == 1.0
    merge_entry(path, "tiny", SHAPE.image_tokens, dict(entry, coefficients=[9.0, 9.0]))  # refitted since
    with pytest.raises(ValueError, match="not with those of 'tiny'"):
        result.save_to(path)


# --- the command line -----------------------------------------------------------------------------------


def test_cli_calibrate_and_threshold_on_tiny_flux(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    common = ["--model", "tiny-flux", "--samples", "2", "--steps", "4", "--quiet"]
    assert cli.main(["calibrate", *common, "--degree", "2", "--out", str(out)]) == 0
    assert (tmp_path / "tiny.calibration.png").stat().st_size > 10_000
    assert list(json.loads(out.read_text())["models"]["tiny-flux"]) == ["64"]
    code = cli.main(["threshold", *common, "--min-psnr", "5", "--thresholds", "0", "0.05",
                     "--coefficients-file", str(out), "--save"])  # fmt: skip
    assert code == 0
    assert (tmp_path / "tiny.threshold.png").is_file()
    assert load_coefficients_file(out)["recommended_thresh"] == 0.05  # both pass: the larger
    printed = capsys.readouterr().out
    assert "Candidates ranked by R^2" in printed and "Chosen rel_l1_thresh" in printed


def test_cli_user_factory(tmp_path):
    factory = tmp_path / "my_model.py"
    factory.write_text(
        "from teacache_kernels.calibrate import CalibrationSetup\n"
        "from teacache_kernels.tiny_models import TinyFluxShape, tiny_flux_transformer, flux_inputs, flow_matching_loop\n"
        "def make(num_inference_steps=3):\n"
        "    shape = TinyFluxShape(layers=1, single_layers=1)\n"
        "    t = tiny_flux_transformer(shape)\n"
        "    run = lambda s: flow_matching_loop(t, *flux_inputs(shape, seed=s), num_inference_steps)\n"
        "    return CalibrationSetup(t, run, [0, 1, 2], 'mine', num_inference_steps)\n"
    )
    out = tmp_path / "mine.json"
    argv = ["calibrate", "--model", f"{factory}:make", "--samples", "2", "--degree", "1", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    entry = load_coefficients_file(out, "mine")
    assert entry["num_samples"] == 2 and entry["num_inference_steps"] == 3 and entry["num_pairs"] == 4
    assert isinstance(CalibrationSetup, type)
    with pytest.raises(ValueError, match="no function 'nope'"):
        cli.main(["calibrate", "--model", f"{factory}:nope", "--quiet"])
