"""The decision split in two for a signal split over ranks (context parallelism, parallel.py):
teacache::partial_sums on each rank's slice, the sums added over the ranks, teacache::decide_finish on each rank.

In one process: the ranks are simulated in turn (each its own state on its own slice), their sums added in rank
order as `parallel.sum_over_ranks` does. Every rank's decision must be the oracle's on the whole signal and every
rank's scalars and log bit-identical; with one rank, the split path equals the fused one bit for bit. Torch path and
Triton kernels (interpreter on CPU). The real collectives: tests/test_parallel.py.
"""

import pytest
import torch

from teacache_kernels import state as S
from teacache_kernels.ops.decide import decide
from teacache_kernels.reference import TeaCacheOracle
from test_decide import DTYPES, flux_config, random_walk


def _state(like, config):
    st = S.ContextState("rank")
    st.allocate(like, like, config)
    return st


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ranks_decide_as_the_oracle_on_the_whole_signal(impl, world, dtype):
    config = flux_config(thresh=0.3, steps=12)
    signals = random_walk(3001, 12, dtype, seed=world)  # 3001: slices of unequal size (1001/1000/1000...)
    slices = lambda s: [c.contiguous().to(impl) for c in s.chunk(world)]  # noqa: E731
    states = [_state(c, config) for c in slices(signals[0])]
    oracle = TeaCacheOracle(config)
    schedule = ""
    for k, signal in enumerate(signals):
        expected = oracle.decide(signal)
        parts = [torch.ops.teacache.partial_sums(c, st.prev_signal, st.partials, st.ticket) for c, st in zip(slices(signal), states)]
        total = torch.stack(parts).sum(0)  # in rank order, as parallel.sum_over_ranks
        flags = [bool(torch.ops.teacache.decide_finish(total, st.scalars, st.config, st.log)) for st in states]
        assert flags == [expected] * world, f"call {k}"
        assert total[2].item() == signal.numel()
        for c, st in zip(slices(signal), states):
            assert torch.equal(st.prev_signal, c) and int(st.ticket.item()) == 0
            torch.testing.assert_close(st.scalars, states[0].scalars, rtol=0, atol=0)
            torch.testing.assert_close(st.log, states[0].log, rtol=0, atol=0, equal_nan=True)
        schedule += "R" if expected else "C"
    assert "R" in schedule and "C" in schedule[1:-1], schedule


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_rank_split_path_equals_the_fused_decision_bit_for_bit(impl, dtype):
    config = flux_config(thresh=0.3, steps=10)
    signals = [s.to(impl) for s in random_walk(2049, 10, dtype)]
    fused, split = _state(signals[0], config), _state(signals[0], config)
    for signal in signals:
        a = decide(signal, fused.prev_signal, fused.scalars, fused.config, fused.log, fused.partials, fused.ticket)
        b = decide(signal, split.prev_signal, split.scalars, split.config, split.log, split.partials, split.ticket,
                   lambda sums: sums)  # fmt: skip
        assert bool(a) == bool(b)
    torch.testing.assert_close(fused.scalars, split.scalars, rtol=0, atol=0)
    torch.testing.assert_close(fused.log, split.log, rtol=0, atol=0, equal_nan=True)
