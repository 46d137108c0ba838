"""The zero-sync path: a TeaCache'd transformer call captured whole in one CUDA graph, the cached span behind a
device-side IF node on the skip flag (CUDA-graph conditional nodes, CUDA >= 12.4).

    tk.enable_teacache(pipe, rel_l1_thresh=0.4)
    tk.compile(pipe, mode="conditional")      # pipe.transformer becomes a CapturedTransformer
    pipe(prompt, num_inference_steps=28)       # each transformer call: copy the inputs in, replay one graph
    print(tk.summary(pipe))                    # branch 'conditional', the graphs captured, 0 host reads

What runs where:
  - The transformer is compiled by Inductor *without* CUDA graphs (`triton.cudagraphs` off): this module captures
    the graphs itself. With `FusedCache.compiled_branch == "conditional"` the span (`FusedCache.run`) allocates the
    outputs, then calls `open_if_computing(reuse)`, runs the blocks and copies their outputs in, calls
    `close_if_computing()`, and then `apply_residual_` unconditionally (it stores the residual on computed calls and
    writes stream + residual on reused ones). The two hooks are `torch._dynamo.disable`d (graph breaks: the graphs
    between them are the blocks) and do nothing unless a `CapturedTransformer` is capturing, where they open and
    close an IF node on `not reuse` around the blocks. So in the graph the blocks run only on computed calls, and
    the flag never leaves the device.
  - Outside a capture the blocks run on every call and `apply_residual_` overwrites their outputs on reused calls:
    the outputs and the schedule are the reference's, without the skipping. That is what a warm-up call does (both
    branches' kernels compiled, autotuned and launched: the blocks' and the residual's, whatever the flag), and
    what the CPU tests check (tests/test_conditional_path.py).
  - `CapturedTransformer` keeps one graph per CFG context and input layout (the active context's state buffers and
    the input shapes are baked into a graph). Per key: static input buffers (the call's tensors copied in); the
    first call runs un-captured on them (compiles, warms up), calls keep running un-captured until one compiles
    nothing new, the next is captured (on a high-priority stream: the IF node's capture stream comes from the
    default-priority pool, which can hand out the outer capture stream again after 32 streams, pytorch#187893)
    and replayed, and every later call copies its inputs in and replays. No host read of the flag ever; the only
    syncs are at capture time (`torch.cuda.graph` synchronizes on entry).
  - A graph reads the addresses it was captured with: the context's state buffers and the model's weights and
    buffers are checked (their addresses) before each replay; a change (a new layout's reallocation, a config that
    reallocates the log, a `.to()`, a replaced parameter or submodule) drops the graph and the key warms up and
    captures again. In-place weight updates (load_state_dict, fused LoRA) need nothing.
  - Replays overwrite the graph's outputs: a call returns clones (`clone_outputs=True`, the default) unless told.

Feature detection (`conditional_nodes_unavailable`): a CUDA (not ROCm) build of torch with CUDA >= 12.4, the
`CUDAGraph` conditional-node methods, a visible device, a driver for CUDA >= 12.4, and a probe capture that must
skip and run an IF body. What is missing is named in the error.

Written against the torch 2.13 sources (torch/_higher_order_ops/cudagraph_conditional_nodes.py,
aten/src/ATen/cuda/CUDAGraph.cpp) on a machine without a GPU: the capture itself is tested by tests/test_gpu.py,
which no GPU has run yet.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

MIN_CUDA = (12, 4)  # cudaGraphConditionalHandleCreate and IF nodes: CUDA 12.4 (toolkit of the build and driver)
_METHODS = ("begin_capture_to_if_node", "end_capture_to_conditional_node")


# -- feature detection ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What the conditional path depends on (`gather_facts`); `missing` judges them. The driver and the probe are
    functions: read only once everything before them holds."""

    torch_version: str
    cuda_build: str | None  # torch.version.cuda
    hip_build: str | None  # torch.version.hip
    methods_missing: tuple[str, ...]  # CUDAGraph methods this torch lacks
    device_available: bool  # torch.cuda.is_available()
    model_device: str | None  # where the model is ("cuda:0"), None when not known
    driver: Callable[[], int | None]  # cuDriverGetVersion (e.g. 12040), None if libcuda cannot be loaded
    probe: Callable[[], str | None]  # a tiny capture with an IF node: None, or what went wrong


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def missing(facts: Facts) -> str | None:
    """Why CUDA-graph conditional nodes cannot run here, or None. Checks in the order a fix would take them."""
    need = f"{MIN_CUDA[0]}.{MIN_CUDA[1]}"
    if facts.hip_build is not None:
        return (f"this torch build ({facts.torch_version}) is for ROCm/HIP {facts.hip_build}: CUDA-graph conditional "
                f"nodes exist only in CUDA builds (CUDA >= {need})")  # fmt: skip
    if facts.cuda_build is None:
        return (f"this torch build ({facts.torch_version}) is CPU-only: CUDA-graph conditional nodes need a CUDA build "
                f"of torch (CUDA >= {need}) and an NVIDIA GPU with a driver for CUDA >= {need}")  # fmt: skip
    if _version(facts.cuda_build) < MIN_CUDA:
        return (f"this torch build ({facts.torch_version}) was built with CUDA {facts.cuda_build}: CUDA-graph "
                f"conditional nodes need a torch built with CUDA >= {need}")  # fmt: skip
    if facts.methods_missing:
        return (f"this torch ({facts.torch_version}) has no torch.cuda.CUDAGraph."
                f"{' / '.join(facts.methods_missing)}: it predates CUDA-graph conditional nodes; upgrade torch")  # fmt: skip
    if not facts.device_available:
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    if facts.model_device is not None and not facts.model_device.startswith("cuda"):
        return f"the model is on {facts.model_device}: the conditional path captures CUDA graphs; move it to a CUDA device first"
    driver = facts.driver()
    if driver is None:
        return "the NVIDIA driver's CUDA version could not be read (libcuda.so.1 did not load or cuDriverGetVersion failed)"
    if (driver // 1000, driver % 1000 // 10) < MIN_CUDA:
        return (f"the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10}: CUDA-graph conditional "
                f"nodes need a driver for CUDA >= {need} (R550 or newer)")  # fmt: skip
    return facts.probe()


def _driver_version() -> int | None:
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) == 0:  # needs no cuInit
            return version.value
    return None


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    # High priority: the IF node's body is captured on a stream from the default-priority pool (CUDAGraph.cpp,
    # getStreamFromPool()), which is round-robin over 32 streams; an outer capture stream from that same pool is
    # handed out again sooner or later, and capturing into a stream already capturing fails (pytorch#187893).
    # The high-priority pool is a separate set of streams.
    return torch.cuda.Stream(device, priority=-1)


