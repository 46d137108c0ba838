"""teacache::decide (Triton kernel and torch path) against the oracle, call by call.

Error budget for x (flash-attention's rule): the op's error against the float64 oracle is at most twice
the error of the original TeaCache's own computation in the signal's dtype,
`((m - p).abs().mean() / p.abs().mean())`, or 1e-6 relative (16 float32 ulps), whichever is larger.
Decisions, step counters and the copied signal must match exactly; the accumulator within the same
budget. Every test asserts its decisions are not within 1e-4 of a tie, so the check cannot be flaky.
"""

import math

import pytest
import torch

from teacache_kernels import state as S
from teacache_kernels.config import ResolvedConfig, TeaCacheConfig
from teacache_kernels.ops.decide import _decide_kernel, decide, launch_decide
from teacache_kernels.reference import TeaCacheOracle

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def flux_config(thresh=0.5, steps=12, **kw):
    return ResolvedConfig.resolve(TeaCacheConfig(rel_l1_thresh=thresh, num_inference_steps=steps, **kw), "flux")


def random_walk(numel, calls, dtype, seed=0, step_sizes=(0.01, 0.05, 0.02, 0.08, 0.03)):
    """Signals whose consecutive relative L1 distances vary around 1-8 %: a mix of reuse and compute."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(numel, generator=g, dtype=torch.float64) + 0.5
    out = []
    for k in range(calls):
        s = s + step_sizes[k % len(step_sizes)] * torch.randn(numel, generator=g, dtype=torch.float64)
        out.append(s.to(dtype))
    return out


def plain_rel_l1(cur, prev):
    """The original TeaCache's computation, in the signal's own dtype."""
    return ((cur - prev).abs().mean() / prev.abs().mean()).item()


def bitwise_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def check_against_oracle(signals, config, device, call=None):
    """Run `signals` through the op and the oracle; assert agreement call by call. Returns the schedule."""
    st = S.ContextState("test")
    st.allocate(signals[0].to(device), signals[0].to(device), config)
    oracle = TeaCacheOracle(config)
    schedule = ""
    for k, sig in enumerate(signals):
        sig_dev = sig.to(device)
        prev_before = oracle.prev
        expected = oracle.decide(sig)
        if call is None:
            got = decide(sig_dev, st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket)
        else:
            got = call(sig_dev, st)
        rec = oracle.history[-1]
        assert got.dtype == torch.bool and got.shape == ()
        assert bool(got) == expected, f"call {k}: op {'reused' if bool(got) else 'computed'}, oracle disagrees"
        assert bitwise_equal(st.prev_signal.cpu(), sig), f"call {k}: prev_signal is not the new signal"
        assert int(st.ticket.item()) == 0, "the last program must reset the ticket"

        scalars = st.scalars.cpu().tolist()
        assert scalars[S.STEP] == oracle.step and scalars[S.HAS_PREV] == float(oracle.prev is not None)
        assert scalars[S.CALLS] == oracle.calls and scalars[S.REUSED] == oracle.reused
        row = st.log[rec.step].cpu().tolist()
        assert row[S.LOG_REUSED] == float(rec.reused)
        if math.isnan(rec.x):
            assert math.isnan(row[S.LOG_X])
        else:
            budget = max(2 * abs(plain_rel_l1(sig, prev_before) - rec.x), 1e-6 * abs(rec.x))
            assert abs(row[S.LOG_X] - rec.x) <= budget, f"call {k}: x {row[S.LOG_X]} vs oracle {rec.x}"
            # poly amplifies x's error by |poly'(x)| (FLUX: < 40 on the range seen); the accumulator sums them.
            assert row[S.LOG_ACC] == pytest.approx(rec.acc, rel=1e-4, abs=1e-4 * config.rel_l1_thresh)
        schedule += "R" if expected else "C"
    return schedule, oracle


def assert_no_near_ties(oracle, config):
    # Rebuild each non-forced decision's candidate accumulator and require a clear margin to the threshold.
    acc = 0.0
    for rec in oracle.history:
        if not math.isnan(rec.y):
            candidate = acc + rec.y
            assert abs(candidate - config.rel_l1_thresh) > 1e-4, f"step {rec.step} is a near tie: test ill-posed"
        acc = rec.acc


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 7, 2048, 2049, 5000, 20001])
def test_decide_matches_oracle(impl, dtype, numel):
    config = flux_config(thresh=0.5, steps=12)
    signals = random_walk(numel, 26, dtype, seed=numel)  # 26 calls: two generations and a bit
    schedule, oracle = check_against_oracle(signals, config, impl)
    assert "R" in schedule and schedule.count("C") > 4, schedule  # the sequence exercises both outcomes
    assert_no_near_ties(oracle, config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_and_zero_signals_force_compute(impl, dtype):
    config = flux_config(thresh=5.0, steps=16)
    signals = random_walk(3001, 16, dtype, seed=3)
    signals[4] = signals[4].clone()
    signals[4][1234] = float("nan")
    signals[8] = signals[8].clone()
    signals[8][0] = float("inf")
    signals[11] = torch.zeros_like(signals[11])
    schedule, oracle = check_against_oracle(signals, config, impl)
    # Compute: 4-5 (NaN, then compared against NaN), 8-9 (Inf), 11 (x = 1 to an all-zero signal: over the
    # threshold), 12 (all-zero previous signal), and the forced first and last calls. Accumulator clean after.
    assert schedule == "CRRRCCRRCCRCCRRC"
    for k in (4, 5, 8, 9, 11, 12):
        assert oracle.history[k].acc == 0.0


def test_all_zero_signal_from_the_start(impl):
    config = flux_config(thresh=5.0, steps=4)
    signals = [torch.zeros(100)] * 4
    schedule, _ = check_against_oracle(signals, config, impl)
    assert schedule == "CCCC"


@pytest.mark.parametrize("warmup, cooldown, expected", [(0, 0, "CRRRRRRR"), (3, 2, "CCCRRRCC"), (1, 1, "CRRRRRRC")])
def test_forced_steps_follow_the_device_counter(impl, warmup, cooldown, expected):
    config = flux_config(thresh=50.0, steps=8, warmup_steps=warmup, cooldown_steps=cooldown)
    schedule, _ = check_against_oracle(random_walk(512, 16, torch.float32), config, impl)
    assert schedule == expected * 2  # the counter wraps: the second generation repeats the first


def test_threshold_zero_never_reuses(impl):
    schedule, _ = check_against_oracle(random_walk(512, 10, torch.float32), flux_config(thresh=0.0, steps=10), impl)
    assert schedule == "C" * 10


@pytest.mark.skipif(__import__("conftest").TRITON_DEVICE is None, reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid_stride_loop_and_ticket_with_few_programs(dtype):
    """Tiny blocks and at most 3 programs: every program loops, and the ticket's last program sums them."""
    from conftest import TRITON_DEVICE

    def call(sig, st):
        reuse = torch.empty((), dtype=torch.bool, device=sig.device)
        launch_decide(sig, st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket, reuse,
                      kernel=_decide_kernel, block=64, max_programs=3)
        return reuse

    config = flux_config(thresh=0.5, steps=12)
    schedule, oracle = check_against_oracle(random_walk(1000, 14, dtype, seed=11), config, TRITON_DEVICE, call=call)
    assert "R" in schedule
    assert_no_near_ties(oracle, config)


