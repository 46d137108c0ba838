"""The embedded model: it ships, it loads offline, its samples are digits, and TeaCache's quality gates.

Quality gates (issue 3): on the trained model, the shipped default threshold keeps every sample's PSNR
against the uncached sample above PSNR_FLOOR, and raising the threshold never computes more calls and
never raises mean PSNR by more than PSNR_TIE_DB (ties allowed: two thresholds can give one schedule).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels import digits
from teacache_kernels.coefficients import load_calibrated
from teacache_kernels.digits.quality import digit_accuracy, psnr, ssim

# Why 24 dB, on the worst sample: 20 log10(16) = 24.1 dB is an RMS error of one of the dataset's 16 gray
# levels (images in [-1, 1], peak-to-peak 2) on the single most-changed image; the mean over samples sits
# near 34 dB, and the classifier's verdicts do not change (checked below). A 30 dB worst-sample floor
# would allow no skip at all: the first reused call already moves the most sensitive seed to 26-29 dB.
# The shipped threshold was chosen by `threshold --min-psnr 24.08` on 8 seeds other than SEED.
PSNR_FLOOR = 24.0
PSNR_TIE_DB = 0.5  # sweep tolerance: schedules that differ in one late call can swap order by a fraction of a dB
LABELS = torch.arange(10).repeat(3)
SEED = 100  # not a calibration seed: the gates hold on samples the threshold was not tuned on


@pytest.fixture(scope="module")
def model():
    return digits.load_transformer()


@pytest.fixture(scope="module")
def uncached(model):
    return digits.generate(model, LABELS, seed=SEED)


def cached_run(thresh, **fields):
    model = digits.load_transformer()
    tk.enable_teacache(model, coefficients_file=digits.COEFFICIENTS_FILE, rel_l1_thresh=thresh,
                       num_inference_steps=digits.NUM_STEPS, **fields)
    images = digits.generate(model, LABELS, seed=SEED)
    s = tk.summary(model)
    return images, sum(c.computed_steps for c in s.contexts.values()), s


def test_weights_ship_in_the_package_and_load_offline():
    weights = digits.WEIGHTS_DIR / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    code = "from teacache_kernels import digits; m = digits.load_transformer(); print(type(m).__name__)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "FluxTransformer2DModel", r.stderr[-2000:]


def test_samples_are_recognisable(uncached):
    # The SVM labels 99% of the real digits right; a model that had not learnt the digits would score ~10%.
    assert digit_accuracy(uncached, LABELS) >= 0.9


def test_the_shipped_default_threshold_keeps_psnr_above_the_floor(uncached):
    _, sets = load_calibrated(digits.COEFFICIENTS_FILE)
    thresh = sets[0].recommended_thresh
    images, computed, _ = cached_run(None)  # None: the file's recommended threshold
    per_image = psnr(images, uncached)
    assert per_image.min() >= PSNR_FLOOR, f"threshold {thresh}: worst sample {per_image.min():.1f} dB"
    assert computed < 0.75 * 2 * digits.NUM_STEPS, f"threshold {thresh} computed {computed} calls: no speedup left"
    assert digit_accuracy(images, LABELS) == digit_accuracy(uncached, LABELS)


def test_sweep_skips_more_and_loses_quality_as_the_threshold_rises(uncached):
    _, sets = load_calibrated(digits.COEFFICIENTS_FILE)
    base = sets[0].recommended_thresh
    computed, quality = [], []
    for factor in (0.0, 0.5, 1.0, 2.0, 4.0):
        images, n, _ = cached_run(base * factor)
        computed.append(n)
        quality.append(float(psnr(images, uncached).clamp(max=100).mean()))  # identical images: inf -> 100
    assert computed[0] == 2 * digits.NUM_STEPS and quality[0] == 100.0  # threshold 0 is the uncached model
    assert all(a >= b for a, b in zip(computed, computed[1:])), computed
    assert all(a >= b - PSNR_TIE_DB for a, b in zip(quality, quality[1:])), quality
    assert computed[-1] < computed[1], "the sweep must actually skip more at the top"


def test_fused_matches_the_reference_on_the_trained_model():
    runs = []
    for reference in (False, True):
        model = digits.load_transformer()
        tk.enable_teacache(model, coefficients_file=digits.COEFFICIENTS_FILE, num_inference_steps=digits.NUM_STEPS,
                           reference=reference)
        runs.append((digits.generate(model, LABELS[:10], seed=SEED), tk.summary(model)))
    (a, sa), (b, sb) = runs
    assert {n: c.schedule for n, c in sa.contexts.items()} == {n: c.schedule for n, c in sb.contexts.items()}
    assert torch.equal(a, b)


def test_the_shipped_calibration_names_its_signal_and_range():
    data = json.loads(digits.COEFFICIENTS_FILE.read_text())
    entry = data["models"][digits.MODEL_NAME][str(digits.TOKENS)]
    assert entry["signal"] in ("modulated_input", "timestep_embedding") and entry["degree"] == 4
    assert entry["x_range"][0] < entry["x_range"][1] and entry["r2"] > 0.5


def test_ssim_and_psnr_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    b = (a + 0.2 * torch.randn(4, 8, 8, generator=g, dtype=torch.float64)).clamp(-1, 1)
    for i in range(4):
        want_ssim = structural_similarity(a[i].numpy(), b[i].numpy(), win_size=3, data_range=2.0)
        want_psnr = peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=2.0)
        assert float(ssim(b, a)[i]) == pytest.approx(want_ssim, abs=1e-12)
        assert float(psnr(b, a)[i]) == pytest.approx(want_psnr, abs=1e-9)


def test_pack_unpack_and_conditioning():
    images = torch.randn(3, 8, 8)
    assert torch.equal(digits.unpack(digits.pack(images)), images)
    assert digits.pack(images).shape == (3, digits.TOKENS, 4)
    with pytest.raises(ValueError, match=r"labels must be digits 0-9 \(or 10 for unconditional\), got \[11\]"):
        digits.conditioning(torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="guidance_scale must be at least 1"):
        digits.generate(digits.build_transformer(), [1], guidance_scale=0.5)


def test_training_script_runs_and_writes_a_loadable_model(tmp_path):
    from diffusers import FluxTransformer2DModel

    from teacache_kernels.digits.train import train

    _, report = train(steps=3, batch=8, warmup=1, out=tmp_path, log_every=1, eval_per_class=1)
    assert set(report) >= {"loss_curve", "minutes", "hardware", "accuracy_cfg2"} and len(report["loss_curve"]) == 3
    model = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in digits.build_transformer().parameters())


@pytest.mark.slow
def test_compiled_fullgraph_with_the_calibrated_file_matches_the_reference():
    """State allocated inside the compiled graph, config from the file: no graph break, the oracle's schedule."""
    runs = []
    for reference in (False, True):
        model = digits.load_transformer()
        tk.enable_teacache(model, coefficients_file=digits.COEFFICIENTS_FILE, num_inference_steps=8,
                           rel_l1_thresh=0.4, reference=reference)  # 8 steps: larger steps, so a larger threshold
        run = model if reference else torch.compile(model, fullgraph=True)  # fullgraph: a break raises
        runs.append((digits.generate(run, LABELS[:4], seed=SEED, num_steps=8), tk.summary(model)))
    (a, sa), (b, sb) = runs
    assert {n: c.schedule for n, c in sa.contexts.items()} == {n: c.schedule for n, c in sb.contexts.items()}
    assert "R" in sa.contexts["cond"].schedule
    # Compiling moves float results by rounding only (test_compile: 1e-6 on outputs of scale ~5).
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
