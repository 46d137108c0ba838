"""AOTInductor deployment: a TeaCache-enabled transformer packaged as one `.pt2` that runs without Python.

    import teacache_kernels as tk
    from teacache_kernels.export import export_teacache
    tk.enable_teacache(transformer, num_inference_steps=30, ...)
    export_teacache(transformer, {"cond": cond_kwargs, "uncond": uncond_kwargs}, "model.pt2",
                    shared={"hidden_states": x, "timestep": t, ...})

The package holds one *CFG step*: the transformer called once per context, in the order given (as a pipeline
calls it under `cache_context("cond")`, then `("uncond")`). Each context's TeaCache state (previous signal,
residual, scalars, config, log) is a mutable buffer of the exported program: the decision (`teacache::decide`,
which Inductor lowers to its torch path: C++ on CPU) and the `torch.cond` over the block span are in the
program, and the state persists between `run()` calls inside the loaded model, so a C++ loop that calls it once
per denoising step gets the Python run's skip schedule. The step counter wraps at `num_inference_steps` on
the device, so the next generation starts by itself (no reset call from the host).

How the state becomes buffers: `FusedCache` keeps a context's state in plain tensors on a `ContextState`
(not module buffers, so `state_dict` and `.to(dtype)` never see them). `CFGStep` registers those very tensors
as buffers of its own (`teacache.<context>.<field>`), and at every call points the `ContextState` at the
buffers it was handed. Eagerly those are the same tensors (nothing changes); while `torch.export` traces, they
are the traced buffers, so the decision's in-place writes become buffer mutations of the program. The
context is chosen on the host while tracing (`cache_context`), as in eager: one program, both contexts' graphs.

Inputs of the program, flat and in order: the `shared` tensors, then each context's tensors (the package's
metadata `teacache.inputs` names them, `<context>.<name>` for per-context ones). Outputs: each context's
transformer output (`output_index` of what it returns), then, for a cached package, each context's 0-d bool
"reused" flag of this call, read from the state (the lifetime reuse count went up).

`export_digits` packages the embedded digits model twice (TeaCache and uncached) with its inputs and the Python
run's result, for the C++ runner in `csrc/aoti_runner/` (README, "AOTInductor deployment").
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from . import state as S

# ContextState tensor attributes that become buffers; `residuals` (a tuple, one per cached stream) adds
# `residual_<i>` buffers.
_STATE_FIELDS = ("prev_signal", "scalars", "config", "log", "partials", "ticket")

# Python-registered ops must not survive into the package: the C++ runner has no Python to dispatch to.
_OWN_OPS = ("teacache",)


class _ContextBuffers(nn.Module):
    """One CFG context's TeaCache state as buffers (non-persistent: never in a `state_dict`, as in eager)."""

    def __init__(self, st: S.ContextState):
        super().__init__()
        for name in _STATE_FIELDS:
            self.register_buffer(name, getattr(st, name), persistent=False)
        for i, residual in enumerate(st.residuals):
            self.register_buffer(f"residual_{i}", residual, persistent=False)
        self.num_residuals = len(st.residuals)

    def state_tensors(self) -> dict:
        values = {name: getattr(self, name) for name in _STATE_FIELDS}
        values["residuals"] = tuple(getattr(self, f"residual_{i}") for i in range(self.num_residuals))
        return values


