"""The zero-sync path (`tk.compile(..., mode="conditional")`, teacache_kernels/cudagraph_conditional.py) without a GPU.

What a CPU can check: feature detection and each of its errors; the IF-node hooks (a recording stand-in for the
CUDA graph: one node per call, around the blocks, on `not reuse`); that un-captured calls run both branches' work and
still give the reference's outputs; and the runner's logic with the capture replaced by a call on the static buffers
(`_device_capture=False`): static buffers, warm-up before capture, one graph per CFG context, recapture after a state
reallocation, schedules equal to the eager reference, outputs within the compile budget, no recompiles, no host
reads. That the capture then replays with zero host syncs is tests/test_gpu.py's.
"""

import contextlib
import re
import typing

import pytest
import torch
from conftest import HAS_CUDA
from torch._dynamo.utils import counters

import teacache_kernels as tk
from teacache_kernels import cudagraph_conditional as cc
from teacache_kernels.tiny_models import TinyFluxShape, flux_inputs, tiny_flux_transformer
from test_split_path import generate, inputs, schedules  # the same tiny FLUX with true CFG

SHAPE = TinyFluxShape()
THRESH = 0.6


# -- feature detection ------------------------------------------------------------------------------------------


def never():
    raise AssertionError("read although an earlier check failed")


def facts(**changes):
    base = dict(torch_version="2.13.0", cuda_build="12.8", hip_build=None, methods_missing=(), device_available=True,
                model_device="cuda:0", driver=lambda: 12080, probe=lambda: None)  # fmt: skip
    return cc.Facts(**{**base, **changes})


BOTH = dict(driver=never, probe=never)  # checks before the driver's: neither the driver nor the probe is read


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hip_build="6.2", cuda_build=None, **BOTH), r"ROCm/HIP 6\.2: .*only in CUDA builds"),
        (dict(cuda_build=None, **BOTH), r"2\.13\.0\) is CPU-only: .*CUDA build of torch \(CUDA >= 12\.4\)"),
        (dict(cuda_build="12.1", **BOTH), r"built with CUDA 12\.1: .*CUDA >= 12\.4"),
        (dict(cuda_build="11.8", **BOTH), r"built with CUDA 11\.8"),
        (dict(methods_missing=("begin_capture_to_if_node",), **BOTH), r"no torch\.cuda\.CUDAGraph\.begin_capture_to_if_node"),
        (dict(device_available=False, **BOTH), r"no CUDA device is visible"),
        (dict(model_device="cpu", **BOTH), r"the model is on cpu: .*move it to a CUDA device"),
        (dict(driver=lambda: None, probe=never), r"driver's CUDA version could not be read"),
        (dict(driver=lambda: 12020, probe=never), r"driver supports CUDA 12\.2: .*driver for CUDA >= 12\.4"),
        (dict(probe=lambda: "a probe capture failed: boom"), r"a probe capture failed: boom"),
    ],
    ids=["rocm", "cpu-build", "cuda-12.1", "cuda-11.8", "old-torch", "no-device", "model-on-cpu", "no-libcuda",
         "old-driver", "probe"],  # fmt: skip
)
def test_detection_names_what_is_missing(changes, message):
    reason = cc.missing(facts(**changes))
    assert reason is not None and re.search(message, reason), reason


def test_detection_passes_what_suffices():
    assert cc.missing(facts()) is None
    assert cc.missing(facts(cuda_build="12.4", driver=lambda: 12040)) is None  # the minimum, both sides
    assert cc.missing(facts(cuda_build="13.0", driver=lambda: 13000, model_device=None)) is None


@pytest.mark.skipif(HAS_CUDA, reason="checks this CPU-only build's own answer")
def test_this_cpu_build_is_refused_by_name():
    model = tiny_flux_transformer(SHAPE)
    tk.enable_teacache(model, num_inference_steps=4)
    assert "CPU-only" in cc.conditional_nodes_unavailable()
    with pytest.raises(RuntimeError, match=r"mode='conditional'\) cannot run: this torch build \(.*\) is CPU-only"):
        tk.compile(model, mode="conditional")
    assert tk.summary(model).branch == "cond"  # refused before anything changed
    with pytest.raises(ValueError, match="fullgraph=True cannot hold"):
        tk.compile(model, mode="conditional", fullgraph=True)


# -- the hooks, eagerly -----------------------------------------------------------------------------------------


class RecordingGraph:
    """Stands in for the CUDA graph being captured: records the IF nodes the span opens and closes."""

    def __init__(self):
        self.events = []

    def begin_capture_to_if_node(self, pred):
        assert pred.dtype == torch.bool and pred.numel() == 1
        self.events.append(("if", bool(pred)))  # host-ok: a test's recorder

    def end_capture_to_conditional_node(self):
        self.events.append(("end", None))


