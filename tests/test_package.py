"""Import hygiene, the command line, and the runnable example."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args, timeout=600, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


def test_import_is_lean_and_never_initializes_cuda():
    code = (
        "import sys, torch, teacache_kernels as tk\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialized by import'\n"
        "heavy = [m for m in ('triton', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "tk.TeaCacheConfig(rel_l1_thresh=0.4)\n"
        "import teacache_kernels.ops\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialized by registering the ops'\n"
        "assert hasattr(torch.ops.teacache, 'decide') and hasattr(torch.ops.teacache, 'apply_residual')\n"
    )
    r = run(["-c", code])
    assert r.returncode == 0, r.stderr


def test_public_names():
    import teacache_kernels as tk

    for name in ("enable_teacache", "disable_teacache", "reset_teacache", "summary", "TeaCacheConfig"):
        assert callable(getattr(tk, name))
    assert "flux" in tk.PUBLISHED_COEFFICIENTS and tk.__version__


def test_cli_models_lists_flux_and_the_published_sets():
    r = run(["-m", "teacache_kernels", "models"])
    assert r.returncode == 0, r.stderr
    assert "FluxTransformer2DModel" in r.stdout and "flux-kontext" in r.stdout and "wan2.1-t2v-14b" in r.stdout


def check_demo_output(r, out):
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("uncached", "TeaCache "))]
    assert [row.split()[0] for row in rows] == ["uncached"] + ["TeaCache"] * 3, r.stdout
    assert "(default)" in r.stdout and "recognised" in r.stdout
    assert out.stat().st_size > 1000  # the grid PNG


def test_cli_demo_eager(tmp_path):
    out = tmp_path / "grid.png"
    r = run(["-m", "teacache_kernels", "demo", "--no-compile", "--steps", "10", "--repeats", "1", "--per-digit", "1",
             "--out", str(out)])
    check_demo_output(r, out)


@pytest.mark.slow
def test_cli_demo_as_the_readme_runs_it(tmp_path):
    """The README's main command, compiled, one repeat: no graph break, the table and the grid."""
    out = tmp_path / "grid.png"
    r = run(["-m", "teacache_kernels", "demo", "--repeats", "1", "--out", str(out)])
    check_demo_output(r, out)
    assert "graph breaks under torch.compile: 0" in r.stdout


def test_cli_rejects_bad_arguments():
    r = run(["-m", "teacache_kernels", "demo", "--steps", "many"])
    assert r.returncode == 2 and "invalid int value: 'many'" in r.stderr


@pytest.mark.slow
def test_flux_example_tiny(tmp_path):
    r = run(["python/flux.py", "--tiny", "--out", str(tmp_path)], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["compile"] is True and record["steps"] == 8
    cond = record["summary"]["contexts"]["cond"]
    assert len(cond["schedule"]) == 8 and "R" in cond["schedule"]
    assert (tmp_path / "teacache.png").exists() and (tmp_path / "uncached.png").exists()
    assert record["psnr_db"] > 20  # a tiny random model: the cached image stays close to the uncached one