@contextlib.contextmanager
def _bound(st: S.ContextState, values: dict):
    """Point `st` at `values` (the traced buffers while exporting) for the duration of a call."""
    saved = {name: getattr(st, name) for name in values}
    for name, value in values.items():
        setattr(st, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(st, name, value)


def _installation(transformer: nn.Module):
    from .cached_forward import FusedCache

    inst = getattr(getattr(transformer, "_orig_mod", transformer), "_teacache", None)
    if inst is None:
        return None
    if not isinstance(inst.cache, FusedCache):
        raise TypeError(
            "export needs the fused implementation (the oracle decides in Python): enable without reference=True"
        )
    if inst.pipeline is not None:
        raise ValueError(
            "export a bare transformer (enable_teacache(transformer, num_inference_steps=...)): in a package the step "
            "count is fixed, the pipeline cannot set it per call"
        )
    if not inst.cache.config.num_inference_steps:
        raise ValueError("export needs num_inference_steps: the exported state wraps to a new generation at it")
    return inst


class CFGStep(nn.Module):
    """The transformer called once per CFG context, flat tensor inputs in, per-context outputs (and flags) out.

    `shared`: names of keyword tensors every context gets; `per_context`: context -> names of its own keyword
    tensors. With TeaCache enabled on `transformer`, each context's state must exist (`allocate_states`) and is
    registered here as buffers. Without it, the same calls uncached: the baseline a deployment compares against.
    """

    def __init__(
        self,
        transformer: nn.Module,
        shared: Sequence[str],
        per_context: Mapping[str, Sequence[str]],
        *,
        output_index: int = 0,
        call_kwargs: Mapping | None = None,
    ):
        super().__init__()
        self.transformer = transformer
        self.shared = tuple(shared)
        self.per_context = {ctx: tuple(names) for ctx, names in per_context.items()}
        self.output_index = output_index
        self.call_kwargs = dict(call_kwargs or {"return_dict": False})
        self.inst = _installation(transformer)
        self.teacache = nn.ModuleDict()
        if self.inst is not None:
            for ctx in self.per_context:
                st = self.inst.cache.contexts.get(ctx)
                if st is None or not st.allocated or st.layouts or st.keyed:
                    raise ValueError(f"context {ctx!r} needs exactly one allocated state: call allocate_states first")
                self.teacache[ctx] = _ContextBuffers(st)

    @property
    def cached(self) -> bool:
        return self.inst is not None

    def input_names(self) -> list[str]:
        return [*self.shared, *(f"{ctx}.{n}" for ctx, names in self.per_context.items() for n in names)]

    def forward(self, *inputs: torch.Tensor):
        shared = dict(zip(self.shared, inputs))
        rest = iter(inputs[len(self.shared) :])
        outputs, flags = [], []
        for ctx, names in self.per_context.items():
            kwargs = {**shared, **{n: next(rest) for n in names}, **self.call_kwargs}
            with self.transformer.cache_context(ctx):
                if self.inst is None:
                    outputs.append(self.transformer(**kwargs)[self.output_index])
                    continue
                buffers = self.teacache[ctx].state_tensors()
                with _bound(self.inst.cache.contexts[ctx], buffers):
                    reused_before = buffers["scalars"][S.REUSED].clone()
                    outputs.append(self.transformer(**kwargs)[self.output_index])
                    flags.append(buffers["scalars"][S.REUSED] > reused_before)
        return (*outputs, *flags)


@torch.no_grad()
def allocate_states(
    transformer: nn.Module,
    shared: Mapping[str, torch.Tensor],
    per_context: Mapping[str, Mapping[str, torch.Tensor]],
    call_kwargs=None,
) -> None:
    """Allocate each context's state for these inputs' layout (one eager call per context), then start it fresh.

    Fresh: new buffers at the start of a generation with lifetime counts at 0, so the package begins where a
    newly enabled model begins (and the eager call leaves no trace in it)."""
    inst = _installation(transformer)
    kwargs = dict(call_kwargs or {"return_dict": False})
    for ctx, own in per_context.items():
        with transformer.cache_context(ctx):
            transformer(**shared, **own, **kwargs)
    for ctx in per_context:
        st = inst.cache.contexts[ctx]
        st.allocate_layout(st.layout, inst.cache.config)


def python_op_calls(package_path: str | os.PathLike) -> list[str]:
    """Ops a package's generated code would call that a process without Python cannot run: this package's own
    (`teacache::`) anywhere in the code, and any op outside ATen among the extern nodes that AOTInductor runs
    through its proxy executor (a Python `torch.library` op lands there, by name). Empty is what deploys."""
    import zipfile

    found = []
    with zipfile.ZipFile(package_path) as z:
        for name in z.namelist():
            if name.endswith(".cpp"):
                text = z.read(name).decode("utf-8", "replace")
                found += [f"{name}: {ns}::" for ns in _OWN_OPS if f"{ns}::" in text]
            elif name.endswith(".json") and not name.endswith("_metadata.json"):
                nodes = json.loads(z.read(name)).get("nodes", [])
                targets = {n.get("node", {}).get("target", "") for n in nodes}
                found += [f"{name}: {t}" for t in sorted(targets) if not t.startswith("aten::")]
    return found


def export_program(
    transformer: nn.Module,
    per_context: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    shared: Mapping[str, torch.Tensor] | None = None,
    output_index: int = 0,
    call_kwargs: Mapping | None = None,
) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """`torch.export` of one CFG step of `transformer` (see `export_teacache`), and the metadata its package
    carries: `teacache.inputs`, `teacache.contexts`, `teacache.cached`, and for a cached one
    `teacache.num_inference_steps` and `teacache.rel_l1_thresh`."""
    shared = dict(shared or {})
    transformer = getattr(transformer, "_orig_mod", transformer)  # a torch.compile'd module: export the original
    inst = _installation(transformer)
    with torch.no_grad():  # the span's differentiable path is for training; a package only runs inference
        if inst is not None:
            allocate_states(transformer, shared, per_context, call_kwargs)
        step = CFGStep(transformer, list(shared), {c: list(k) for c, k in per_context.items()},
                       output_index=output_index, call_kwargs=call_kwargs).eval()  # fmt: skip
        args = (*shared.values(), *(t for own in per_context.values() for t in own.values()))
        meta = {
            "teacache.inputs": ",".join(step.input_names()),
            "teacache.contexts": ",".join(per_context),
            "teacache.cached": "1" if step.cached else "0",
        }
        if inst is not None:
            cfg = inst.cache.config
            meta["teacache.num_inference_steps"] = str(cfg.num_inference_steps)
            meta["teacache.rel_l1_thresh"] = repr(cfg.rel_l1_thresh)
        # Non-strict export: torch.compiler.is_compiling() holds while it traces, so the span takes its compiled
        # path, on the buffers CFGStep hands it. The branch must be torch.cond (in the program), not the split
        # path's host read (teacache_kernels.compile sets "split" for the CUDA-graph modes).
        with _cond_branch(inst.cache if inst is not None else None):
            program = torch.export.export(step, args, strict=False)
    return program, meta


@contextlib.contextmanager
def _cond_branch(cache):
    if cache is None or cache.compiled_branch == "cond":
        yield
        return
    saved = cache.compiled_branch
    cache.compiled_branch = "cond"
    try:
        yield
    finally:
        cache.compiled_branch = saved


def package(
    program: torch.export.ExportedProgram,
    path: str | os.PathLike,
    metadata: Mapping[str, str],
    inductor_configs: Mapping | None = None,
) -> Path:
    """AOTInductor-compile `program` into the `.pt2` at `path`, with `metadata` (read in C++ by
    `AOTIModelPackageLoader::get_metadata`). Raises if the code would call a Python-registered op."""
    from torch._inductor import aoti_compile_and_package

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = {"aot_inductor.metadata": dict(metadata), **(inductor_configs or {})}
    aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    calls = python_op_calls(path)
    if calls:
        raise RuntimeError(f"the package {path} calls Python-registered ops, which a C++ runner cannot: {calls}")
    return path


def export_teacache(
    transformer: nn.Module,
    per_context: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | os.PathLike,
    *,
    shared: Mapping[str, torch.Tensor] | None = None,
    output_index: int = 0,
    call_kwargs: Mapping | None = None,
    metadata: Mapping[str, str] | None = None,
    inductor_configs: Mapping | None = None,
) -> Path:
    """Package `transformer` (TeaCache-enabled on a bare transformer, or plain) as an AOTInductor `.pt2` at
    `path`; returns the path. Load it with `torch._inductor.aoti_load_package` or, in C++,
    `torch::inductor::AOTIModelPackageLoader`.

    per_context: context name -> that call's keyword tensors (e.g. {"cond": {"encoder_hidden_states": ...},
        "uncond": {...}}), in call order. A single call without CFG: one context, e.g. {"default": {}}.
    shared: keyword tensors every context gets (e.g. hidden_states, timestep, position ids).
    output_index: which of the transformer's outputs (called with `return_dict=False`) each context returns.
    call_kwargs: non-tensor keyword arguments of every call (default `{"return_dict": False}`).
    metadata: extra string pairs for the package. inductor_configs: for `aoti_compile_and_package`.

    The example tensors fix the shapes (static) and device. TeaCache's state is allocated for them, fresh (a
    generation's start, lifetime counts 0), and the package starts from it; the transformer keeps using those
    buffers eagerly. Raises if the compiled code would call a Python-registered op (`python_op_calls`).
    """
    program, meta = export_program(transformer, per_context, shared=shared, output_index=output_index,
                                   call_kwargs=call_kwargs)  # fmt: skip
    return package(program, path, {**meta, **(metadata or {})}, inductor_configs)


# -- the embedded digits model: what the C++ runner (csrc/aoti_runner) runs and how its result is checked --

CACHED_PACKAGE, PLAIN_PACKAGE, INPUTS_FILE, PYTHON_FILE, RESULT_FILE = (
    "teacache.pt2", "plain.pt2", "inputs.pt", "python.pt", "result.pt"
)  # fmt: skip

# How far the runner's images may be from Python's eager ones: the budget tests/test_digits.py gives a compiled
# model against eager (Inductor's kernels round differently; nothing else differs). Images are in [-1, 1].
IMAGE_ATOL = 1e-4


def _digits_inputs(labels: torch.Tensor, seed: int, steps: int, guidance_scale: float) -> tuple[dict, dict, dict]:
    """(shared, per-context, loop) tensors of digits.generate's loop, named as the packages' inputs."""
    from . import digits
    from .digits.model import NULL_CLASS

    noise = digits.initial_noise(len(labels), seed)
    cond = digits.conditioning(labels)
    uncond = digits.conditioning(torch.full_like(labels, NULL_CLASS))
    positions = {k: cond.pop(k) for k in ("img_ids", "txt_ids")}
    for k in positions:
        uncond.pop(k)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)  # as digits.generate
    shared = {"hidden_states": noise, "timestep": torch.full((len(labels),), float(sigmas[0])), **positions}
    loop = {"sigmas": sigmas, "guidance_scale": torch.tensor(float(guidance_scale), dtype=torch.float64)}
    return shared, {"cond": cond, "uncond": uncond}, loop