def test_the_span_opens_one_if_node_on_not_reuse_around_the_blocks():
    """Eager calls on the conditional branch inside `capturing`: per call one IF node, its predicate `not reuse`,
    closed before the residual op; the blocks run on every call (no real capture skips them), and the outputs equal
    the fused path's python branch bit for bit, reused calls included."""
    data, steps = inputs(), 8
    model, plain = tiny_flux_transformer(SHAPE), tiny_flux_transformer(SHAPE)
    for m in (model, plain):
        tk.enable_teacache(m, num_inference_steps=steps, rel_l1_thresh=THRESH)
    cache = model._teacache.cache
    cache.compiled_branch = cache.eager_branch = "conditional"
    block_calls = []
    model.transformer_blocks[0].register_forward_hook(lambda *_: block_calls.append(1))
    graph = RecordingGraph()
    with cc.capturing(graph) as record:
        out = generate(model, data, steps)
    expected = generate(plain, data, steps)
    assert torch.equal(out, expected)
    assert schedules(model) == schedules(plain) and "R" in schedules(model)["cond"]
    calls = 2 * steps
    assert record.opened == calls and len(block_calls) == calls and tk.summary(model).host_reads == 0
    ifs = [flag for kind, flag in graph.events if kind == "if"]
    assert [kind for kind, _ in graph.events] == ["if", "end"] * calls
    # Contexts alternate cond, uncond each step: the predicate is "this call computes".
    computed = [s[i] == "C" for i in range(steps) for s in (schedules(model)["cond"], schedules(model)["uncond"])]
    assert ifs == computed
    assert cc._capture.graph is None  # the capture state is cleared on exit


def test_an_error_inside_a_capture_closes_the_open_node():
    graph = RecordingGraph()
    with pytest.raises(ZeroDivisionError), cc.capturing(graph):
        cc.open_if_computing(torch.tensor(False))
        raise ZeroDivisionError  # what any error inside the capture does
    assert graph.events == [("if", True), ("end", None)] and cc._capture.graph is None and not cc._capture.open
    cc.open_if_computing(torch.tensor(False))  # no capture: nothing recorded, nothing raised
    cc.close_if_computing()
    assert len(graph.events) == 2


def test_the_runner_refuses_autograd_and_a_reference_cache():
    model = tiny_flux_transformer(SHAPE)
    with pytest.raises(RuntimeError, match="TeaCache is not enabled"):
        cc.CapturedTransformer(model, _device_capture=False)
    tk.enable_teacache(model, num_inference_steps=4, reference=True)
    with pytest.raises(ValueError, match="fused implementation"):
        cc.CapturedTransformer(model, _device_capture=False)
    tk.enable_teacache(model, reference=False)
    runner = cc.CapturedTransformer(model, _device_capture=False)
    latents, cond = flux_inputs(SHAPE)
    with pytest.raises(RuntimeError, match="records no autograd"):
        runner(hidden_states=latents, timestep=torch.ones(1), return_dict=False, **cond)
    assert runner.config is model.config and runner._orig_mod is model  # behaves like the transformer
    assert tk.summary(runner).branch == "conditional"


def test_runner_logic_warm_up_capture_replay_and_invalidation():
    """The runner's bookkeeping with Dynamo's eager backend (fast): per key, warm-ups until a call compiles nothing and
    keeps the addresses, then one capture and replays on fixed buffers; a state reallocation or a replaced parameter
    makes the graphs stale (warm up and capture again); outputs stay the reference's throughout."""
    data, steps = inputs(), 6
    model, ref = tiny_flux_transformer(SHAPE), tiny_flux_transformer(SHAPE)
    tk.enable_teacache(model, num_inference_steps=steps, rel_l1_thresh=THRESH)
    tk.enable_teacache(ref, num_inference_steps=steps, rel_l1_thresh=THRESH, reference=True)
    runner = cc.CapturedTransformer(model, _device_capture=False, backend="eager")
    stats = runner.stats

    out = generate(runner, data, steps)
    torch.testing.assert_close(out, generate(ref, data, steps), rtol=1e-5, atol=1e-5)
    assert schedules(model) == schedules(ref) and "R" in schedules(model)["cond"]
    # cond: its first call compiles and allocates (not settled), the second settles, the third captures; uncond
    # allocates on the host when entered, so its first call settles it.
    assert (stats.warmups, stats.captures, stats.graphs, stats.replays) == (3, 2, 2, 2 * steps - 3)
    assert tk.summary(model).host_reads == 0

    for m in (model, ref):
        tk.reset_teacache(m, 1500)  # beyond the log's capacity: the log is reallocated, the graphs are stale
    out = generate(runner, data, 3)
    torch.testing.assert_close(out, generate(ref, data, 3), rtol=1e-5, atol=1e-5)
    assert schedules(model) == schedules(ref)
    # The new log has more rows: cond's first call compiles for its shape, so it warms up twice; uncond once.
    assert (stats.warmups, stats.captures, stats.graphs) == (6, 4, 2)

    with torch.no_grad():  # a parameter replaced by another object (as adapters do): every graph is dropped
        model.proj_out.weight = torch.nn.Parameter(model.proj_out.weight.clone())
    out = generate(runner, data, 3)
    assert stats.captures == 6 and stats.graphs == 2 and stats.warmups >= 8
    assert runner._weights[-1] is not None and any(w is model.proj_out.weight for w in runner._weights)
    runner.reset()
    assert stats.graphs == 0 and tk.summary(model).cuda_graphs == 0
    assert_compiled_calls_open_the_if_node(runner, data)


