"""Independent ports of the original TeaCache implementations, for tests/test_fidelity.py.

One module per original, each installable on the tiny diffusers pipelines of `teacache_kernels.tiny_families`
and `teacache_kernels.tiny_models`:

  flux.py        ali-vilab/TeaCache  TeaCache4FLUX/teacache_flux.py
  qwen_image.py  vllm-project/vllm-omni  vllm_omni/diffusion/cache/teacache/{hook,extractors,state}.py
  lumina2.py     ali-vilab/TeaCache  TeaCache4Lumina2/teacache_lumina2.py
  cogvideox.py   ali-vilab/TeaCache  TeaCache4CogVideoX1.5/teacache_sample_video.py
  mochi.py       ali-vilab/TeaCache  TeaCache4Mochi/teacache_mochi.py
  hunyuan_video.py  ali-vilab/TeaCache  TeaCache4HunyuanVideo/teacache_sample_video.py
  ltx_video.py   ali-vilab/TeaCache  TeaCache4LTX-Video/teacache_ltx.py
  wan.py         ali-vilab/TeaCache  TeaCache4Wan2.1/teacache_generate.py
  cosmos.py      ali-vilab/TeaCache  TeaCache4Cosmos/teacache_sample_video_t2v.py (tests/test_cosmos.py: a loop)
  hidream.py     ali-vilab/TeaCache  TeaCache4HiDream-I1/teacache_hidream_i1.py; welltop-cn/ComfyUI-TeaCache nodes.py (Dev, Fast; at 91dff8e)

(ali-vilab/TeaCache read at 7c10efc, vllm-omni at be81443c.) Each port is the original's patched transformer
forward (vLLM-Omni: its hook's `new_forward` with the Qwen extractor), transcribed against the forward of
diffusers 0.42.1 (what this venv runs), with the original's TeaCache code kept as written: its signal, its
distance (`(m - m_prev).abs().mean() / m_prev.abs().mean()` in the model's dtype, then `.cpu().item()`),
`np.poly1d` rescale in float64, its accumulator, resets, counters, forced calls, CFG handling and residual
streams. Nothing here imports `teacache_kernels`' cache code: the ports are the yardstick it is measured by.

Departures from the original scripts that cannot change a decision or a value, common to all ports:
  - state lives on the transformer *instance* (the scripts set class attributes, which the first write
    through `self` shadows anyway), so two pipelines in one test do not share it;
  - the LoRA-scale and gradient-checkpointing branches are left out (the tests run no LoRA, under no_grad);
  - every call appends a `Call` record: what the original decided, and the numbers it decided on.
Precision: the tiny models run in float32, so the distances here are float32 means, as the originals
compute them on an fp32 model. The published runs were bf16 (FLUX fp16), where those means are rounded to
bf16 before `.item()`.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Call:
    """One transformer call as the original saw it."""

    key: str  # the state that decided: the original's branch / cache key
    cnt: int | None  # the original's step counter as this call read it (None: the original has none per call)
    x: float  # the relative L1 distance the original computed; NaN when it computed none (forced call)
    y: float  # what it added to the accumulator (poly(x), or |poly(x)|); NaN when nothing
    candidate: float  # the accumulator it compared with the threshold; NaN on a forced call
    acc: float  # the accumulator after the call
    forced: bool  # computed without comparing (first / last call, no previous signal or residual)
    computed: bool  # the blocks ran (False: the cached residual was applied)


@dataclass
class Recorder:
    """The per-call records of a port, in call order."""

    calls: list[Call] = field(default_factory=list)

    def record(self, key, cnt, x, y, candidate, acc, forced, computed) -> None:
        f = lambda v: math.nan if v is None else float(v)  # noqa: E731
        self.calls.append(Call(str(key), cnt, f(x), f(y), f(candidate), f(acc), bool(forced), bool(computed)))

    def clear(self) -> None:
        self.calls = []

    def keys(self) -> list[str]:
        return list(dict.fromkeys(c.key for c in self.calls))

    def schedules(self, rename=None) -> dict[str, str]:
        """Per key, one letter per call: C computed, R reused (the package's summary notation)."""
        out: dict[str, str] = {}
        for c in self.calls:
            key = rename(c.key) if rename is not None else c.key
            out[key] = out.get(key, "") + ("C" if c.computed else "R")
        return out

    def computed(self) -> int:
        return sum(c.computed for c in self.calls)


def bind_forward(transformer, forward) -> None:
    """Patch `forward` onto this transformer instance (the scripts assign it to the class)."""
    transformer.forward = types.MethodType(forward, transformer)