def export_digits(
    out: str | os.PathLike,
    *,
    labels: Sequence[int] = tuple(range(10)),
    seed: int = 0,
    rel_l1_thresh: float | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> dict[str, Path]:
    """Package the embedded digits model with TeaCache (its calibrated coefficients; `rel_l1_thresh` None: the
    file's recommended one) and uncached, and write what the C++ runner reads and what it is checked against:

    teacache.pt2, plain.pt2: one CFG step each (`export_teacache`); inputs.pt: the initial noise, the
    conditioning, the sigmas and the guidance scale of `digits.generate(labels, seed)`; python.pt: that Python
    run's images and per-context schedule with TeaCache (eager), and its uncached images. Returns the paths.
    """
    from . import digits
    from .api import enable_teacache, summary

    steps = steps or digits.NUM_STEPS
    guidance_scale = digits.GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shared, per_context, loop = _digits_inputs(labels_t, seed, steps, guidance_scale)
    paths = {name: out / name for name in (CACHED_PACKAGE, PLAIN_PACKAGE, INPUTS_FILE, PYTHON_FILE)}

    def enabled():
        model = digits.load_transformer()
        enable_teacache(model, coefficients_file=digits.COEFFICIENTS_FILE, rel_l1_thresh=rel_l1_thresh,
                        num_inference_steps=steps)  # fmt: skip
        return model

    # The Python run the package must reproduce, on a model of its own (the exported one starts fresh).
    reference = enabled()
    run = {"seed": seed, "num_steps": steps, "guidance_scale": guidance_scale}
    images = digits.generate(reference, labels_t, **run)
    contexts = summary(reference).contexts
    schedule = torch.tensor([[s.reused for s in contexts[c].steps] for c in per_context], dtype=torch.uint8)
    plain = digits.load_transformer()
    torch.save({"images": images, "schedule": schedule, "plain_images": digits.generate(plain, labels_t, **run)},
               paths[PYTHON_FILE])  # fmt: skip
    torch.save({**shared, **{f"{c}.{k}": v for c, own in per_context.items() for k, v in own.items()}, **loop},
               paths[INPUTS_FILE])  # fmt: skip

    meta = {"teacache.model": digits.MODEL_NAME}
    export_teacache(enabled(), per_context, paths[CACHED_PACKAGE], shared=shared, metadata=meta)
    export_teacache(plain, per_context, paths[PLAIN_PACKAGE], shared=shared, metadata=meta)
    return paths


RUNNER_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "aoti_runner"  # in a source checkout
RUNNER_NAME = "teacache_aoti_runner"


def build_runner(build_dir: str | os.PathLike, source: str | os.PathLike = RUNNER_SOURCE) -> Path:
    """Configure and build the C++ runner (csrc/aoti_runner) with CMake against this torch's libtorch; returns the
    executable. Incremental: a build directory built before only relinks what changed."""
    import shutil
    import subprocess

    source, build_dir = Path(source), Path(build_dir)
    if not (source / "CMakeLists.txt").is_file():
        raise FileNotFoundError(f"no runner sources at {source}: building the runner needs a source checkout")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise FileNotFoundError("cmake is not on PATH (pip install cmake, or your system's package)")
    configure = [cmake, "-S", str(source), "-B", str(build_dir), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 "-DCMAKE_BUILD_TYPE=Release"]  # fmt: skip
    if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").is_file():
        configure += ["-G", "Ninja"]  # a generator is chosen once per build directory
    for cmd in (configure, [cmake, "--build", str(build_dir)]):
        r = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return build_dir / RUNNER_NAME


def run_runner(
    executable: str | os.PathLike,
    out: str | os.PathLike,
    repeats: int = 5,
    *,
    threads: int | None = None,
    timeout: float = 600,
) -> str:
    """Run the C++ runner on the packages and inputs `export_digits` wrote to `out`; it writes `result.pt` there.
    `threads`: OMP_NUM_THREADS for it (the packages' kernels are OpenMP; None: the environment's). Returns what it
    printed (schedules, speedup)."""
    import subprocess

    out = Path(out)
    cmd = [
        str(executable),
        *(str(out / f) for f in (CACHED_PACKAGE, PLAIN_PACKAGE, INPUTS_FILE, RESULT_FILE)),
        str(repeats),
    ]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads is not None else {})}
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r.stdout


