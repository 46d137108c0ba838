"""Both CUDA-graph paths on every family of `tiny_families.TINY` (FLUX: tests/test_split_path.py and
tests/test_conditional_path.py), on their real tiny diffusers pipelines with CFG. No GPU here: what a CPU can check.

- Zero-sync path (`tk.compile(pipe, mode="conditional")`), every family: the runner (`CapturedTransformer`) with its
  capture replaced by a call on the static buffers (`_device_capture=False`) and Dynamo's eager backend (the graph
  breaks at the IF node's hooks are real; Inductor is not run for it here: FLUX's runner is compiled with Inductor in
  tests/test_conditional_path.py, and the graphs between the hooks hold each family's blocks, which the split path
  below and each family's own compile test run through Inductor). Over two generations (the second with another step
  count, under error_on_recompile): schedules equal the eager reference's (`reference=True`), outputs within the
  compile budget (the eager backend changes nothing: 1e-6 of the output's scale), zero host reads, one graph per CFG
  context (or batched-CFG call) captured once and replayed after, and inside a capture each call opens exactly one IF
  node whose predicate is "this call computes". Lumina2 is refused by name (see the test).
- Split path (`tk.compile(pipe, mode="reduce-overhead")`, Inductor; on CPU no CUDA graphs, but the graph break at
  the decision and the branch logic run), compiled: schedules equal the reference's, outputs within the FLUX compile
  budget (twice what compiling changes in the uncached pipeline + 1e-6 of its scale, tests/test_compile.py), exactly
  one host read per transformer call, no recompile after a warm-up generation.

  CI budget: a cold Inductor compile of one family's split path and of its plain pipeline (for the budget) takes
  20-60 s here, all eight about 5 minutes; so the split path is compiled for the families whose spans differ in
  what the split touches, and the rest are covered by the shared code:
    cogvideox  two cached streams, which are views of one tensor (the split's branch outputs; batched CFG);
    hidream    a custom span (`HiDreamSpan`) with captures, one of them a list (`caption_projection.*`);
    wan        a capture from a module that runs before the blocks (`condition_embedder`); separate CFG calls;
    mochi      a `tail` module run inside the span, and data-dependent shapes in the blocks (torch.nonzero);
    lumina2    a `state_key` (state per sequence length) and diffusers' own host-side graph breaks before the span.
  Not compiled here: qwen-image (two cached streams, as cogvideox; separate CFG calls, as wan), hunyuan-video (a
  custom span, as hidream), ltx-video (one plain stream). Every family's span ends in the same `FusedCache.run`,
  where the split happens (one `_read_flag` per call, then the blocks or nothing), so what a family adds is only what
  runs before it (the signal, captures, state keys), which the conditional test above runs through Dynamo for all
  of them (with graph breaks at the same point), and their own test files compile on the cond path.

What the GPU adds (graphs captured and replayed, no cudagraph skips, zero host syncs) is tests/test_gpu.py's.
"""

import contextlib

import pytest
import torch
from torch._dynamo.utils import counters

import teacache_kernels as tk
from teacache_kernels import cudagraph_conditional as cc
from teacache_kernels.tiny_families import TINY
from test_conditional_path import RecordingGraph  # the IF-node recorder standing in for a capture

# Per family: enable_teacache options giving computed and reused calls in both generations below, and the
# pipeline's config where the default cannot compile (HiDream: diffusers' MoE inference reads expert counts on the
# host; its compile tests use plain feed-forwards, tests/test_hidream.py).
CASES = {
    "qwen-image": dict(rel_l1_thresh=0.6),
    "lumina2": dict(rel_l1_thresh=0.7),
    "cogvideox": dict(rel_l1_thresh=1.2, coefficients=[1.0, 0.0]),
    "mochi": dict(rel_l1_thresh=1.0),
    "ltx-video": dict(rel_l1_thresh=0.1),
    "hunyuan-video": dict(rel_l1_thresh=0.6),
    "hidream": dict(rel_l1_thresh=0.45),
    "wan": dict(rel_l1_thresh=0.3, coefficients="wan2.1-t2v-1.3b"),  # no published set fits the tiny Wan
}
CONFIGS = {"hidream": dict(experts=0, num_layers=1, num_single_layers=1, llama_layers=[3, 1])}
FAMILIES = list(TINY)
SPLIT_COMPILED = ["cogvideox", "hidream", "mochi", "lumina2", "wan"]  # the module docstring says why these
STEPS = (8, 5)  # the checked generations, after the warm-up one of WARM_UP steps
WARM_UP = 6


def test_every_family_has_a_case():
    assert set(CASES) == set(TINY), "a family added to TINY needs a case here (and a row in the README table)"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(autouse=True)
def fresh_counters():
    counters.clear()
    yield


