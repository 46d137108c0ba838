"""Many GPUs, on this CPU machine: 2 processes, gloo on loopback, diffusers' own context and tensor parallelism.

What is checked (tests/_parallel_worker.py runs the ranks; each spawn is bounded in time, so a hang fails):
- context parallelism (Ulysses; each rank holds half the sequence, so half the signal): the decision sums the
  partial sums over the ranks, so both ranks' schedules are identical, their states bit for bit, and equal to the
  single-process run on the whole sequence; outputs within budget of it. FLUX (one cached stream; parallelism
  enabled after TeaCache) and Qwen-Image (two cached streams; its plan splits block 0's inputs, which the span
  then does for it), eager; FLUX compiled with fullgraph=True too. The eager oracle with the same group agrees.
- tensor parallelism: activations replicated, nothing summed; both ranks decide as one process does.
- CFG parallelism (cond on rank 0, uncond on rank 1): each rank's context keeps its own state; the schedules are the
  single-process run's.
- ranks that disagree on the threshold or the step count: a ValueError on every rank naming the values, no hang.
Ring attention is not run (diffusers' CPU attention cannot return the log-sum-exp it needs): its sequence split is
the same as Ulysses' for the decision (parallel.py). NCCL and real GPUs: not run here.
"""

import pytest
import torch

import _parallel_worker as W
import teacache_kernels as tk
from teacache_kernels.tiny_models import tiny_flux_transformer

# Ulysses reorders the attention's sums (all-to-all over heads); over 8 CFG steps the outputs of the split run stay
# within this fraction of the output's scale from the single-process run (measured: 1.6e-7).
BUDGET = 1e-5


def ranks(results):
    for rank, r in enumerate(results):
        assert "ok" in r, f"rank {rank}: {r['error']}\n{r['traceback']}"
    return [r["ok"] for r in results]


def assert_same_states(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for key in a:  # bit for bit (NaN marks log rows not written yet)
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=key)


def single_process_flux(reference=False):
    model = tiny_flux_transformer(W.flux_shape())
    tk.enable_teacache(model, num_inference_steps=W.FLUX_STEPS, rel_l1_thresh=W.THRESH, reference=reference)
    return W.flux_generate(model)


def within_budget(out, expected):
    scale = expected.abs().max().item()
    err = (out - expected).abs().max().item()
    assert err <= BUDGET * scale, f"max|diff| {err:.3g} > {BUDGET} x {scale:.3g}"
    return err


def test_context_parallel_flux_decides_alike_on_every_rank_and_as_one_process():
    a, b = ranks(W.spawn(W.context_parallel_flux))
    assert a["group_size"] == b["group_size"] == W.WORLD and a["oracle_group_size"] == W.WORLD
    assert a["ranks"] == W.WORLD and f"summed over {W.WORLD} ranks (context parallel)" in a["summary"]
    expected_out, expected = single_process_flux()
    oracle_out, oracle = single_process_flux(reference=True)
    assert any("R" in s for g in expected for s in g.values())  # the threshold reuses: the decisions matter
    assert a["schedules"] == b["schedules"] == expected == oracle
    assert a["oracle_schedules"] == b["oracle_schedules"] == oracle
    assert_same_states(a["states"], b["states"])
    assert torch.equal(a["out"], b["out"])
    err = within_budget(a["out"], expected_out)
    within_budget(a["oracle_out"], oracle_out)
    print(f"\ncontext parallel FLUX: schedules {a['schedules'][-1]}; max|diff| vs one process {err:.3g}")


def test_context_parallel_qwen_image_caches_both_streams_on_slices():
    a, b = ranks(W.spawn(W.context_parallel_qwen))
    model = W.qwen_model()
    tk.enable_teacache(model, num_inference_steps=W.QWEN_STEPS, rel_l1_thresh=W.QWEN_THRESH)
    expected_out, expected = W.qwen_generate(model)
    assert "R" in "".join(expected.values())
    assert a["schedule"] == b["schedule"] == expected
    assert a["moved"] and b["moved"]  # the span split block 0's inputs while enabled...
    assert "cp_input---transformer_blocks.0" in a["hooks_after_disable"]  # ...and block 0 does again after disabling
    torch.testing.assert_close(a["out"], b["out"], rtol=0, atol=0)
    err = within_budget(a["out"], expected_out)
    plain, _ = W.qwen_generate_plain(W.qwen_model())
    within_budget(a["plain"], plain)  # disabled: the split model is the plain split model again
    print(f"\ncontext parallel Qwen-Image: {a['schedule']}; max|diff| vs one process {err:.3g}")