def check_digits(out: str | os.PathLike) -> dict:
    """Compare the C++ runner's result (`result.pt` in `out`) with the Python run (`python.pt`).

    Returns: schedule (the runner's, "C"/"R" per context), schedule_matches, max_abs (images, TeaCache package vs
    Python TeaCache), plain_max_abs (uncached package vs Python uncached: Inductor's rounding alone),
    min_psnr_db (TeaCache package vs Python TeaCache), within_budget (max_abs <= IMAGE_ATOL), speedup and the
    median seconds of both packages as the runner timed them, repeats_identical."""
    import statistics

    from torch.jit._pickle import restore_type_tag

    from . import digits
    from .digits.quality import psnr

    out = Path(out)
    python = torch.load(out / PYTHON_FILE)
    # torch::jit::pickle_save tags a typed C++ dict with its type: allow that one function, keep weights_only.
    with torch.serialization.safe_globals([restore_type_tag]):
        result = torch.load(out / RESULT_FILE)
    images = digits.unpack(result["latents"].float()).clamp(-1, 1)
    plain_images = digits.unpack(result["plain_latents"].float()).clamp(-1, 1)
    max_abs = float((images - python["images"]).abs().max())
    # The runner's median (the mean of the middle two for an even count; torch's median takes the lower one).
    seconds = {k: result[k].tolist() for k in ("cached_seconds", "plain_seconds")}  # host-ok: a result file
    cached_s, plain_s = (statistics.median(v) for v in seconds.values())
    return {
        "schedule": {
            c: "".join("R" if r else "C" for r in row.tolist())  # host-ok: a result file
            for c, row in zip(("cond", "uncond"), result["schedule"])
        },
        "schedule_matches": torch.equal(result["schedule"], python["schedule"]),
        "max_abs": max_abs,
        "plain_max_abs": float((plain_images - python["plain_images"]).abs().max()),
        "min_psnr_db": float(psnr(images, python["images"]).min()),
        "within_budget": max_abs <= IMAGE_ATOL,
        "cached_seconds": cached_s,
        "plain_seconds": plain_s,
        "speedup": plain_s / cached_s,
        "repeats_identical": bool(result["repeats_identical"]),
    }