def pipeline(family):
    pipe = TINY[family].pipeline(**CONFIGS.get(family, {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def enabled_pair(family):
    """A fused pipeline and its eager reference, enabled alike."""
    pipe, ref = pipeline(family), pipeline(family)
    tk.enable_teacache(pipe, **CASES[family])
    tk.enable_teacache(ref, reference=True, **CASES[family])
    return pipe, ref


def schedules(pipe):
    return {n: c.schedule for n, c in tk.summary(pipe).contexts.items()}


def calls(pipe):
    """Transformer calls of the last generation: one schedule letter per call, over every state."""
    return sum(len(s) for s in schedules(pipe).values())


# -- the zero-sync path: the runner's logic, capture replaced ----------------------------------------------------


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "lumina2"])
def test_conditional_runner_matches_the_reference(family, monkeypatch):
    monkeypatch.setattr(cc, "require_conditional_nodes", lambda device=None: None)  # no GPU: the check passed
    fam = TINY[family]
    pipe, ref = enabled_pair(family)
    assert tk.compile(pipe, mode="conditional", backend="eager", _device_capture=False) is pipe
    runner = pipe.transformer
    assert isinstance(runner, cc.CapturedTransformer)

    fam.generate(pipe, WARM_UP)  # compiles, warms up, then captures (here: fixes the buffers) per key
    stats = runner.stats
    keys = len(fam.contexts)  # one graph per CFG context (the batched-CFG families: one call per step)
    assert stats.captures == stats.graphs == keys, stats
    assert stats.warmups <= 2 * keys and stats.replays == calls(pipe) - stats.warmups, stats
    assert {"C", "R"} <= set("".join(schedules(pipe).values()))  # the warm-up saw both branches
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, steps in enumerate(STEPS):
            replays, warmups = stats.replays, stats.warmups
            graph = RecordingGraph()
            inside = cc.capturing(graph) if i == 1 else contextlib.nullcontext()  # the second: inside a "capture"
            with inside as record:
                out = fam.generate(pipe, steps)
            expected = fam.generate(ref, steps)
            sched = schedules(pipe)
            assert sched == schedules(ref), steps
            assert set(sched) == set(fam.contexts) and all("R" in s[1:-1] for s in sched.values()), sched
            scale = expected.abs().max().item()
            error = (out - expected).abs().max().item()
            assert error <= 1e-6 * scale, (steps, error, scale)
            assert stats.replays - replays == calls(pipe) and stats.warmups == warmups  # every call replays
            if i == 1:  # each call opened one IF node, on "this call computes", and closed it
                assert record.opened == calls(pipe)
                assert [kind for kind, _ in graph.events] == ["if", "end"] * calls(pipe)
                computed = [flag for kind, flag in graph.events if kind == "if"]
                assert computed.count(True) == sum(s.count("C") for s in sched.values())
    assert stats.captures == stats.graphs == keys
    summary = tk.summary(pipe)
    assert summary.branch == "conditional" and summary.host_reads == 0 and summary.cuda_graphs == keys
    assert "0 host reads" in str(summary)


def test_conditional_path_refuses_a_state_kept_by_a_host_key(monkeypatch):
    """Lumina2 keeps state per joint sequence length (`state_key`): its pipeline calls cond and uncond without a
    cache context and with inputs of the same shapes, so the runner's key (context, input shapes) cannot tell them
    apart; the state (and the sequence layout) a call uses is chosen on the host, inside the forward, from the mask
    (diffusers reads it there: `attention_mask.sum(dim=1).tolist()`, a host sync that no capture can hold). A
    captured graph would replay one of them for both. Refused by name, before anything changes."""
    monkeypatch.setattr(cc, "require_conditional_nodes", lambda device=None: None)
    pipe, _ = enabled_pair("lumina2")
    transformer = pipe.transformer
    with pytest.raises(ValueError, match=r"lumina2.*keeps its state by a key.*state_key"):
        tk.compile(pipe, mode="conditional", backend="eager", _device_capture=False)
    assert pipe.transformer is transformer and tk.summary(pipe).branch == "cond"
    assert transformer._teacache.cache.eager_branch == "python"


# -- the split path, compiled -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", SPLIT_COMPILED)
def test_split_path_compiled_matches_the_reference_with_one_host_read_per_call(family):
    fam = TINY[family]
    pipe, ref = enabled_pair(family)
    plain = pipeline(family)
    assert tk.compile(pipe, mode="reduce-overhead") is pipe and hasattr(pipe.transformer, "_orig_mod")

    fam.generate(pipe, WARM_UP)  # warm-up: compiles every graph, both branches
    assert {"C", "R"} <= set("".join(schedules(pipe).values()))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 1  # the break at the decision cuts the forward
    plain_eager = fam.generate(plain, STEPS[0])
    plain.transformer = torch.compile(plain.transformer)
    compile_error = (fam.generate(plain, STEPS[0]) - plain_eager).abs().max().item()
    scale = plain_eager.abs().max().item()
    graphs_with_plain = counters["stats"]["unique_graphs"]

    reads = tk.summary(pipe).host_reads
    with torch._dynamo.config.patch(error_on_recompile=True):
        for steps in STEPS:
            out, expected = fam.generate(pipe, steps), fam.generate(ref, steps)
            sched = schedules(pipe)
            assert sched == schedules(ref), steps
            assert set(sched) == set(fam.contexts) and all("R" in s[1:-1] for s in sched.values()), sched
            error = (out - expected).abs().max().item()
            assert error <= 2 * compile_error + 1e-6 * scale, (steps, error, compile_error)
            summary = tk.summary(pipe)
            assert summary.host_reads - reads == calls(pipe), summary  # exactly one read per call
            reads = summary.host_reads
    assert counters["stats"]["unique_graphs"] == graphs_with_plain  # nothing compiled after the warm-up
    assert tk.summary(pipe).branch == "split"
    print(f"\n{family} split: {graphs} graphs, compiled vs eager {error:.3g} (plain compile error {compile_error:.3g})")