def _probe(device: torch.device) -> str | None:
    """Capture one IF node that adds 1 when its predicate is true; replay it false, then true: expect 1."""
    try:
        with torch.cuda.device(device):
            pred = torch.zeros((), dtype=torch.bool, device=device)
            hits = torch.zeros(1, device=device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=_capture_stream(device)):
                graph.begin_capture_to_if_node(pred)
                hits.add_(1)
                graph.end_capture_to_conditional_node()
            graph.replay()
            pred.fill_(True)
            graph.replay()
            got = hits.item()  # host-ok: once per process and device, at feature detection
    except Exception as e:  # noqa: BLE001 (the reason is the message)
        return f"a probe capture with a conditional node failed on {device}: {type(e).__name__}: {e}"
    if got != 1:
        return f"a probe graph's IF node ran its body {got:g} times over a false and a true predicate (expected 1)"
    return None


def gather_facts(device: torch.device | str | None = None) -> Facts:
    """The facts for a model on `device` (None: the current CUDA device, if any)."""
    cuda = torch.version.cuda is not None and torch.cuda.is_available()
    if device is None and cuda:
        device = torch.device("cuda", torch.cuda.current_device())
    device = None if device is None else torch.device(device)
    if device is not None and device.type == "cuda" and device.index is None and cuda:
        device = torch.device("cuda", torch.cuda.current_device())
    graph_methods = (*_METHODS, "get_currently_capturing_graph")
    return Facts(
        torch_version=torch.__version__,
        cuda_build=torch.version.cuda,
        hip_build=getattr(torch.version, "hip", None),
        methods_missing=tuple(m for m in graph_methods if not hasattr(torch.cuda.CUDAGraph, m)),
        device_available=torch.cuda.is_available(),
        model_device=None if device is None else str(device),
        driver=_driver_version,
        probe=lambda: _probe(device),
    )


@functools.cache
def _unavailable(device: str | None) -> str | None:
    return missing(gather_facts(device))


def conditional_nodes_unavailable(device: torch.device | str | None = None) -> str | None:
    """Why the conditional path cannot run for a model on `device` (default: the current CUDA device), or None when it
    can. Cached per device: the probe capture runs once."""
    return _unavailable(None if device is None else str(torch.device(device)))


