"""What each rank runs in tests/test_parallel.py: real torch.distributed (gloo on loopback), real diffusers parallelism.

`spawn(scenario, ...)` starts WORLD processes, each running `scenario(rank, **kwargs)` after init_process_group, and
returns their results (anything torch.save can hold) in rank order; it gives up after `timeout` seconds, killing the
processes, so a hang fails the test instead of holding CI.

diffusers builds its device mesh on `torch.accelerator`'s device type ("cpu" here) and picks the device
`rank % torch.accelerator.device_count()`, which is 0 on a CPU build: reporting one device lets it run on CPU.
Ulysses attention runs on CPU with the native backend; Ring attention needs a backend that returns the log-sum-exp
(flash, sage, cuDNN: GPU only), so Ring is not run here (the decision's sum is the same code for both: parallel.py).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, scenario, kwargs: dict, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "inductor"))
    torch.accelerator.device_count = lambda: 1  # see the module docstring
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {"ok": scenario(rank, **kwargs)}
    except Exception as e:  # noqa: BLE001 (reported to the test, which decides)
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def spawn(scenario, timeout: float = 240.0, **kwargs) -> list[dict]:
    """Run `scenario(rank, **kwargs)` on WORLD gloo ranks; [{"ok": result} or {"error": ..., "traceback": ...}] by rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        context = mp.start_processes(
            _entry, args=(scenario, kwargs, _free_port(), out), nprocs=WORLD, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                for p in context.processes:
                    p.kill()
                raise TimeoutError(f"{scenario.__name__} did not finish in {timeout:.0f} s on {WORLD} ranks (a hang?)")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# -- scenarios: each returns plain tensors and dicts ------------------------------------------------------------

FLUX_STEPS = 8
THRESH = 0.6


def flux_shape():
    from teacache_kernels.tiny_models import TinyFluxShape

    return TinyFluxShape()  # 2 heads, 64 image + 8 text tokens: both split evenly over 2 ranks


def flux_data():
    from teacache_kernels.tiny_models import flux_inputs

    latents, cond = flux_inputs(flux_shape())
    _, negative = flux_inputs(flux_shape(), seed=7)
    return latents, cond, negative


def flux_generate(model, generations: int = 2) -> tuple[torch.Tensor, list[dict]]:
    """`generations` CFG generations of FLUX_STEPS steps: (last latents, [schedules per context] per generation)."""
    import teacache_kernels as tk
    from teacache_kernels.tiny_models import flow_matching_loop

    latents, cond, negative = flux_data()
    schedules = []
    for _ in range(generations):
        out = flow_matching_loop(model, latents, cond, FLUX_STEPS, negative=negative, cfg_scale=3.0)
        schedules.append({name: c.schedule for name, c in tk.summary(model).contexts.items()})
    return out, schedules


def states(model) -> dict[str, torch.Tensor]:
    """Every context's scalars and log, for a bit-for-bit comparison across ranks."""
    cache = model._teacache.cache
    return {f"{st.name}.{what}": getattr(st, what).clone() for st in cache._states() if st.allocated for what in ("scalars", "log")}


def context_parallel_flux(rank: int, *, compiled: bool = False) -> dict:
    """Tiny FLUX split over the ranks by diffusers' Ulysses attention. The fused model gets parallelism after TeaCache
    (found through the shadowed `enable_parallelism`); the eager oracle's model before it (found when enabling)."""
    from diffusers import ContextParallelConfig

    import teacache_kernels as tk
    from teacache_kernels.tiny_models import tiny_flux_transformer

    cp = lambda: ContextParallelConfig(ulysses_degree=WORLD)  # noqa: E731
    model = tiny_flux_transformer(flux_shape())
    tk.enable_teacache(model, num_inference_steps=FLUX_STEPS, rel_l1_thresh=THRESH)
    model.enable_parallelism(config=cp())
    group = model._teacache.cache.group
    graphs = None
    if compiled:
        from torch._dynamo.utils import counters

        counters.clear()
        run = torch.compile(model, fullgraph=True)
        flux_generate(run, 1)  # warm-up: both branches, both contexts
        with torch._dynamo.config.patch(error_on_recompile=True):
            out, schedules = flux_generate(run, 2)
        graphs = counters["stats"]["unique_graphs"]
        return {"out": out, "schedules": schedules, "states": states(model), "graphs": graphs}

    out, schedules = flux_generate(model)
    oracle = tiny_flux_transformer(flux_shape())
    oracle.enable_parallelism(config=cp())
    tk.enable_teacache(oracle, num_inference_steps=FLUX_STEPS, rel_l1_thresh=THRESH, reference=True)
    oracle_out, oracle_schedules = flux_generate(oracle)
    return {"out": out, "schedules": schedules, "states": states(model), "oracle_out": oracle_out,
            "oracle_schedules": oracle_schedules, "group_size": None if group is None else torch.distributed.get_world_size(group),
            "oracle_group_size": torch.distributed.get_world_size(oracle._teacache.cache.group),
            "summary": str(tk.summary(model)), "ranks": tk.summary(model).ranks}  # fmt: skip


QWEN_STEPS = 8
QWEN_THRESH = 0.8


def qwen_model():
    from teacache_kernels.tiny_families import qwen_image_transformer

    return qwen_image_transformer(num_attention_heads=4)  # heads and tokens divisible by 2 ranks (Ulysses)


def qwen_generate(model) -> tuple[torch.Tensor, dict]:
    """A hand-written CFG Euler loop over the Qwen-Image transformer (both streams cached)."""
    import teacache_kernels as tk
    from teacache_kernels.tiny_families.common import _mask, _randn

    x = _randn(1, 16, 16, seed=1)
    branches = {
        "cond": dict(encoder_hidden_states=_randn(1, 8, 16, seed=2), encoder_hidden_states_mask=_mask(8, 8)),
        "uncond": dict(encoder_hidden_states=_randn(1, 8, 16, seed=3), encoder_hidden_states_mask=_mask(8, 8)),
    }
    ts = torch.linspace(1.0, 0.0, QWEN_STEPS + 1)
    for i in range(QWEN_STEPS):
        v = {}
        for name, text in branches.items():
            with model.cache_context(name):
                v[name] = model(hidden_states=x, timestep=ts[i : i + 1], img_shapes=[[(1, 4, 4)]], return_dict=False, **text)[0]
        x = x + (ts[i + 1] - ts[i]) * (v["uncond"] + 4.0 * (v["cond"] - v["uncond"]))
    return x, {name: c.schedule for name, c in tk.summary(model).contexts.items()}


def context_parallel_qwen(rank: int) -> dict:
    """Qwen-Image (two cached streams; its plan splits block 0's inputs, inside the span: parallel.py moves it),
    parallelism enabled before TeaCache."""
    from diffusers import ContextParallelConfig

    import teacache_kernels as tk

    model = qwen_model()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    tk.enable_teacache(model, num_inference_steps=QWEN_STEPS, rel_l1_thresh=QWEN_THRESH)
    out, schedule = qwen_generate(model)
    moved = model._teacache.span.input_split is not None
    tk.disable_teacache(model)
    hooks_back = list(model.transformer_blocks[0]._diffusers_hook.hooks)
    plain, _ = qwen_generate_plain(model)
    return {"out": out, "schedule": schedule, "states": {}, "moved": moved, "hooks_after_disable": hooks_back, "plain": plain}


def qwen_generate_plain(model):
    """The same loop without TeaCache (a model without `_teacache` has no summary)."""
    from teacache_kernels.tiny_families.common import _mask, _randn

    x = _randn(1, 16, 16, seed=1)
    texts = [dict(encoder_hidden_states=_randn(1, 8, 16, seed=s), encoder_hidden_states_mask=_mask(8, 8)) for s in (2, 3)]
    ts = torch.linspace(1.0, 0.0, QWEN_STEPS + 1)
    for i in range(QWEN_STEPS):
        c, u = (model(hidden_states=x, timestep=ts[i : i + 1], img_shapes=[[(1, 4, 4)]], return_dict=False, **t)[0] for t in texts)
        x = x + (ts[i + 1] - ts[i]) * (u + 4.0 * (c - u))
    return x, None


def tensor_parallel_flux(rank: int) -> dict:
    """Tiny FLUX with diffusers' tensor parallelism (`_tp_plan`: weights sharded, activations replicated)."""
    from diffusers import TensorParallelConfig

    import teacache_kernels as tk
    from teacache_kernels.tiny_models import tiny_flux_transformer

    import diffusers.hooks.tensor_parallel as diffusers_tp

    # diffusers refuses a CPU mesh by name only (its list of device types); torch's DTensor tensor parallelism
    # (parallelize_module, Colwise/RowwiseParallel) runs on CPU with gloo, so the real plan runs here.
    diffusers_tp._SUPPORTED_TP_DEVICES = (*diffusers_tp._SUPPORTED_TP_DEVICES, "cpu")
    model = tiny_flux_transformer(flux_shape())
    model.enable_parallelism(config=TensorParallelConfig(tp_degree=WORLD))
    tk.enable_teacache(model, num_inference_steps=FLUX_STEPS, rel_l1_thresh=THRESH)
    out, schedules = flux_generate(model)
    group = model._teacache.cache.group
    return {"out": out, "schedules": schedules, "states": states(model), "group": group}


def cfg_parallel_flux(rank: int) -> dict:
    """CFG parallelism as xDiT does it: rank 0 runs the cond branch, rank 1 the uncond one, each in its own context;
    the two velocities are exchanged (all_gather) and mixed on both."""
    import torch.distributed as dist

    import teacache_kernels as tk
    from teacache_kernels.tiny_models import tiny_flux_transformer

    model = tiny_flux_transformer(flux_shape())
    tk.enable_teacache(model, num_inference_steps=FLUX_STEPS, rel_l1_thresh=THRESH)
    latents, cond, negative = flux_data()
    name, mine = ("cond", cond) if rank == 0 else ("uncond", negative)
    schedules = []
    for _ in range(2):
        x = latents.clone()
        ts = torch.linspace(1.0, 0.0, FLUX_STEPS + 1)
        for i in range(FLUX_STEPS):
            with model.cache_context(name):
                v = model(hidden_states=x, timestep=ts[i : i + 1], return_dict=False, **mine)[0]
            both = [torch.empty_like(v) for _ in range(2)]
            dist.all_gather(both, v.contiguous())
            x = x + (ts[i + 1] - ts[i]) * (both[1] + 3.0 * (both[0] - both[1]))
        schedules.append({n: c.schedule for n, c in tk.summary(model).contexts.items()})
    return {"out": x, "schedules": schedules, "group": model._teacache.cache.group}


def disagreeing_ranks(rank: int) -> dict:
    """Ranks that enable with different thresholds, then run different step counts: an error on each, not a hang."""
    from diffusers import ContextParallelConfig

    import teacache_kernels as tk
    from teacache_kernels.tiny_models import tiny_flux_transformer

    model = tiny_flux_transformer(flux_shape())
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    errors = {}
    try:
        tk.enable_teacache(model, num_inference_steps=FLUX_STEPS, rel_l1_thresh=THRESH + 0.1 * rank)
    except ValueError as e:
        errors["threshold"] = str(e)
    tk.enable_teacache(model, num_inference_steps=FLUX_STEPS, rel_l1_thresh=THRESH)  # agreeing now
    try:
        tk.reset_teacache(model, FLUX_STEPS + rank)
    except ValueError as e:
        errors["steps"] = str(e)
    return errors
