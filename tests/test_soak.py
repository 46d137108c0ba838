"""Soak: 200 generations of the embedded digits model, compiled, with random thresholds, step counts and batch sizes.

Against the eager reference on the same sequence: the same schedule every generation, outputs within the compile
budget (rounding: 1e-4 on outputs of scale ~1, as tests/test_digits.py); no recompile except at the first
generation of each batch size (Dynamo may then make the batch dimension dynamic, after which no batch size
recompiles: each batch size has its own state, kept); no growth of the process's memory (RSS) beyond noise, of
the cache's device memory, or of the logs (each context's log holds exactly the current generation's calls).
"""

import random

import pytest
import torch
from torch._dynamo.utils import counters

import teacache_kernels as tk
from teacache_kernels import digits

pytestmark = pytest.mark.slow

GENERATIONS = 200


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_200_compiled_generations_stay_equal_to_the_reference_without_growth():
    rng = random.Random(0)
    model, ref = digits.load_transformer(), digits.load_transformer()
    for m, reference in ((model, False), (ref, True)):
        tk.enable_teacache(m, coefficients_file=digits.COEFFICIENTS_FILE, num_inference_steps=8, reference=reference)
    compiled = torch.compile(model, fullgraph=True)
    counters.clear()
    graphs_at: dict[int, int] = {}  # batch size -> graph count after its first generation
    seen_batches: list[int] = []
    rss, memory = [], {}
    for g in range(GENERATIONS):
        thresh, steps, batch = rng.choice([0.2, 0.4, 0.8]), rng.randint(2, 8), rng.choice([1, 2, 4])
        for m in (model, ref):
            tk.enable_teacache(m, rel_l1_thresh=thresh)
            tk.reset_teacache(m, steps)
        labels = [rng.randrange(10) for _ in range(batch)]
        before = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            out = digits.generate(compiled, labels, seed=g, num_steps=steps)
            expected = digits.generate(ref, labels, seed=g, num_steps=steps)
        ours, theirs = tk.summary(model), tk.summary(ref)
        assert {n: c.schedule for n, c in ours.contexts.items()} == {n: c.schedule for n, c in theirs.contexts.items()}, g
        assert torch.allclose(out, expected, atol=1e-4), (g, (out - expected).abs().max())
        assert all(len(c.steps) == steps for c in ours.contexts.values()), g  # the logs hold this generation only
        if batch in seen_batches:
            assert counters["stats"]["unique_graphs"] == before, f"generation {g}: recompiled for batch {batch}"
        else:
            seen_batches.append(batch)
            graphs_at[batch] = counters["stats"]["unique_graphs"]
        if len(seen_batches) == 3:  # every shape compiled: from here on nothing may grow
            rss.append(rss_bytes())
            assert memory.setdefault(batch, ours.memory_bytes) == ours.memory_bytes, g  # a state per batch size, kept
    growth = rss[-1] - min(rss[: max(1, len(rss) // 4)])
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {len(rss)} generations"
    reused = tk.summary(model).reused
    print(f"\nsoak: {GENERATIONS} generations, batches first seen {graphs_at} (graphs after each), RSS growth "
          f"{growth / 2**20:.1f} MiB over the last {len(rss)}, {reused} of {tk.summary(model).calls} calls reused")
    assert 0 < reused < tk.summary(model).calls