def assert_compiled_calls_open_the_if_node(runner, data):
    """The hooks run at call time in the compiled model (graph breaks), not traced away: inside a capture the compiled
    call opens one IF node and closes it."""
    latents, cond, _ = data
    graph = RecordingGraph()
    with torch.no_grad(), runner.cache_context("cond"), cc.capturing(graph) as record:
        runner._compiled(hidden_states=latents, timestep=torch.ones(1), return_dict=False, **cond)
    assert record.opened == 1 and [kind for kind, _ in graph.events] == ["if", "end"]


def test_the_capture_sequence_with_a_stand_in_for_cuda(monkeypatch):
    """The device-capture code path, with torch.cuda's graph API replaced by recorders (no CUDA here): the third call
    of a context is captured (inside `capturing`, on the runner's stream, pools shared from the first graph), opening
    one IF node; later calls only replay; host tensors are refused before any capture; a span not on the conditional
    branch (no IF node) is an error, not a graph that would compute every step."""
    data, steps = inputs(), 4
    model = tiny_flux_transformer(SHAPE)
    tk.enable_teacache(model, num_inference_steps=steps, rel_l1_thresh=THRESH)
    runner = cc.CapturedTransformer(model, backend="eager")
    with pytest.raises(ValueError, match=r"got tensors on \['cpu'\]: pass them on the model's CUDA device"):
        generate(runner, data, steps)
    assert runner.stats.warmups == 3 and runner.stats.captures == 0  # cond: two warm-ups, uncond one, then cond's capture

    class FakeGraph(RecordingGraph):
        made: typing.ClassVar[list] = []

        def __init__(self):
            super().__init__()
            self.replays = 0
            FakeGraph.made.append(self)

        def pool(self):
            return f"pool of graph {FakeGraph.made.index(self)}"

        def replay(self):
            self.replays += 1

    entered = []

    @contextlib.contextmanager
    def fake_graph(graph, pool=None, stream=None):
        entered.append((graph, pool, stream))
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(cc, "_capture_stream", lambda device: "high-priority stream")
    monkeypatch.setattr(cc, "_check_on_device", lambda step: None)
    runner.reset()
    latents, cond, _ = data
    with torch.no_grad():
        check_fake_captures(runner, latents, cond, FakeGraph, entered)
    model._teacache.cache.compiled_branch = model._teacache.cache.eager_branch = "cond"
    runner.reset()
    with pytest.raises(RuntimeError, match="no longer has TeaCache on the conditional branch"), torch.no_grad():
        runner(hidden_states=latents, timestep=torch.ones(1), return_dict=False, **cond)


def check_fake_captures(runner, latents, cond, FakeGraph, entered):
    for _ in range(5):
        with runner.cache_context("cond"):
            runner(hidden_states=latents, timestep=torch.ones(1), return_dict=False, **cond)
    (graph,) = FakeGraph.made
    assert entered == [(graph, None, "high-priority stream")]  # one capture; the first graph gets a fresh pool
    # Compiled and allocated before reset(): one warm-up settles the key, the second call captures and replays.
    assert [kind for kind, _ in graph.events] == ["if", "end"] and graph.replays == 4 and runner.stats.warmups == 4
    assert runner.stats.captures == 1 and runner._pool == "pool of graph 0"
    with runner.cache_context("uncond"):
        for _ in range(2):
            runner(hidden_states=latents, timestep=torch.ones(1), return_dict=False, **cond)
    assert entered[1] == (FakeGraph.made[1], "pool of graph 0", "high-priority stream")  # the pool is shared


# -- the runner, compiled, minus the capture --------------------------------------------------------------------