def require_conditional_nodes(device: torch.device | str | None = None) -> None:
    reason = conditional_nodes_unavailable(device)
    if reason is not None:
        raise RuntimeError(f"teacache_kernels: the zero-sync CUDA-graph path (mode='conditional') cannot run: {reason}")


# -- the IF node around the cached span ---------------------------------------------------------------------------


class _Capture(threading.local):
    graph: Any = None  # the CUDAGraph being captured by a CapturedTransformer (or a test's recorder), else None
    open: list  # predicates of IF nodes opened and not yet closed (kept alive until closed)
    opened: int = 0  # IF nodes opened during this capture

    def __init__(self):
        self.open = []


_capture = _Capture()


@contextlib.contextmanager
def capturing(graph) -> Any:
    """While a CapturedTransformer captures `graph`: the span's hooks open and close IF nodes on it. Yields the
    capture record (`.opened`). On an error inside, a node left open is closed, so the capture can end."""
    if _capture.graph is not None:
        raise RuntimeError("a TeaCache CUDA-graph capture is already in progress on this thread")
    _capture.graph, _capture.open, _capture.opened = graph, [], 0
    try:
        yield _capture
    finally:
        while _capture.open:
            _capture.open.pop()
            with contextlib.suppress(Exception):  # the original error is the one to see
                graph.end_capture_to_conditional_node()
        _capture.graph = None


@torch._dynamo.disable
def open_if_computing(reuse: torch.Tensor) -> None:
    """Open an IF node on `not reuse`: the work captured until `close_if_computing` runs only on computed calls.
    No-op unless a CapturedTransformer is capturing. A graph break under torch.compile (the blocks' graphs start
    here): Dynamo never sees the capture state, so the same graphs serve warm-up and capture."""
    graph = _capture.graph
    if graph is None:
        return
    pred = torch.logical_not(reuse)  # a 0-d bool on the device, computed inside the graph at each replay
    graph.begin_capture_to_if_node(pred)
    _capture.open.append(pred)  # alive until the node closes: the node's handle is set from its memory
    _capture.opened += 1


@torch._dynamo.disable
def close_if_computing() -> None:
    """Close the IF node `open_if_computing` opened (no-op when none is open)."""
    if _capture.graph is None or not _capture.open:
        return
    _capture.graph.end_capture_to_conditional_node()
    _capture.open.pop()


# -- the runner -------------------------------------------------------------------------------------------------

# Bumped whenever a module of a CapturedTransformer's model registers a parameter, buffer or submodule (torch's global
# registration hooks, filtered to the watched modules): a replaced parameter or an injected LoRA layer makes a
# captured graph stale, and the address check alone would miss a Parameter object swapped for another.
_structure_epoch = [0]
_watched: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_hooks_installed = False


def _watch(model: nn.Module) -> None:
    global _hooks_installed
    _watched.update(model.modules())
    if _hooks_installed:
        return

    def bump(module, *_):
        if module in _watched:
            _structure_epoch[0] += 1

    nn.modules.module.register_module_parameter_registration_hook(bump)
    nn.modules.module.register_module_buffer_registration_hook(bump)
    nn.modules.module.register_module_module_registration_hook(bump)
    _hooks_installed = True


def _leaf_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.device)  # strides: copied into a buffer of the static layout anyway
    try:
        hash(x)
    except TypeError:
        raise TypeError(
            f"CapturedTransformer: an argument of type {type(x).__name__} is neither a tensor nor hashable; a "
            "captured graph is chosen by its non-tensor arguments' values"
        ) from None
    return x


class _Step:
    """One key's static input buffers, and its graph once captured."""

    def __init__(self, leaves: list, spec):
        self.spec = spec
        # One buffer per distinct input tensor (an input passed twice stays one tensor), laid out densely
        # (empty_like keeps a dense tensor's strides and makes an expanded one contiguous).
        buffers: dict[int, torch.Tensor] = {}
        self.static = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if id(leaf) not in buffers:
                    buffers[id(leaf)] = torch.empty_like(leaf)
                self.static.append(buffers[id(leaf)])
            else:
                self.static.append(leaf)
        self.tensor_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.fingerprint: tuple | None = None  # addresses the last warm-up or the capture saw
        self.settled = False  # the last un-captured call compiled nothing new
        self.graph = None  # torch.cuda.CUDAGraph, or True for the CPU stand-in
        self.outputs = None  # the graph's output tensors (overwritten by each replay)

    def load(self, leaves: list) -> None:
        for i in self.tensor_positions:
            self.static[i].copy_(leaves[i])  # device copies, no sync (a CPU source goes through the host)

    def arguments(self) -> tuple[tuple, dict]:
        return tree_unflatten(self.static, self.spec)


