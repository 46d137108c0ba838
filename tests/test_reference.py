"""The oracle is the specification: check it against hand-computed schedules of the original algorithm."""

import math

import pytest
import torch

from teacache_kernels.config import ResolvedConfig
from teacache_kernels.reference import TeaCacheOracle, rel_l1


def make_config(thresh=0.25, coefficients=(1.0, 0.0), steps=10, warmup=1, cooldown=1):
    # poly(x) = x by default, so the accumulator is the plain sum of distances: easy to follow by hand.
    return ResolvedConfig(thresh, tuple(coefficients), steps, warmup, cooldown, None)


def signals_with_distances(distances, n=16):
    """Signals s_0, s_1, ... with rel_l1(s_{k+1}, s_k) = distances[k] (s_{k+1} = s_k * (1 + d))."""
    s = torch.ones(n, dtype=torch.float64)
    out = [s]
    for d in distances:
        s = s * (1.0 + d)
        out.append(s)
    return out


def schedule(oracle, signals):
    return "".join("R" if oracle.decide(s) else "C" for s in signals)


def test_rel_l1_is_mean_abs_difference_over_mean_abs_previous():
    prev = torch.tensor([1.0, -2.0, 3.0, -4.0])
    cur = torch.tensor([1.5, -2.0, 2.0, -4.0])
    assert rel_l1(cur, prev) == pytest.approx((0.5 + 0.0 + 1.0 + 0.0) / (1 + 2 + 3 + 4))


def test_accumulates_until_threshold_then_computes_and_resets():
    oracle = TeaCacheOracle(make_config(thresh=0.25, steps=10))
    # acc after each call: forced, .1 R, .2 R, .3 -> C (reset), .1 R, .2 R, .3 -> C, .1 R, .2 R, last forced
    assert schedule(oracle, signals_with_distances([0.1] * 9)) == "CRRCRRCRRC"
    accs = [h.acc for h in oracle.history]
    assert accs == pytest.approx([0, 0.1, 0.2, 0, 0.1, 0.2, 0, 0.1, 0.2, 0])


def test_threshold_zero_never_reuses():
    oracle = TeaCacheOracle(make_config(thresh=0.0))
    assert schedule(oracle, signals_with_distances([0.0] * 9)) == "C" * 10


def test_warmup_and_cooldown_are_forced():
    oracle = TeaCacheOracle(make_config(thresh=100.0, steps=10, warmup=3, cooldown=2))
    assert schedule(oracle, signals_with_distances([0.01] * 9)) == "CCCRRRRRCC"


def test_wraps_into_a_new_generation_with_the_same_schedule():
    oracle = TeaCacheOracle(make_config(thresh=0.25, steps=6))
    sig = signals_with_distances([0.1] * 11)
    assert schedule(oracle, sig[:6]) == "CRRCRC"
    assert oracle.step == 0 and oracle.prev is None and oracle.acc == 0.0
    assert schedule(oracle, sig[6:]) == "CRRCRC"  # first call forced again: no carry-over from generation 1
    assert oracle.calls == 12 and oracle.reused == 6


def test_nan_signal_forces_compute_and_leaves_the_accumulator_clean():
    oracle = TeaCacheOracle(make_config(thresh=10.0, steps=8))
    sig = signals_with_distances([0.1] * 7)
    sig[3] = sig[3].clone()
    sig[3][0] = math.nan
    # call 3 has NaN: compute. Call 4 compares against the NaN signal: compute. Then normal again.
    assert schedule(oracle, sig) == "CRRCCRRC"
    assert [h.acc for h in oracle.history][3:6] == pytest.approx([0.0, 0.0, 0.1])
    assert math.isnan(oracle.history[3].x) and math.isnan(oracle.history[4].x)


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_infinite_signal_forces_compute(bad):
    oracle = TeaCacheOracle(make_config(thresh=10.0, steps=6))
    sig = signals_with_distances([0.1] * 5)
    sig[2] = torch.full_like(sig[2], bad)
    assert schedule(oracle, sig) == "CRCCRC"


def test_all_zero_previous_signal_forces_compute():
    oracle = TeaCacheOracle(make_config(thresh=10.0, steps=5))
    z = torch.zeros(8, dtype=torch.float64)
    o = torch.ones(8, dtype=torch.float64)
    # call 1: prev all zero (mean 0): x undefined -> compute. call 2: prev = ones -> x = 1 -> reuse.
    assert schedule(oracle, [z, o, o * 2, o * 2, o * 2]) == "CCRRC"


def test_negative_polynomial_values_lower_the_accumulator_as_in_the_original():
    # The original does not clamp: a polynomial below zero pulls the accumulator down (documented choice).
    oracle = TeaCacheOracle(make_config(thresh=0.25, coefficients=(-1.0, 0.0), steps=6))
    assert schedule(oracle, signals_with_distances([0.2] * 5)) == "CRRRRC"
    assert [h.acc for h in oracle.history[1:5]] == pytest.approx([-0.2, -0.4, -0.6, -0.8])


def test_unknown_step_count_never_forces_the_last_call_or_wraps():
    oracle = TeaCacheOracle(make_config(thresh=100.0, steps=None))
    assert schedule(oracle, signals_with_distances([0.01] * 11)) == "C" + "R" * 11
    assert oracle.step == 12


def test_history_records_every_call():
    oracle = TeaCacheOracle(make_config(thresh=0.25, coefficients=(2.0, 0.0), steps=4))
    schedule(oracle, signals_with_distances([0.1, 0.1, 0.1]))
    h = oracle.history
    assert [r.step for r in h] == [0, 1, 2, 3]
    assert math.isnan(h[0].x) and math.isnan(h[0].y)
    assert [r.x for r in h[1:]] == pytest.approx([0.1] * 3)
    assert [r.y for r in h[1:]] == pytest.approx([0.2] * 3)
    assert [r.reused for r in h] == [False, True, False, False]


def test_threshold_zero_is_off_even_for_a_negative_polynomial():
    # flux-kontext goes negative past x = 0.24: the original's `acc < 0` would reuse; 0 means off here.
    from teacache_kernels.coefficients import PUBLISHED

    oracle = TeaCacheOracle(make_config(thresh=0.0, coefficients=PUBLISHED["flux-kontext"].coefficients, steps=6))
    assert schedule(oracle, signals_with_distances([0.5] * 5)) == "CCCCCC"


def test_an_infinite_polynomial_value_computes_instead_of_poisoning_the_accumulator():
    # -1e308 * x^2 overflows to -inf for x = 10: that call computes, and the accumulator restarts at 0.
    oracle = TeaCacheOracle(make_config(thresh=0.5, coefficients=(-1e308, 0.0, 0.0), steps=7))
    assert schedule(oracle, signals_with_distances([1e-160, 9.0, 1e-160, 1e-160, 1e-160, 1e-160])) == "CRCRRRC"
    assert [h.acc for h in oracle.history][2:4] == [0.0, pytest.approx(-1e-12, abs=1e-11)]
