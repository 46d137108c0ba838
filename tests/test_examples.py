"""The runnable examples in python/ (one per family, `SCRIPTS` below), run as a user runs them.

Each runs `--tiny` in a subprocess (the random-weight pipelines of teacache_kernels.tiny_families on the CPU:
eager here, compiled in the slow tests) and writes run.json; the real checkpoints are not run by any test.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from teacache_kernels.coefficients import PUBLISHED
from teacache_kernels.tiny_families import TINY

ROOT = Path(__file__).resolve().parent.parent

# script -> (tiny family, the coefficient set its default tiny pipeline gets, video?)
SCRIPTS = {
    "qwen_image": ("qwen-image", "qwen-image", False),
    "lumina2": ("lumina2", "lumina2", False),
    "cogvideox": ("cogvideox", "cogvideox-5b", True),
    "mochi": ("mochi", "mochi", True),
    "ltx_video": ("ltx-video", "ltx-video", True),
    "hunyuan_video": ("hunyuan-video", "hunyuan-video", True),
    "hidream": ("hidream", "hidream-full", False),
    "wan": ("wan", "wan2.1-i2v-14b-480p", True),
}


def run_script(script, *args, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, f"python/{script}.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)  # fmt: skip


def tiny_record(script, out, *args):
    r = run_script(script, "--tiny", "--out", out, *args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "schedule (C computed, R reused)" in r.stdout and "PSNR vs uncached" in r.stdout, r.stdout
    return json.loads((out / "run.json").read_text())


def check_record(record, out, script, *, compiled, coefficients=None, both=True):
    family, default_set, video = SCRIPTS[script]
    assert record["steps"] == 8 and record["compile"] is compiled
    summary = record["summary"]
    assert summary["coefficients"] == (coefficients or default_set)
    assert set(summary["contexts"]) == set(TINY[family].contexts)
    for name, context in summary["contexts"].items():
        schedule = context["schedule"]
        assert len(schedule) == 8 and schedule[0] == "C", (name, schedule)  # the first call is forced
        if PUBLISHED[summary["coefficients"]].cooldown_steps:  # and the last, where the set's original forces it
            assert schedule[-1] == "C", (name, schedule)
        if both:  # the tiny model at the set's default threshold computes some calls and reuses others
            assert "R" in schedule, (name, schedule)
    # The cached output stays close to the uncached one (random tiny weights: a mechanics check, not quality).
    assert math.isfinite(record["psnr_db"]) and record["psnr_db"] > 20, record["psnr_db"]
    assert math.isfinite(record["psnr_latents_db"]) and record["psnr_latents_db"] > 20, record["psnr_latents_db"]
    assert record["psnr_on"].startswith("decoded video frames" if video else "decoded image")
    assert record["teacache_s"] > 0 and record["uncached_s"] > 0 and record["speedup"] > 0
    for key in ("teacache_output", "uncached_output"):
        assert (out / record[key]).stat().st_size > 100


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    r = run_script(script, "--help", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    text = " ".join(r.stdout.split())
    for needle in ("--tiny", "--compare", "--no-compile", "--thresh", "--out", "not been run with this script"):
        assert needle in text, needle


@pytest.mark.parametrize("script", SCRIPTS)
def test_tiny_eager(script, tmp_path):
    record = tiny_record(script, tmp_path)
    check_record(record, tmp_path, script, compiled=False)
    assert record["summary"]["implementation"] == "fused" and record["thresh_given"] is None


def test_qwen_image_tiny_edit(tmp_path):
    from PIL import Image

    Image.new("RGB", (48, 32), (120, 80, 40)).save(tmp_path / "input.png")
    record = tiny_record("qwen_image", tmp_path, "--edit", tmp_path / "input.png")
    assert record["pipeline"] == "QwenImageEditPipeline"
    check_record(record, tmp_path, "qwen_image", compiled=False)


def test_cogvideox_tiny_variants(tmp_path):
    """--model picks the variant (and so the coefficient set); --image the image-to-video pipeline."""
    from PIL import Image

    record = tiny_record("cogvideox", tmp_path / "2b", "--model", "2b", "--thresh", "0.3")
    assert record["variant"] == "2b" and record["summary"]["rel_l1_thresh"] == 0.3
    check_record(record, tmp_path / "2b", "cogvideox", compiled=False, coefficients="cogvideox-2b")

    Image.new("RGB", (16, 16), (120, 80, 40)).save(tmp_path / "first.png")
    record = tiny_record("cogvideox", tmp_path / "i2v", "--model", "1.5-5b-i2v", "--image", tmp_path / "first.png",
                         "--thresh", "1.0")  # fmt: skip
    assert record["pipeline"] == "CogVideoXImageToVideoPipeline" and record["variant"] == "1.5-5b-i2v"
    check_record(record, tmp_path / "i2v", "cogvideox", compiled=False, coefficients="cogvideox1.5-5b-i2v")

    r = run_script("cogvideox", "--tiny", "--model", "5b-i2v", "--out", tmp_path / "bad")
    assert r.returncode == 2 and "is an image-to-video model: give --image" in r.stderr, r.stderr[-2000:]
    r = run_script("cogvideox", "--tiny", "--model", "2b", "--image", tmp_path / "first.png", "--out", tmp_path / "bad")
    assert r.returncode == 2 and "--image needs an image-to-video model" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


# The compiled run of a script is a cold compile of two models in a subprocess (about a minute each on CI's 2
# cores): two scripts cover the examples' compile path (an image family with two cached streams, a video family
# with a captured signal); every family's compiled span is tested in-process by its own test file.
COMPILED_SCRIPTS = ["qwen_image", "wan"]


@pytest.mark.slow
@pytest.mark.parametrize("script", COMPILED_SCRIPTS)
def test_tiny_compiled(script, tmp_path):
    """torch.compile (fullgraph=True) with one warm-up generation."""
    record = tiny_record(script, tmp_path, "--compile")
    check_record(record, tmp_path, script, compiled=True)
    assert record["fullgraph"] is (script != "lumina2")
