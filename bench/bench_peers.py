"""The peers side by side, on the embedded digits model: quality, steps computed, speedup, graph breaks.

    python bench/bench_peers.py            # the full comparison (about 15 minutes on a 2-core CPU)
    python bench/bench_peers.py --quick    # smoke version (about 2 minutes): eager, 2 knob values, 1 repeat
    python bench/bench_peers.py --replot   # redraw peers_pareto.png from the last run in peers.csv
    python bench/bench_peers.py --modes eager --methods teacache-device,fbcache

Methods, each on a fresh copy of `teacache_kernels.digits` (a real diffusers FluxTransformer2DModel,
2 double + 4 single blocks, trained on scikit-learn's 8x8 digits), sampled by `digits.generate`
(30 Euler steps, true CFG at guidance 2.0 with "cond"/"uncond" cache contexts):

  uncached            the model as is (the reference for quality and for speed)
  teacache-device     this package: the decision on the device (fused ops), calibrated coefficients
  teacache-host       the same TeaCache decided on the host as the original does
                      (`enable_teacache(..., reference=True)`: float64 Python state machine, `.item()` per call)
  fbcache             diffusers FirstBlockCache (`FirstBlockCacheConfig(threshold=...)`)
  magcache            diffusers MagCache (`MagCacheConfig(threshold=..., mag_ratios=...)`), ratios from
                      diffusers' own calibration mode (`MagCacheConfig(calibrate=True)`) on this model
  taylorseer          diffusers TaylorSeer (`TaylorSeerCacheConfig(cache_interval=...)`, default targets:
                      every attention module; max_order 1, float32 factors)
  taylorseer-lite     the same with `use_lite_mode=True` (whole blocks skipped, proj_out predicted)
  cache-dit           cache-dit's DBCache (F1B0, separate CFG), if it is installed and runs

Each method runs eagerly and under `torch.compile(transformer)` (default mode, not fullgraph: the
peers break graphs). Per knob value: PSNR / SSIM (teacache_kernels.digits.quality) of the images
against the uncached eager images of the same seeds; transformer calls that ran the blocks (from the
method's own state); wall time of a full generation (10 digits x 2 seeds), median of interleaved
repeats with the uncached model in the same mode, so the speedup is a ratio of times measured side
by side. Dynamo is reset between methods; the compiled uncached model is recompiled next to each
method. Graph breaks: `torch._dynamo.utils.counters["graph_break"]` summed over the method's compiled
session; recompiles: dynamo's "Recompiling function" log records (the recompiles artifact).

Results: a table on stdout; rows appended to bench/results/peers.csv; bench/results/peers.md and
bench/results/peers_pareto.png rewritten from this run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import os
import re
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # cache-dit logs every summary at info level

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import append_csv, hardware, print_table, versions  # noqa: E402

import teacache_kernels as tk  # noqa: E402
from teacache_kernels import digits  # noqa: E402
from teacache_kernels.config import TeaCacheConfig  # noqa: E402
from teacache_kernels.digits import quality  # noqa: E402

LABELS = list(range(10))
_TEMPLATE = []


def fresh_model():
    """A fresh copy of the trained digits transformer (loaded once, deep-copied per method)."""
    import copy

    if not _TEMPLATE:
        _TEMPLATE.append(digits.load_transformer())
    return copy.deepcopy(_TEMPLATE[0])


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# dynamo bookkeeping: graph breaks, graphs, recompiles, recompile-limit hits


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.recompiles = 0
        self.limit_hits = 0
        self.reasons: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "Recompiling function" in msg:
            self.recompiles += 1
            self.reasons.append(msg)
        if "recompile_limit" in msg or "cache_size_limit" in msg:
            self.limit_hits += 1


RECORDER = _Recorder()
RECOMPILE_REASONS: dict[str, list[str]] = {}


def install_dynamo_logging() -> None:
    torch._logging.set_logs(recompiles=True)
    for name in ("torch._dynamo.guards.__recompiles", "torch._dynamo"):
        lg = logging.getLogger(name)
        lg.addHandler(RECORDER)
    # keep the recompile messages off the console (they are counted, and summarised in peers.md)
    rl = logging.getLogger("torch._dynamo.guards.__recompiles")
    rl.propagate = False
    for h in list(rl.handlers):
        if h is not RECORDER:
            rl.removeHandler(h)


def dynamo_snapshot() -> dict:
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "graphs": counters["stats"]["unique_graphs"],
        "recompiles": RECORDER.recompiles,
        "limit_hits": RECORDER.limit_hits,
        "break_reasons": {k: v for k, v in counters["graph_break"].items()},
    }


def dynamo_reset() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    RECORDER.recompiles = RECORDER.limit_hits = 0
    RECORDER.reasons.clear()


# --------------------------------------------------------------------------------------------------
# TeaCache coefficients for the digits model


def teacache_setup(force_flux: bool = False) -> dict:
    """How to enable TeaCache on the digits model: coefficients_file if supported, else explicit list, else flux."""
    info = {"source": "flux (published FLUX.1 set; no calibration file)", "kwargs": {"coefficients": "flux"},
            "recommended": None, "signal": "modulated_input", "coefficients": None}  # fmt: skip
    path = Path(digits.COEFFICIENTS_FILE)
    if force_flux or not path.is_file():
        return info
    data = json.loads(path.read_text())
    entry = data["models"][digits.MODEL_NAME][str(digits.TOKENS)]
    info["coefficients"] = list(entry["coefficients"])
    info["recommended"] = entry.get("recommended_thresh")
    info["signal"] = entry.get("signal", "modulated_input")
    try:  # the coefficients_file keyword (carries the signal and the per-length sets)
        TeaCacheConfig(coefficients_file=path, rel_l1_thresh=0.1, num_inference_steps=digits.NUM_STEPS)
        info["kwargs"] = {"coefficients_file": str(path)}
        info["source"] = f"calibrated, enable_teacache(coefficients_file={path.name!r})"
    except (TypeError, ValueError) as e:
        if info["signal"] != "modulated_input":
            warnings.warn(f"coefficients_file unusable ({e}); the explicit list assumes the default signal")
        info["kwargs"] = {"coefficients": info["coefficients"]}
        info["source"] = f"calibrated, explicit list from {path.name} (coefficients_file unusable: {e})"
    return info


# --------------------------------------------------------------------------------------------------
# The methods. Each installs itself on a fresh model, changes its knob in place (no re-install: a
# re-install would replace hooked forwards and force recompiles that a user sweeping once would not
# pay), counts the calls that ran the blocks, and does what a pipeline does between generations.


class Method:
    name = "?"
    knob = "-"
    needs_reset = False  # diffusers hooks: pipelines call transformer._reset_stateful_cache() after each call

    def __init__(self):
        self.computed = 0
        self.total = 0
        self.unit = "calls"

    def install(self, model, value):
        self.model = model

    def set_knob(self, value):
        pass

    def after_generate(self, count: bool):
        if self.needs_reset:
            self.model._reset_stateful_cache()

    def reset_counts(self):
        self.computed = self.total = 0

    def counts(self):
        return (self.computed, self.total) if self.total else (None, None)


class Uncached(Method):
    name = "uncached"

    def after_generate(self, count):
        if count:
            self.computed += 2 * digits.NUM_STEPS
            self.total += 2 * digits.NUM_STEPS


class TeaCacheMethod(Method):
    knob = "rel_l1_thresh"

    def __init__(self, setup: dict, reference: bool):
        super().__init__()
        self.setup, self.reference = setup, reference
        self.name = "teacache-host" if reference else "teacache-device"

    def install(self, model, value):
        super().install(model, value)
        tk.enable_teacache(model, rel_l1_thresh=value, num_inference_steps=digits.NUM_STEPS,
                           reference=self.reference, **self.setup["kwargs"])  # fmt: skip

    def set_knob(self, value):
        tk.enable_teacache(self.model, rel_l1_thresh=value, reference=self.reference)  # in place, no recompile

    def after_generate(self, count):
        if count:
            s = tk.summary(self.model)
            for c in s.contexts.values():
                self.computed += c.computed_steps
                self.total += len(c.steps)


class FBCache(Method):
    name, knob, needs_reset = "fbcache", "threshold", True

    def install(self, model, value):
        from diffusers.hooks import FirstBlockCacheConfig
        from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

        super().install(model, value)
        model.enable_cache(FirstBlockCacheConfig(threshold=value))
        self.hook = model.transformer_blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
        decide = self.hook._should_compute_remaining_blocks  # already torch.compiler.disable'd: a graph break

        @torch.compiler.disable
        def counted(residual):
            r = decide(residual)
            self.computed += int(r)
            self.total += 1
            return r

        self.hook._should_compute_remaining_blocks = counted

    def set_knob(self, value):
        self.hook.threshold = value


class MagCache(Method):
    name, knob, needs_reset = "magcache", "threshold", True
    ratios: list[float] | None = None
    ratios_note = ""

    @classmethod
    def calibrate(cls, seeds):
        """diffusers' calibration mode: MagCacheConfig(calibrate=True) prints the ratios at each context's end."""
        from diffusers.hooks import MagCacheConfig

        model = fresh_model()
        model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=digits.NUM_STEPS))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            for seed in seeds:
                digits.generate(model, LABELS, seed=seed)
                model._reset_stateful_cache()
        lists = [
            json.loads(m)
            for m in re.findall(r"\[MagCache\] Calibration Complete.*?\n(\[.*?\])", out.getvalue(), re.DOTALL)
        ]
        if not lists or any(len(x) != digits.NUM_STEPS for x in lists):
            raise RuntimeError(f"MagCache calibration printed {len(lists)} lists: {out.getvalue()[:500]}")
        cls.ratios = [statistics.fmean(col) for col in zip(*lists)]
        cls.ratios_lists = lists
        cls.ratios_note = (
            f"diffusers' own calibration mode, `MagCacheConfig(calibrate=True, num_inference_steps={digits.NUM_STEPS})`"
            f" on the uncached model (eager), one generation per seed: the hook prints each CFG context's "
            f"{digits.NUM_STEPS} ratios at the context's last step; the {len(lists)} lists (cond and uncond x "
            f"{len(seeds)} seeds) are averaged per step, since diffusers applies one list to every context: "
            + ", ".join(f"{r:.3f}" for r in cls.ratios)
        )
        return cls.ratios

    def install(self, model, value):
        from diffusers.hooks import MagCacheConfig
        from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

        super().install(model, value)
        self.config = MagCacheConfig(threshold=value, num_inference_steps=digits.NUM_STEPS, mag_ratios=self.ratios)
        model.enable_cache(self.config)
        tail = model.single_transformer_blocks[-1]._diffusers_hook.get_hook(_MAG_CACHE_BLOCK_HOOK)
        advance = tail._advance_step  # runs inside the hook's torch.compiler.disable'd forward

        def counted(state):
            self.computed += int(state.should_compute)
            self.total += 1
            advance(state)

        tail._advance_step = counted

    def set_knob(self, value):
        self.config.threshold = value  # the hooks hold this config object


class TaylorSeer(Method):
    knob, needs_reset = "cache_interval", True

    def __init__(self, lite: bool):
        super().__init__()
        self.lite = lite
        self.name = "taylorseer-lite" if lite else "taylorseer"

    def install(self, model, value):
        from diffusers.hooks import TaylorSeerCacheConfig
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        super().install(model, value)
        model.enable_cache(TaylorSeerCacheConfig(cache_interval=int(value), max_order=1,
                                                 taylor_factors_dtype=torch.float32, use_lite_mode=self.lite))  # fmt: skip
        self.hooks = {n: m._diffusers_hook.get_hook(_TAYLORSEER_CACHE_HOOK) for n, m in model.named_modules()
                      if getattr(m, "_diffusers_hook", None) is not None
                      and m._diffusers_hook.get_hook(_TAYLORSEER_CACHE_HOOK) is not None}  # fmt: skip
        # count on the hooked module that predicts: the last single block's attention (default), proj_out (lite)
        name = "proj_out" if self.lite else f"single_transformer_blocks.{len(model.single_transformer_blocks) - 1}.attn"
        hook = self.hooks[name]
        measure = hook._measure_should_compute

        @torch.compiler.disable
        def counted():
            should, state = measure()
            self.computed += int(should)
            self.total += 1
            return should, state

        hook._measure_should_compute = counted
        self.unit = "calls (last attention computed)" if not self.lite else "calls (blocks computed)"

    def set_knob(self, value):
        for h in self.hooks.values():
            h.cache_interval = int(value)


class CacheDiT(Method):
    name, knob = "cache-dit", "residual_diff_threshold"

    @staticmethod
    def config(value):
        from cache_dit import DBCacheConfig

        # F1B0 (the model has 6 blocks; cache-dit's default Fn=8 would compute them all), library defaults
        # otherwise (max_warmup_steps=8); CFG calls are separate transformer calls, cond first.
        return DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=value,
                             enable_separate_cfg=True, cfg_compute_first=False,
                             num_inference_steps=digits.NUM_STEPS)  # fmt: skip

    def install(self, model, value):
        import cache_dit

        super().install(model, value)
        cache_dit.enable_cache(model, cache_config=self.config(value))

    def set_knob(self, value):
        import cache_dit

        cache_dit.refresh_context(self.model, cache_config=self.config(value))

    def after_generate(self, count):
        if count:
            import cache_dit

            stats = cache_dit.summary(self.model, logging=False)
            stats = stats if isinstance(stats, list) else [stats]
            for s in stats[:1]:
                cached = len(getattr(s, "cached_steps", []) or []) + len(getattr(s, "cfg_cached_steps", []) or [])
                self.computed += 2 * digits.NUM_STEPS - cached
                self.total += 2 * digits.NUM_STEPS


# --------------------------------------------------------------------------------------------------
# generation, timing


def generate(fn, method: Method, seeds, count: bool = False) -> torch.Tensor:
    images = []
    for seed in seeds:
        images.append(digits.generate(fn, LABELS, seed=seed))
        method.after_generate(count)
    return torch.cat(images)


def timed(fn, method, seeds) -> float:
    start = time.perf_counter()
    generate(fn, method, seeds)
    return time.perf_counter() - start


def quality_of(images, reference) -> dict:
    p = quality.psnr(images, reference)
    finite = p[torch.isfinite(p)]
    mean_psnr = float("inf") if len(finite) == 0 else float(p.clamp(max=200).mean())
    return {"psnr": mean_psnr, "ssim": float(quality.ssim(images, reference).mean()),
            "acc": quality.digit_accuracy(images, LABELS * (len(images) // len(LABELS)))}  # fmt: skip


def run_method(method: Method, mode: str, knobs, seeds, repeats, reference, hw, vers, stamp) -> list[dict]:
    """All knob values of one method in one mode; the uncached model of the same mode timed alongside."""
    rows = []
    compiled = mode == "compiled"
    dynamo_reset()
    model = fresh_model()
    method.install(model, knobs[0])
    fn = torch.compile(model) if compiled else model
    t = time.perf_counter()
    generate(fn, method, seeds)  # warm-up (compiles)
    warm = time.perf_counter() - t
    session = dynamo_snapshot() if compiled else None
    log(f"  {method.name} {mode}: installed, warm-up generation {warm:.1f} s"
        + (f" (graphs {session['graphs']}, graph breaks {session['graph_breaks']}, recompiles {session['recompiles']})"
           if compiled else ""))  # fmt: skip

    base_method = Uncached()
    baseline_reasons = (0, 0)
    if isinstance(method, Uncached):
        base_fn = fn
    else:
        base_model = fresh_model()
        base_method.install(base_model, None)
        base_fn = torch.compile(base_model) if compiled else base_model
        r0 = len(RECORDER.reasons)
        generate(base_fn, base_method, seeds)  # warm-up (compiles the baseline next to the method's graphs)
        baseline_reasons = (r0, len(RECORDER.reasons))
    totals = dict(session) if compiled else None
    for value in knobs:
        method.set_knob(value)
        method.reset_counts()
        before = dynamo_snapshot() if compiled else None
        images = generate(fn, method, seeds, count=True)  # quality + counts; also this knob's warm-up
        q = quality_of(images, reference)
        computed, total = method.counts()
        t_m, t_b = [], []
        for _ in range(repeats):  # interleaved: drift on the shared machine hits both alike
            t_b.append(timed(base_fn, base_method, seeds))
            t_m.append(timed(fn, method, seeds))
        ratios = [b / m for b, m in zip(t_b, t_m)]
        speedup = statistics.median(t_b) / statistics.median(t_m)
        row = {
            "method": method.name, "mode": mode, "knob": method.knob,
            "value": "-" if value is None else f"{value:g}",
            "computed": "-" if computed is None else computed, "total": "-" if total is None else total,
            "computed_of": method.unit,
            "wall_s": f"{statistics.median(t_m):.3f}", "uncached_wall_s": f"{statistics.median(t_b):.3f}",
            "speedup": f"{speedup:.2f}",
            "speedup_lo": f"{min(ratios):.2f}", "speedup_hi": f"{max(ratios):.2f}",
            "uncached_spread": f"{(max(t_b) / min(t_b) - 1) * 100:.0f}%",
            "psnr": f"{q['psnr']:.2f}", "ssim": f"{q['ssim']:.4f}", "digit_acc": f"{q['acc']:.2f}",
            "repeats": repeats, "seeds": len(seeds),
        }  # fmt: skip
        if compiled:  # the method's own compilation: its warm-up and every knob value so far, not the baseline's
            after = dynamo_snapshot()
            for k in ("graph_breaks", "graphs", "recompiles"):
                totals[k] += after[k] - before[k]
            row.update({
                "graph_breaks": totals["graph_breaks"], "graphs": totals["graphs"],
                "recompiles_warmup": session["recompiles"],
                "recompiles_after": totals["recompiles"] - session["recompiles"],
                "limit_hits": after["limit_hits"],
            })  # fmt: skip
        else:
            row.update(
                {
                    "graph_breaks": "-",
                    "graphs": "-",
                    "recompiles_warmup": "-",
                    "recompiles_after": "-",
                    "limit_hits": "-",
                }
            )
        row.update({"hardware": hw, **vers, "date": stamp})
        rows.append(row)
        log(f"    {method.knob}={row['value']}: computed {row['computed']}/{row['total']}, "
            f"{row['wall_s']} s vs uncached {row['uncached_wall_s']} s -> {row['speedup']}x "
            f"[{row['speedup_lo']}-{row['speedup_hi']}], PSNR {row['psnr']} dB, SSIM {row['ssim']}")  # fmt: skip
    if compiled:
        final = dynamo_snapshot()
        for r in rows:
            r["break_reasons"] = "; ".join(f"{n}x {k.splitlines()[0][:90]}" for k, n in final["break_reasons"].items())
        a, b = baseline_reasons
        RECOMPILE_REASONS[method.name] = RECORDER.reasons[:a] + RECORDER.reasons[b:]
    return rows


# --------------------------------------------------------------------------------------------------
# report


def pareto(points):
    """Indices of points not dominated in (speedup, psnr), both maximised."""
    front = []
    for i, (s, p) in enumerate(points):
        if not any((s2 >= s and p2 >= p) and (s2 > s or p2 > p) for j, (s2, p2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot(rows, path: Path, cap: float = 60.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("eager", "compiled") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 5), squeeze=False)
    markers = dict(zip(METHOD_ORDER, "*osD^v<>Xp"))
    colors = dict(zip(METHOD_ORDER, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, mode in zip(axes[0], modes):
        mrows = [r for r in rows if r["mode"] == mode]
        pts = [(float(r["speedup"]), min(float(r["psnr"]), cap)) for r in mrows]
        for name in METHOD_ORDER:
            sel = [(s, p) for (s, p), r in zip(pts, mrows) if r["method"] == name]  # in knob order
            if not sel:
                continue
            ax.plot(*zip(*sel), marker=markers.get(name, "o"), color=colors.get(name), label=name,
                    markersize=11 if name == "teacache-device" else 7, alpha=0.9)  # fmt: skip
        front = pareto(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, alpha=0.6, label="Pareto front")
        ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], s=160, facecolors="none",
                   edgecolors="k", linewidths=1.2, zorder=5)  # fmt: skip
        ax.axvline(1.0, color="grey", lw=0.6)
        ax.set_title(f"{mode} (speedup vs the uncached model, {mode})")
        ax.set_xlabel("wall-clock speedup (x)")
        ax.set_ylabel(f"PSNR vs uncached (dB; capped at {cap:g})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Step caches on the digits FLUX transformer: 30 steps, true CFG 2.0, 10 digits x 2 seeds, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


METHOD_ORDER = ["uncached", "teacache-device", "teacache-host", "fbcache", "magcache", "taylorseer",
                "taylorseer-lite", "cache-dit"]  # fmt: skip


def _recompile_summary(method: str) -> str:
    reasons = RECOMPILE_REASONS.get(method) or []
    if not reasons:
        return ""
    firsts = {}
    for msg in reasons:
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        m = re.match(r"Recompiling function (\S+) in (\S+?):(\d+)", lines[0])
        where = f"{m.group(1)} ({Path(m.group(2)).name}:{m.group(3)})" if m else lines[0][:60]
        guard = re.sub(r"^- [\d/]+: ", "", lines[2] if len(lines) > 2 else "").split("  #")[0].strip()[:90]
        key = f"{where}: {guard}"
        firsts[key] = firsts.get(key, 0) + 1
    top = sorted(firsts.items(), key=lambda kv: -kv[1])[:3]
    return " Recompiles (all, by first guard failure): " + "; ".join(f"{n}x `{k}`" for k, n in top) + "."


def write_md(path: Path, rows, meta: dict) -> None:
    cols = ["method", "mode", "knob", "value", "computed", "wall_s", "speedup", "speedup_lo", "speedup_hi",
            "psnr", "ssim", "digit_acc", "graph_breaks", "graphs", "recompiles_warmup", "recompiles_after"]  # fmt: skip
    lines = [
        "# TeaCache-on-device and its peers on the digits model",
        "",
        f"Run {meta['date']} on **{meta['hardware']}**; {meta['versions']}. `python bench/bench_peers.py"
        + (" --quick" if meta["quick"] else "")
        + f"`: {meta['runtime']:.0f} s in all.",
        "",
        (
            f"Model: `teacache_kernels.digits` (FluxTransformer2DModel, 2 double + 4 single blocks, 2.3M parameters, "
            f"16 image tokens), {digits.NUM_STEPS} Euler steps, true CFG {digits.GUIDANCE_SCALE} "
            f'(a "cond" and an "uncond" transformer call per step: {2 * digits.NUM_STEPS} calls per generation), '
            f"10 digits x {meta['seeds']} seeds per timed unit, float32, CPU. Quality: PSNR / SSIM "
            "(`digits.quality`, 3x3 window) of each method's images against the uncached eager images of the same "
            "seeds, mean over the images; `digit_acc`: the SVM digit classifier's accuracy on them. Speedup: median "
            f"of {meta['repeats']} timed generations of the method over the median of the uncached model's, timed "
            "interleaved in the same mode (eager vs eager, compiled vs compiled); `speedup_lo`-`speedup_hi`: the "
            "range of the per-pair ratios. `computed`: transformer calls (of `total`) that ran the blocks, from "
            "the method's own state, summed over the seeds."
        ),
        "",
        f"TeaCache coefficients: {meta['teacache_source']}"
        + (f"; recommended rel_l1_thresh {meta['recommended']:g}" if meta.get("recommended") else "")
        + ".",
        f"MagCache ratios: {meta.get('magcache_note') or '-'}.",
        "",
        (
            "Fixed settings besides the swept knob: TeaCache warmup 1 / cooldown 1 (the original's); MagCache "
            "max_skip_steps 3, retention_ratio 0.2 (defaults); TaylorSeer max_order 1, disable_cache_before_step 3 "
            "(default), float32 factors; taylorseer hooks every attention module (the default targets: `computed` "
            "counts the last attention's computations, the MLPs always run), taylorseer-lite skips whole blocks and "
            "predicts proj_out; FBCache always runs the first block (`computed` counts calls that ran the rest); "
            "cache-dit DBCache Fn=1 Bn=0 (the model has 6 blocks), defaults otherwise (max_warmup_steps 8), "
            "`enable_separate_cfg=True`, no `cache_dit.set_compile_configs()` (every method runs under the same "
            "torch config: recompile_limit 8). Knob changes are made in place on the installed method (no "
            "re-install), so a sweep does not recompile for that reason."
        ),
        "",
    ]
    present = [r for r in rows if "psnr" in r]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" if c in ("method", "mode", "knob") else "---:" for c in cols) + "|")
    for r in present:
        vals = []
        for c in cols:
            v = r.get(c, "-")
            if c == "computed" and r.get("total") not in (None, "-"):
                v = f"{r['computed']}/{r['total']}"
            vals.append(str(v))
        lines.append("| " + " | ".join(vals) + " |")
    lines.append("")
    lines.append(
        "Graph breaks / recompiles under `torch.compile(transformer)` (the warm-up generation and every "
        "knob value's generations; the uncached model compiled beside it is not counted):"
    )
    lines.append("")
    last = {r["method"]: r for r in present if r["mode"] == "compiled"}
    for r in last.values():
        lines.append(f"- **{r['method']}**: {r['graph_breaks']} graph breaks, {r['graphs']} graphs, "
                     f"{r['recompiles_warmup']} recompiles in the warm-up generation; "
                     f"recompile-limit hits {r.get('limit_hits', 0)}. "
                     + (f"Breaks: {r.get('break_reasons')}" if r.get("break_reasons") else "No breaks.")
                     + _recompile_summary(r["method"]))  # fmt: skip
    lines.append("")
    if meta.get("failures"):
        lines.append("## What did not run")
        lines.append("")
        for name, why in meta["failures"].items():
            lines.append(f"- **{name}**: {why}")
        lines.append("")
    if meta.get("reading"):
        lines.append("## Reading")
        lines.append("")
        lines.append(meta["reading"])
        lines.append("")
    lines.append(
        "Plot: `peers_pareto.png` (PSNR vs speedup, eager and compiled panels, Pareto front circled). "
        "Raw rows: `peers.csv`."
    )
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: eager, 2 knob values, 1 seed, 1 repeat")
    p.add_argument("--modes", default=None, help="eager,compiled (default both; --quick: eager)")
    p.add_argument("--methods", default=None, help="comma-separated subset of: " + ",".join(METHOD_ORDER))
    p.add_argument("--repeats", type=int, default=None, help="timed generations per knob value (default 3)")
    p.add_argument(
        "--flux-coefficients", action="store_true", help="use the published FLUX set even if teacache.json exists"
    )
    p.add_argument(
        "--out-dir", default=None, help="where peers.csv/md/png go (default bench/results; --quick: /tmp/peers_quick)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the model is tiny, and 2 threads on the shared 2-core machine "
        "collapse under contention)",
    )
    p.add_argument("--reading", default=None, help="a file whose text becomes the md's 'Reading' section")
    p.add_argument("--replot", action="store_true", help="only redraw peers_pareto.png from the last run in peers.csv")
    args = p.parse_args(argv)

    if args.replot:
        import csv

        out = Path(args.out_dir or _common.RESULTS)
        rows = list(csv.DictReader((out / "peers.csv").open()))
        last = max(r["date"] for r in rows)
        plot([r for r in rows if r["date"] == last], out / "peers_pareto.png")
        print(f"redrew {out / 'peers_pareto.png'} from the run of {last}")
        return 0

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    import diffusers.utils.logging as dlog

    dlog.set_verbosity_error()
    out = Path(args.out_dir or ("/tmp/peers_quick" if args.quick else _common.RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    _common.RESULTS = out
    modes = (args.modes or ("eager" if args.quick else "eager,compiled")).split(",")
    seeds = [0] if args.quick else [0, 1]
    install_dynamo_logging()

    hw = hardware("cpu")
    vers = versions()
    import diffusers

    vers["diffusers"] = diffusers.__version__
    try:
        import importlib.metadata as md

        vers["cache_dit"] = md.version("cache-dit")
    except Exception:  # noqa: BLE001 -- any failure: not installed
        vers["cache_dit"] = "-"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    log(f"peers bench on the digits model -- {hw}; {vers}")

    tc = teacache_setup(args.flux_coefficients)
    rec = tc["recommended"]
    log(f"TeaCache coefficients: {tc['source']}" + (f"; recommended_thresh {rec:g}" if rec else ""))
    base_t = rec if rec else (0.1 if tc["coefficients"] else 0.25)
    tea_knobs = [round(base_t * f, 4) for f in (0.5, 1, 2, 3, 4)]

    knobs = {  # eager values, compiled values (fewer: each compiled method also pays its compilation)
        "uncached": ([None], [None]),
        "teacache-device": (tea_knobs, tea_knobs[:4]),
        "teacache-host": ([tea_knobs[i] for i in (0, 1, 2, 4)], tea_knobs[1:3]),
        "fbcache": ([0.1, 0.15, 0.2, 0.3], [0.15, 0.3]),
        "magcache": ([0.02, 0.06, 0.12, 0.24], [0.06, 0.24]),
        "taylorseer": ([2, 3, 4, 6], [3, 6]),
        "taylorseer-lite": ([2, 3, 4, 6], [3, 6]),
        "cache-dit": ([0.1, 0.2, 0.3, 0.5], [0.2, 0.5]),
    }
    if args.quick:
        knobs = {k: (e[:1] if k == "uncached" else [e[1], e[-1]], c[:1]) for k, (e, c) in knobs.items()}
    chosen = args.methods.split(",") if args.methods else METHOD_ORDER
    unknown = set(chosen) - set(METHOD_ORDER)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}")

    failures = {}
    makers = {
        "uncached": Uncached,
        "teacache-device": lambda: TeaCacheMethod(tc, reference=False),
        "teacache-host": lambda: TeaCacheMethod(tc, reference=True),
        "fbcache": FBCache,
        "magcache": MagCache,
        "taylorseer": lambda: TaylorSeer(lite=False),
        "taylorseer-lite": lambda: TaylorSeer(lite=True),
        "cache-dit": CacheDiT,
    }

    log("reference: uncached eager images")
    ref_model = fresh_model()
    reference = generate(ref_model, Uncached(), seeds)
    if "magcache" in chosen:
        try:
            MagCache.calibrate(seeds)
            log(f"MagCache ratios calibrated ({MagCache.ratios_note}): "
                + ", ".join(f"{r:.3f}" for r in MagCache.ratios))  # fmt: skip
        except Exception as e:  # noqa: BLE001 -- recorded in the report
            failures["magcache"] = f"calibration failed: {type(e).__name__}: {e}"
            chosen = [c for c in chosen if c != "magcache"]

    rows = []
    for mode in modes:
        for name in chosen:
            values = knobs[name][0 if mode == "eager" else 1]
            if not values:
                continue
            repeats = args.repeats or (1 if args.quick else 3)
            log(f"{name} ({mode}): {len(values)} knob value(s)")
            try:
                rows += run_method(makers[name](), mode, values, seeds, repeats, reference, hw, vers, stamp)
            except Exception as e:  # noqa: BLE001 -- a peer failing is a result: recorded, and the bench goes on
                tb = traceback.format_exc(limit=-3)
                why = f"{mode}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                failures[f"{name} ({mode})"] = why
                log(f"  FAILED {why}\n{tb}")
            finally:
                dynamo_reset()

    runtime = time.perf_counter() - T0
    print()
    if rows:
        print_table(rows, ["method", "mode", "value", "computed", "total", "wall_s", "uncached_wall_s", "speedup",
                           "speedup_lo", "speedup_hi", "psnr", "ssim", "graph_breaks", "graphs",
                           "recompiles_warmup", "recompiles_after"])  # fmt: skip
        csv_rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        keys = list(dict.fromkeys(k for r in csv_rows for k in r))
        csv_rows = [{k: r.get(k, "") for k in keys} for r in csv_rows]
        print(f"appended to {append_csv('peers', csv_rows)}")
        plot(rows, out / "peers_pareto.png")
    reading = Path(args.reading).read_text().strip() if args.reading else None
    meta = {"date": stamp, "hardware": hw, "versions": ", ".join(f"{k} {v}" for k, v in vers.items()),
            "quick": args.quick, "runtime": runtime, "seeds": len(seeds),
            "repeats": args.repeats or (1 if args.quick else 3),
            "teacache_source": tc["source"], "recommended": rec, "magcache_note": MagCache.ratios_note,
            "failures": failures, "reading": reading}  # fmt: skip
    write_md(out / "peers.md", rows, meta)
    (out / "peers_meta.json").write_text(json.dumps({
        "magcache_ratios": MagCache.ratios, "magcache_lists": getattr(MagCache, "ratios_lists", None),
        "teacache": {k: v for k, v in tc.items() if k != "kwargs"}, "failures": failures, "runtime_s": runtime,
        "recompile_reasons": RECOMPILE_REASONS,
    }, indent=1, default=str)) if args.quick or args.out_dir else None  # fmt: skip
    log(f"done in {runtime:.0f} s; {out / 'peers.md'}, {out / 'peers_pareto.png'}")
    for k, v in failures.items():
        log(f"FAILED {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