def test_tensor_parallel_flux_needs_no_sum_and_decides_as_one_process():
    a, b = ranks(W.spawn(W.tensor_parallel_flux))
    assert a["group"] is None and b["group"] is None  # the signal is replicated: nothing to sum
    expected_out, expected = single_process_flux()
    assert a["schedules"] == b["schedules"] == expected
    assert_same_states(a["states"], b["states"])
    within_budget(a["out"], expected_out)


def test_cfg_parallel_keeps_each_branch_state_on_its_rank():
    a, b = ranks(W.spawn(W.cfg_parallel_flux))
    expected_out, expected = single_process_flux()
    assert a["group"] is None and b["group"] is None
    assert [s["cond"] for s in a["schedules"]] == [s["cond"] for s in expected]
    assert [s["uncond"] for s in b["schedules"]] == [s["uncond"] for s in expected]
    assert "uncond" not in a["schedules"][0] and "cond" not in b["schedules"][0]
    within_budget(a["out"], expected_out)


def test_ranks_that_disagree_get_an_error_naming_the_values_not_a_hang():
    a, b = ranks(W.spawn(W.disagreeing_ranks, timeout=120))
    for errors in (a, b):
        assert set(errors) == {"threshold", "steps"}
        assert "rel_l1_thresh: rank 0: 0.6, rank 1: 0.7" in errors["threshold"]
        assert f"num_inference_steps: rank 0: {W.FLUX_STEPS}, rank 1: {W.FLUX_STEPS + 1}" in errors["steps"]


@pytest.mark.slow
def test_context_parallel_flux_compiled_fullgraph():
    a, b = ranks(W.spawn(W.context_parallel_flux, timeout=600, compiled=True))
    expected_out, expected = single_process_flux()
    assert a["schedules"] == b["schedules"] == expected  # no recompile after the warm-up (error_on_recompile)
    assert_same_states(a["states"], b["states"])
    within_budget(a["out"], expected_out)
    print(f"\ncompiled context parallel FLUX: {a['graphs']} graph(s)")


def test_bad_process_group_is_named():
    model = tiny_flux_transformer(W.flux_shape())
    with pytest.raises(ValueError, match="process_group must be 'auto', None, a ProcessGroup or a DeviceMesh, got 'cp'"):
        tk.enable_teacache(model, num_inference_steps=4, process_group="cp")
    assert not hasattr(model, "_teacache")  # nothing half-enabled
    with pytest.raises(TypeError, match="got int"):
        tk.enable_teacache(model, num_inference_steps=4, process_group=3)


def test_flux_example_runs_under_torchrun_with_context_parallelism(tmp_path):
    """The README's command line, on the tiny pipeline: 2 gloo ranks, rank 0 writes the record."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(W._free_port())]
    cmd = [*torchrun, str(root / "python" / "flux.py"), "--tiny", "--cp", "2", "--no-compile", "--steps", "6", "--out", str(tmp_path)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["context_parallel"] == 2 and record["summary"]["ranks"] == 2
    assert (tmp_path / "teacache.png").exists() and (tmp_path / "uncached.png").exists()
    assert "each decision summed over 2 ranks" in done.stdout


def test_a_calibrated_set_is_chosen_by_the_whole_sequence_on_each_rank():
    """A rank's stream holds 1/ranks of the tokens: a calibrated file's set goes by the whole sequence's length."""
    import dataclasses

    from teacache_kernels.coefficients import CalibratedSet
    from teacache_kernels.config import ResolvedConfig

    sets = tuple(CalibratedSet(n, (float(n), 0.0), (0.0, 1.0), 0.3, "modulated_input") for n in (256, 1024))
    one = ResolvedConfig(0.3, sets[-1].coefficients, 8, 1, 1, None, calibrated=sets)
    split = dataclasses.replace(one, sequence_ranks=4)
    assert one.for_sequence(256).coefficients == (256.0, 0.0)
    assert split.for_sequence(256).coefficients == (1024.0, 0.0)  # 4 ranks x 256 tokens
    assert split.for_sequence(64).coefficients == one.for_sequence(256).coefficients