def test_log_and_counters_across_generations(impl):
    config = flux_config(thresh=0.5, steps=6)
    st = S.ContextState("t")
    signals = random_walk(256, 9, torch.float32, seed=5)
    st.allocate(signals[0], signals[0], config)
    for sig in signals:
        decide(sig.to(impl), st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket)
    scalars = st.scalars.tolist()
    # 9 calls: one full generation of 6, then 3 calls of the next one
    assert scalars[S.STEP] == 3 and scalars[S.CALLS] == 9 and scalars[S.LOGGED] == 3
    assert math.isnan(st.log[0, S.LOG_X].item())  # first call of the generation: no previous signal


def test_opcheck_decide():
    config = flux_config()
    sig = random_walk(300, 2, torch.float32)
    st = S.ContextState("t")
    st.allocate(sig[0], sig[0], config)
    args = (sig[1], st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket)
    torch.library.opcheck(torch.ops.teacache.decide.default, args)


def distance_walk(distances, numel=256, dtype=torch.float32):
    """Signals with relative L1 distances `distances` between consecutive calls (s_{k+1} = s_k * (1 + d))."""
    s = torch.rand(numel, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    out = [s.to(dtype)]
    for d in distances:
        s = s * (1.0 + d)
        out.append(s.to(dtype))
    return out


def test_threshold_zero_is_off_even_for_a_negative_polynomial(impl):
    config = ResolvedConfig.resolve(TeaCacheConfig(rel_l1_thresh=0.0, coefficients="flux-kontext", num_inference_steps=6), "flux")
    schedule, _ = check_against_oracle(distance_walk([0.5] * 5), config, impl)
    assert schedule == "CCCCCC"


def test_infinite_polynomial_value_computes_and_clears_the_accumulator(impl):
    # -1e308 * x^2: finite (-1e304) at x = 0.01, -inf at x = 9
    config = ResolvedConfig.resolve(TeaCacheConfig(rel_l1_thresh=0.5, coefficients=(-1e308, 0.0, 0.0), num_inference_steps=7), "flux")
    schedule, oracle = check_against_oracle(distance_walk([0.01, 9.0, 0.01, 0.01, 0.01, 0.01]), config, impl)
    assert schedule == "CRCRRRC"
    assert oracle.history[2].acc == 0.0


@pytest.mark.parametrize(
    "field, bad, message",
    [
        ("prev_signal", torch.zeros(2, 64), r"prev_signal must match the stream/signal: shape \(1, 64\)"),
        ("prev_signal", torch.zeros(1, 64, dtype=torch.float16), "prev_signal must be torch.float32, got torch.float16"),
        ("scalars", torch.zeros(S.NUM_SCALARS, dtype=torch.float32), "scalars must be torch.float64, got torch.float32"),
        ("log", torch.zeros(8, dtype=torch.float64), r"log must be \[capacity, 4\], got shape \(8,\)"),
        ("partials", torch.zeros(16), "partials must hold at least 2048 elements"),
        ("ticket", torch.zeros(1, dtype=torch.int64), "ticket must be torch.int32, got torch.int64"),
    ],
)
def test_decide_rejects_wrong_buffers_by_name(field, bad, message):
    sig = torch.randn(1, 64)
    st = S.ContextState("t")
    st.allocate(sig, sig, flux_config())
    args = dict(signal=sig, prev_signal=st.prev_signal, scalars=st.scalars, config=st.config, log=st.log,
                partials=st.partials, ticket=st.ticket)  # fmt: skip
    args[field] = bad
    with pytest.raises((TypeError, ValueError), match=message):
        decide(**args)
