"""The cache's device memory: allocated once per context, never per step, and reported by summary().

For every built-in family's tiny pipeline (and the Wan 2.2 two-stage one): a forward hook on the transformer
snapshots every state buffer's address after each call. Over two generations (a new step count in the second),
every call sees the same addresses as the first call of its context: nothing is reallocated per step or per
generation. `summary().memory_bytes` per context equals the bytes of those buffers, of which the residuals are
one tensor of each cached stream's shape and dtype (the figure the README tabulates at real resolutions:
bench/cache_memory.py).
"""

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels.cached_forward import FusedCache
from teacache_kernels.tiny_families import TINY
from teacache_kernels.tiny_models import tiny_flux_pipeline, tiny_flux_prompt

# Options giving both outcomes where a tiny model has no published default (Wan) or its set is degenerate.
OPTIONS = {"wan": dict(coefficients="wan2.1-i2v-14b-480p", rel_l1_thresh=0.2), "cogvideox": dict(rel_l1_thresh=0.3)}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def buffers(cache: FusedCache) -> dict[str, tuple[int, ...]]:
    """Per state: the addresses of all its buffers."""
    out = {}
    for context in cache.contexts.values():
        for st in context.all_states():
            if st.allocated:
                tensors = (st.prev_signal, *st.residuals, st.scalars, st.config, st.log, st.partials, st.ticket)
                out[f"{context.name}/{st.name}"] = tuple(t.data_ptr() for t in tensors)
    return out


def transformers(pipe):
    return [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]


def watch(pipe) -> list:
    """After every transformer call: (transformer index, that cache's buffer addresses)."""
    seen = []
    for i, t in enumerate(transformers(pipe)):
        t.register_forward_hook(lambda module, args, out, i=i: seen.append((i, buffers(module._teacache.cache))))
    return seen


def flux():
    pipe = tiny_flux_pipeline()

    def generate(p, steps):
        return p(**tiny_flux_prompt(), num_inference_steps=steps, height=32, width=32, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    return pipe, generate


def tiny(name, **kw):
    fam = TINY[name]
    return lambda: (fam.pipeline(**kw), fam.generate)


CASES = {"flux": flux, **{name: tiny(name) for name in TINY}, "wan-2.2": tiny("wan", two_stage=True)}


@pytest.mark.parametrize("name", list(CASES))
def test_no_buffer_is_reallocated_across_steps_and_generations(name):
    pipe, generate = CASES[name]()
    pipe.set_progress_bar_config(disable=True)
    tk.enable_teacache(pipe, **OPTIONS.get(name.split("-")[0], {}))
    seen = watch(pipe)
    for steps in (8, 6):
        generate(pipe, steps)
    first: dict = {}
    for i, snapshot in seen:
        for state, addresses in snapshot.items():
            assert first.setdefault((i, state), addresses) == addresses, f"{name}: {state} reallocated"
    assert len(seen) >= 14 and first  # every call watched, some state allocated
    summary = tk.summary(pipe)
    assert summary.reused > 0 or name == "lumina2", str(summary)  # the steps did run the reuse path
    for i, t in enumerate(transformers(pipe)):
        cache = t._teacache.cache
        for context in cache.contexts.values():
            for st in context.all_states():
                if not st.allocated:
                    continue
                residuals = sum(r.numel() * r.element_size() for r in st.residuals)
                streams = [tuple(shape) for shape in st.layout[2]]
                assert [tuple(r.shape) for r in st.residuals] == streams  # one residual per cached stream, its shape
                assert st.memory_bytes >= residuals + st.prev_signal.numel() * st.prev_signal.element_size()
    contexts = summary.contexts
    assert all(c.memory_bytes > 0 for c in contexts.values()) and summary.memory_bytes >= sum(c.memory_bytes for c in contexts.values())
    assert "cache memory" in str(summary)


def test_the_readme_figures_come_from_the_same_allocation():
    """bench/cache_memory.py builds the state on the meta device for a layout; on the tiny Wan pipeline that figure
    equals what summary() reports for a real context of the same layout (float32 here)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import cache_memory

    pipe = TINY["wan"].pipeline()
    pipe.set_progress_bar_config(disable=True)
    tk.enable_teacache(pipe, **OPTIONS["wan"])
    TINY["wan"].generate(pipe, 8)
    st = pipe.transformer._teacache.cache.contexts["cond"]
    signal, _, streams, _, _ = st.layout
    case = cache_memory.Case("wan", "tiny", "-", "-", signal, streams, OPTIONS["wan"]["coefficients"], 8)
    assert cache_memory.context_bytes(case, dtype=torch.float32) == tk.summary(pipe).contexts["cond"].memory_bytes
    assert cache_memory.main(["--no-write"]) == 0
