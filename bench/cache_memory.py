"""The TeaCache state's device memory per CFG context, per family, at each model's typical resolution.

    python bench/cache_memory.py          # table on stdout, bench/results/cache_memory.md rewritten

No model is loaded and nothing is allocated: the package's own `ContextState.allocate_layout` builds the
state on the meta device for the layout a real call has (signal shape, cached stream shapes, bf16), and
`memory_bytes` sums its buffers, exactly as `summary()` reports them on a real run. The shapes follow from
each model's published config (hidden size, patch sizes, VAE compression) and the resolution named; they are
written out below so they can be checked. The residuals dominate; a whole-sequence signal (the modulated
input of FLUX, HunyuanVideo, Mochi, LTX...) costs as much again, a timestep-embedding signal (Wan,
CogVideoX, HiDream-Full) next to nothing. A context's state is allocated on its first call and reused for
the rest of the process (tests/test_memory.py checks no buffer moves across steps and generations).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from teacache_kernels import state as S
from teacache_kernels.config import ResolvedConfig, TeaCacheConfig

RESULTS = Path(__file__).resolve().parent / "results" / "cache_memory.md"


@dataclass(frozen=True)
class Case:
    family: str
    model: str
    resolution: str
    tokens: str  # how the token count follows from the resolution
    signal: tuple[int, ...]  # what the span compares, (batch, ...)
    streams: tuple[tuple[int, ...], ...]  # the cached streams
    coefficients: str
    steps: int
    contexts: str = "2"  # states a generation holds: one per CFG context (1 where cond and uncond are batched)


def video_tokens(frames: int, height: int, width: int, t: int, s: int, pt: int = 1, ps: int = 2) -> int:
    """Latent tokens of a video: VAE compression t (time, first frame kept) and s (space), patch pt x ps x ps."""
    return ((frames - 1) // t + 1) // pt * (height // s // ps) * (width // s // ps)


FLUX_T = (1024 // 16) ** 2  # 8x VAE, 2x2 patches
QWEN_T = (1328 // 16) ** 2
LUMINA_T = (1024 // 16) ** 2 + 256  # image tokens + the Gemma prompt (up to 256 tokens)
COG_T = video_tokens(49, 480, 720, 4, 8)  # 13 x 30 x 45
MOCHI_T = video_tokens(163, 480, 848, 6, 8)  # 28 x 30 x 53
HY_T = video_tokens(129, 720, 1280, 4, 8)  # 33 x 45 x 80
WAN14_T = video_tokens(81, 720, 1280, 4, 8)  # 21 x 45 x 80
WAN13_T = video_tokens(81, 480, 832, 4, 8)  # 21 x 30 x 52
LTX_T = video_tokens(161, 512, 768, 8, 32, ps=1)  # 21 x 16 x 24
HIDREAM_T = (1024 // 16) ** 2
COSMOS_T = video_tokens(121, 704, 1280, 8, 8)  # 16 x 44 x 80

CASES = [
    Case("flux", "FLUX.1-dev", "1024x1024", f"{FLUX_T} image tokens x 3072", (1, FLUX_T, 3072), ((1, FLUX_T, 3072),), "flux", 28, "1"),
    Case("qwen-image", "Qwen-Image", "1328x1328", f"{QWEN_T} image + 256 text tokens x 3072", (1, QWEN_T, 3072),
         ((1, QWEN_T, 3072), (1, 256, 3072)), "qwen-image", 50),  # fmt: skip
    Case("lumina2", "Lumina-Image-2.0", "1024x1024", f"{LUMINA_T} joint tokens x 2304", (1, LUMINA_T, 2304),
         ((1, LUMINA_T, 2304),), "lumina2", 50),  # fmt: skip
    Case("cogvideox", "CogVideoX-5b (CFG batched)", "720x480, 49 frames", f"{COG_T} video + 226 text tokens x 3072",
         (2, 512), ((2, COG_T, 3072), (2, 226, 3072)), "cogvideox-5b", 50, "1"),  # fmt: skip
    Case("mochi", "Mochi-1-preview (CFG batched)", "848x480, 163 frames", f"{MOCHI_T} tokens x 3072", (2, MOCHI_T, 3072),
         ((2, MOCHI_T, 3072),), "mochi", 64, "1"),  # fmt: skip
    Case("hunyuan-video", "HunyuanVideo", "1280x720, 129 frames", f"{HY_T} tokens x 3072", (1, HY_T, 3072),
         ((1, HY_T, 3072),), "hunyuan-video", 50, "1 (2 with true CFG)"),  # fmt: skip
    Case("wan", "Wan2.1-T2V-14B", "1280x720, 81 frames", f"{WAN14_T} tokens x 5120", (1, 5120), ((1, WAN14_T, 5120),),
         "wan2.1-t2v-14b", 50),  # fmt: skip
    Case("wan", "Wan2.1-T2V-1.3B", "832x480, 81 frames", f"{WAN13_T} tokens x 1536", (1, 1536), ((1, WAN13_T, 1536),),
         "wan2.1-t2v-1.3b", 50),  # fmt: skip
    Case("ltx-video", "LTX-Video 0.9.1 (CFG batched)", "768x512, 161 frames", f"{LTX_T} tokens x 2048", (2, LTX_T, 2048),
         ((2, LTX_T, 2048),), "ltx-video", 50, "1"),  # fmt: skip
    Case("hidream", "HiDream-I1-Full (CFG batched)", "1024x1024", f"{HIDREAM_T} image tokens x 2560", (2, 2560),
         ((2, HIDREAM_T, 2560),), "hidream-full", 50, "1"),  # fmt: skip
    Case("cosmos", "Cosmos-1.0-Diffusion-7B", "1280x704, 121 frames", f"{COSMOS_T} tokens x 4096", (1, COSMOS_T, 4096),
         ((1, COSMOS_T, 4096),), "cosmos-7b", 35),  # fmt: skip
]


def context_bytes(case: Case, dtype=torch.bfloat16) -> int:
    config = ResolvedConfig.resolve(TeaCacheConfig(num_inference_steps=case.steps), case.coefficients)
    layout = (case.signal, dtype, case.streams, (dtype,) * len(case.streams), torch.device("meta"))
    st = S.ContextState(case.family)
    st.allocate_layout(layout, config)
    return st.memory_bytes


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    rows = ["| family | model | resolution | tokens | signal | per context (bf16) | contexts |", "|---|---|---|---|---|---|---|"]
    for case in CASES:
        rows.append(f"| {case.family} | {case.model} | {case.resolution} | {case.tokens} | {tuple(case.signal)} | "
                    f"{gib(context_bytes(case))} | {case.contexts} |")  # fmt: skip
    table = "\n".join(rows)
    print(table)
    if not args.no_write:
        RESULTS.write_text(
            "# TeaCache state per CFG context (written by bench/cache_memory.py)\n\n"
            "bf16 residual(s) + previous signal + scalars/log (about 40 KiB), from `ContextState.allocate_layout` on the\n"
            "meta device; `summary()` reports the same figure per context on a real run. FLUX.1-dev is guidance-distilled\n"
            "(one context); the batched pipelines run cond and uncond in one call and one context; the others (true CFG)\n"
            "hold one state per context.\n\n" + table + "\n"
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