@pytest.mark.slow
def test_runner_without_capture_matches_the_reference_without_recompiles():
    data = inputs()
    model, ref, plain = (tiny_flux_transformer(SHAPE) for _ in range(3))
    tk.enable_teacache(model, num_inference_steps=8, rel_l1_thresh=THRESH)
    tk.enable_teacache(ref, num_inference_steps=8, rel_l1_thresh=THRESH, reference=True)
    runner = cc.CapturedTransformer(model, _device_capture=False)
    plain_eager = generate(plain, data, 8)
    compile_error = (generate(torch.compile(plain, options={"triton.cudagraphs": False}), data, 8) - plain_eager).abs().max().item()
    scale = plain_eager.abs().max().item()
    torch._dynamo.reset()
    counters.clear()

    generate(runner, data, 8)  # warm-up generation: compiles, then captures (here: fixes the buffers) per context
    stats = runner.stats
    assert stats.graphs == 2 and stats.captures == 2  # one per CFG context
    assert stats.warmups <= 4 and stats.replays == 16 - stats.warmups  # at most two un-captured calls per context
    steps_by_key = dict(runner._steps)
    static = {k: [t.data_ptr() for t in s.static if isinstance(t, torch.Tensor)] for k, s in steps_by_key.items()}
    outputs = {k: s.outputs[0].data_ptr() for k, s in steps_by_key.items()}
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 1  # the hooks' breaks cut the forward
    with torch._dynamo.config.patch(error_on_recompile=True):
        for steps, thresh in ((8, THRESH), (6, THRESH), (8, 1.5)):
            for m in (model, ref):
                tk.enable_teacache(m, rel_l1_thresh=thresh, reference=m is ref)
                tk.reset_teacache(m, steps)
            out, expected = generate(runner, data, steps), generate(ref, data, steps)
            assert schedules(model) == schedules(ref), (steps, thresh)
            error = (out - expected).abs().max().item()
            assert error <= 2 * compile_error + 1e-6 * scale, (steps, error, compile_error)
    assert counters["stats"]["unique_graphs"] == graphs
    # Fixed buffers: the same static inputs and outputs for every replay; calls return clones of the outputs.
    assert runner._steps == steps_by_key and stats.captures == 2 and stats.warmups <= 4
    assert {k: [t.data_ptr() for t in s.static if isinstance(t, torch.Tensor)] for k, s in runner._steps.items()} == static
    assert {k: s.outputs[0].data_ptr() for k, s in runner._steps.items()} == outputs
    assert out.data_ptr() not in outputs.values()
    summary = tk.summary(model)
    assert summary.branch == "conditional" and summary.host_reads == 0 and summary.cuda_graphs == 2
    assert summary.graph_replays == stats.replays and "0 host reads (0 per call); 2 CUDA graphs" in str(summary)

    # A config that reallocates the state's log (a step count beyond its capacity): each graph is stale, so its
    # key warms up and captures again; the schedule stays the reference's.
    captures, warmups = stats.captures, stats.warmups
    for m in (model, ref):
        tk.reset_teacache(m, 1500)
    out, expected = generate(runner, data, 4), generate(ref, data, 4)  # (the log's new shape compiles once)
    assert schedules(model) == schedules(ref)
    assert stats.captures == captures + 2 and stats.warmups > warmups and stats.graphs == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert_compiled_calls_open_the_if_node(runner, data)
    print(f"\nconditional (no capture): {graphs} graphs compiled, {stats.captures} captures, {stats.warmups} warm-ups, "
          f"{stats.replays} replays; compiled vs eager {error:.3g} (plain compile error {compile_error:.3g})")  # fmt: skip


@pytest.mark.slow
def test_a_pipeline_is_compiled_in_one_line(monkeypatch):
    """tk.compile(pipe, mode="conditional") wires the runner into a diffusers pipeline (here with the capture replaced,
    and the feature check passed, as no GPU is at hand); the pipeline runs through it like through the transformer."""
    from teacache_kernels.tiny_models import tiny_flux_pipeline, tiny_flux_prompt

    monkeypatch.setattr(cc, "require_conditional_nodes", lambda device=None: None)
    pipe, ref = tiny_flux_pipeline(), tiny_flux_pipeline()
    for p, reference in ((pipe, False), (ref, True)):
        p.set_progress_bar_config(disable=True)
        tk.enable_teacache(p, rel_l1_thresh=THRESH, reference=reference)
    assert tk.compile(pipe, mode="conditional", _device_capture=False) is pipe
    assert isinstance(pipe.transformer, cc.CapturedTransformer)

    def run(p):
        return p(**tiny_flux_prompt(), num_inference_steps=6, height=32, width=32, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    for _ in range(2):
        out, expected = run(pipe), run(ref)
        assert schedules(pipe) == schedules(ref)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    summary = tk.summary(pipe)
    assert summary.branch == "conditional" and summary.host_reads == 0 and summary.cuda_graphs == 1
    assert summary.graph_replays == 12 - pipe.transformer.stats.warmups