def _check_on_device(step: _Step) -> None:
    off = [str(step.static[i].device) for i in step.tensor_positions if step.static[i].device.type != "cuda"]
    if off:  # a graph cannot read host memory the caller refills: every input must live on the device
        raise ValueError(f"the conditional path copies the call's tensors into device buffers; got tensors on "
                         f"{sorted(set(off))}: pass them on the model's CUDA device")  # fmt: skip


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@dataclass
class GraphStats:
    """A CapturedTransformer's counts, which `summary()` reports (the cache it serves points at them)."""

    graphs: int = 0  # graphs held now (one per CFG context and input layout)
    captures: int = 0  # captures so far, recaptures after a reallocation included
    replays: int = 0  # calls that replayed a graph
    warmups: int = 0  # un-captured calls (the first calls of each key, and after a reallocation)


class CapturedTransformer(nn.Module):
    """A TeaCache-enabled transformer whose calls replay CUDA graphs with an IF node on the skip flag (module
    docstring). Made by `teacache_kernels.compile(..., mode="conditional")`; behaves like the transformer
    (attributes, `cache_context`, `.config`...) and its original is `._orig_mod`, as for a torch.compile'd module.

    `clone_outputs=False` returns the graph's own output tensors, which the next replay of the same graph (the same
    CFG context and layout) overwrites. `reset()` drops every graph (after changing the model in a way the address
    checks cannot see). `_device_capture=False` runs the same logic with the graph replaced by a call of the
    compiled model on the static buffers: for testing on CPU, never a way to run it.
    """

    def __init__(self, transformer: nn.Module, *, clone_outputs: bool = True, _device_capture: bool = True, **compile_kwargs):
        super().__init__()
        if "mode" in compile_kwargs or compile_kwargs.get("fullgraph"):
            raise ValueError("the conditional path compiles with Inductor's default mode and graph breaks at the IF "
                             "node's hooks: pass neither mode nor fullgraph=True")  # fmt: skip
        transformer = getattr(transformer, "_orig_mod", transformer)  # a torch.compile'd one: compiled here instead
        inst = getattr(transformer, "_teacache", None)
        if inst is None:
            raise RuntimeError(f"TeaCache is not enabled on this {type(transformer).__name__}; call enable_teacache first")
        if not hasattr(inst.cache, "compiled_branch"):
            raise ValueError("the conditional path needs the fused implementation: enable without reference=True")
        family = inst.family
        if family.state_key is not None:  # the graph's key (context, input shapes) cannot see a host-chosen state
            raise ValueError(
                f"the conditional path cannot serve {family.name}: the family keeps its state by a key its forward "
                "computes on the host (ModelFamily.state_key; Lumina2: the joint sequence length, which diffusers "
                "reads from the attention mask on the host, a sync no capture can hold), while a captured graph is "
                "chosen by CFG context and input shapes only and replays the state it was captured with; use "
                "mode='reduce-overhead' (the split path)"
            )
        # Compiled and eager calls alike take the conditional branch: a frame Dynamo left to eager still opens
        # the IF node instead of reading the flag on the host inside the capture.
        inst.cache.compiled_branch = inst.cache.eager_branch = "conditional"
        self._orig_mod = transformer  # registered: parameters, state_dict and .to() see the transformer
        if compile_kwargs.get("backend", "inductor") == "inductor":  # we capture, not Inductor's CUDA-graph trees
            compile_kwargs["options"] = {"triton.cudagraphs": False, **compile_kwargs.get("options", {})}
        # Not a registered submodule (it would list the transformer's parameters twice): a plain attribute.
        self.__dict__["_compiled"] = torch.compile(transformer, fullgraph=False, **compile_kwargs)
        self.__dict__["_steps"] = {}
        self.__dict__["stats"] = GraphStats()
        self.clone_outputs = clone_outputs
        self._device_capture = _device_capture
        self._pool = None  # one memory pool for all graphs: they replay one at a time, in the caller's stream
        self._stream = None
        self._weights = [*transformer.parameters(), *transformer.buffers()]
        _watch(transformer)
        self._epoch = _structure_epoch[0]
        self._cache().cuda_graph_stats = self.stats

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_orig_mod"], name)

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def _cache(self):
        inst = getattr(self._orig_mod, "_teacache", None)
        if inst is None or getattr(inst.cache, "compiled_branch", None) != "conditional":
            raise RuntimeError(
                "this CapturedTransformer's transformer no longer has TeaCache on the conditional branch (disabled, "
                "or compiled again for another mode): call the transformer itself, or teacache_kernels.compile again"
            )
        return inst.cache

    def reset(self) -> None:
        """Drop every graph and static buffer: the next call of each key warms up and captures again."""
        self._steps.clear()
        self.stats.graphs = 0
        self._weights = [*self._orig_mod.parameters(), *self._orig_mod.buffers()]
        _watch(self._orig_mod)
        self._epoch = _structure_epoch[0]

    def _fingerprint(self, cache) -> tuple:
        """The addresses a graph of the active context reads besides its inputs: that context's state buffers (every
        layout's) and the model's weights and buffers."""
        states = cache._active.all_states()
        buffers = [t for st in states if st.allocated
                   for t in (st.prev_signal, *st.residuals, st.scalars, st.config, st.log, st.partials, st.ticket)]  # fmt: skip
        return (*map(torch.Tensor.data_ptr, buffers), *map(torch.Tensor.data_ptr, self._weights))

    # -- calls ---------------------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the conditional CUDA-graph path replays a captured graph, which records no autograd: call it under "
                "torch.no_grad() or torch.inference_mode() (diffusers pipelines do)"
            )
        cache = self._cache()
        if _structure_epoch[0] != self._epoch:  # a parameter, buffer or submodule was registered in the model
            self.reset()
        leaves, spec = tree_flatten((args, kwargs))
        ids = [id(x) for x in leaves if isinstance(x, torch.Tensor)]
        aliases = tuple(ids.index(i) for i in ids)  # a tensor passed twice shares one static buffer: part of the key
        key = (cache.active, spec, tuple(_leaf_key(x) for x in leaves), aliases)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = _Step(leaves, spec)
        step.load(leaves)
        fingerprint = self._fingerprint(cache)
        if step.graph is not None and step.fingerprint != fingerprint:
            step.graph, step.outputs, step.settled = None, None, False  # stale: warm up and capture again
            self.stats.graphs -= 1
        if step.graph is None and not (step.settled and step.fingerprint == fingerprint):
            return self._warm_up(step, cache, fingerprint)
        if step.graph is None:
            self._capture(step)
        return self._replay(step)

    def _warm_up(self, step: _Step, cache, before: tuple):
        """An un-captured call on the static buffers, in the caller's stream: a real step (the blocks and the residual
        op both run, whatever the flag; its outputs are the reference's). The key is captured at its next call once a
        warm-up compiled nothing new and left the addresses as they were (a context's first call allocates its state
        while it compiles)."""
        graphs = _unique_graphs()
        args, kwargs = step.arguments()
        out = self._compiled(*args, **kwargs)
        step.fingerprint = self._fingerprint(cache)
        step.settled = _unique_graphs() == graphs and step.fingerprint == before
        self.stats.warmups += 1
        return out  # fresh tensors, computed outside any graph

    def _capture(self, step: _Step) -> None:
        if not self._device_capture:  # CPU stand-in: "replay" calls the compiled model on the static buffers
            step.graph = True
        else:
            _check_on_device(step)
            if self._stream is None:
                self._stream = _capture_stream(step.static[step.tensor_positions[0]].device)
            args, kwargs = step.arguments()
            graph = torch.cuda.CUDAGraph()
            graphs = _unique_graphs()
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream), capturing(graph) as record:
                outputs = self._compiled(*args, **kwargs)
            if record.opened == 0:
                raise RuntimeError(
                    "the captured transformer call opened no IF node: its span did not run on the conditional branch, "
                    "so the graph would compute every step; was TeaCache re-enabled or the model compiled again?"
                )
            if _unique_graphs() != graphs:  # a compile during capture: its autotuning could not have run
                raise RuntimeError("torch.compile compiled a new graph while the conditional path was capturing; "
                                   "please report it, with the model and inputs")  # fmt: skip
            if self._pool is None:
                self._pool = graph.pool()
            step.graph, step.outputs = graph, outputs
        self.stats.captures += 1
        self.stats.graphs += 1

    def _replay(self, step: _Step):
        if step.graph is True:  # CPU stand-in
            args, kwargs = step.arguments()
            out = self._compiled(*args, **kwargs)
            if step.outputs is None:
                step.outputs = out
            else:
                _copy_into(step.outputs, out)
        else:
            step.graph.replay()
        self.stats.replays += 1
        return tree_map_only(torch.Tensor, torch.Tensor.clone, step.outputs) if self.clone_outputs else step.outputs


def _copy_into(dest, src) -> None:
    for d, s in zip(tree_flatten(dest)[0], tree_flatten(src)[0]):
        if isinstance(d, torch.Tensor):
            d.copy_(s)
