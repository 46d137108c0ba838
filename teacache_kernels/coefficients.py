"""The published TeaCache rescale polynomials, with where each came from.

A polynomial maps `x`, the relative L1 distance between the signals of two consecutive forward calls,
to an estimate of how much the model output changed. Coefficients are highest power first, as
`numpy.poly1d` takes them. Sources: the TeaCache authors' per-model scripts (ali-vilab/TeaCache,
`TeaCache4*/`), ComfyUI-TeaCache, vllm-omni, EasyAnimate; see `../shared/reference/coefficients.md`.

`default_thresh` is the threshold this package uses when the caller gives none: the published value
closest to a ~1.8x speedup at good quality, or the port's stated default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# The fused kernel evaluates polynomials of degree < MAX_COEFFICIENTS (Horner, padded with leading zeros).
MAX_COEFFICIENTS = 8


@dataclass(frozen=True)
class CoefficientSet:
    name: str
    coefficients: tuple[float, ...]
    model: str  # the model (and diffusers class, where one exists) it was fitted on
    signal: str  # the tensor the original compares between calls
    default_thresh: float
    speedups: str  # published threshold -> speedup pairs
    source: str
    # How the implementation the set comes from accumulates (both off in the authors' scripts):
    abs_rescaled: bool = False  # add |poly(x)| instead of poly(x)
    denominator_eps: float = 0.0  # x = mean|m - m_prev| / (mean|m_prev| + eps)
    # What the set was fitted on and which calls its implementation forces, where that is not the family's
    # default signal and "first and last call" (a user's explicit warmup_steps / cooldown_steps win):
    runtime_signal: str | None = None  # the family signal name (ModelFamily.signals) to compare; None: the family's
    warmup_steps: int = 1  # the first calls of a generation always compute
    cooldown_steps: int = 1  # the last calls of a generation always compute
    warmup_fraction: float | None = None  # instead of warmup_steps: calls with index < fraction * steps compute


_AUTHORS = "ali-vilab/TeaCache"

PUBLISHED: dict[str, CoefficientSet] = {
    s.name: s
    for s in (
        CoefficientSet(
            "flux",
            (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
            "FLUX.1-dev / schnell, TangoFlux (FluxTransformer2DModel)",
            "transformer_blocks[0].norm1(hidden_states, emb=temb)[0]",
            0.4,
            "0.25->1.5x, 0.4->1.8x, 0.6->2.0x, 0.8->2.25x (A800, 28 steps)",
            f"{_AUTHORS} TeaCache4FLUX",
        ),
        CoefficientSet(
            "flux-kontext",
            (-1.04655119e03, 3.12563399e02, -1.69500694e01, 4.10995971e-01, 3.74537863e-02),
            "FLUX.1-Kontext (FluxTransformer2DModel)",
            "as flux",
            0.22,
            "0.22 with start 20% / end 90% -> ~2x",
            f"{_AUTHORS} TeaCache4FLUX-Kontext",
        ),
        CoefficientSet(
            "hunyuan-video",
            (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02),
            "HunyuanVideo (HunyuanVideoTransformer3DModel)",
            "image-stream modulated input of block 0",
            0.15,
            "0.1->1.6x, 0.15->2.1x",
            f"{_AUTHORS} TeaCache4HunyuanVideo",
        ),
        CoefficientSet(
            "ltx-video",
            (2.14700694e01, -1.28016453e01, 2.31279151e00, 7.92487521e-01, 9.69274326e-03),
            "LTX-Video 0.9.1 (LTXVideoTransformer3DModel)",
            "block 0: norm1(h) * (1 + scale_msa) + shift_msa",
            0.05,
            "0.03->1.6x, 0.05->2.1x",
            f"{_AUTHORS} TeaCache4LTX-Video",
        ),
        CoefficientSet(
            "mochi",
            (-3.51241319e03, 8.11675948e02, -6.09400215e01, 2.42429681e00, 3.05291719e-03),
            "Mochi-1-preview (MochiTransformer3DModel)",
            "transformer_blocks[0].norm1(hidden_states, temb)[0]",
            0.06,
            "0.06->1.5x, 0.09->2.1x (64 steps)",
            f"{_AUTHORS} TeaCache4Mochi",
        ),
        CoefficientSet(
            "lumina-next",
            (393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344),
            "Lumina-Next (LuminaNextDiT2DModel)",
            "layers[0].norm1(hidden_states, temb)[0]",
            0.3,
            "0.2->1.5x, 0.3->1.9x, 0.4->2.4x, 0.5->2.8x",
            f"{_AUTHORS} TeaCache4Lumina-T2X",
        ),
        CoefficientSet(
            "lumina2",
            (393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344),
            "Lumina-Image-2.0 v1 (Lumina2Transformer2DModel)",
            "layers[0].norm1(joint text+image tokens, temb)[0]",
            0.3,
            "0.2/0.3/0.4/0.5 -> 1.25x/1.56x/2.08x/2.5x (4090, 50 steps)",
            f"{_AUTHORS} TeaCache4Lumina2",
        ),
        CoefficientSet(
            "lumina2-v2",
            (225.7042019806413, -608.8453716535591, 304.1869942338369, 124.21267720116742, -1.4089066892956552),
            "Lumina-Image-2.0 v2, tuned on LPIPS, not fitted (Lumina2Transformer2DModel)",
            "as lumina2",
            0.3,
            "0.2->1.5x, 0.3->1.6x, 0.5->1.8x, 1.1->2.1x",
            f"{_AUTHORS} TeaCache4Lumina2",
        ),
        CoefficientSet(
            "hidream-full",
            (-3.13605009e04, -7.12425503e02, 4.91363285e01, 8.26515490e00, 1.08053901e-01),
            "HiDream-I1-Full (HiDreamImageTransformer2DModel)",
            "t_embedder output (timestep embedding)",
            0.3,
            "0.17->1.5x, 0.25->1.7x, 0.3->2x, 0.45->2.6x",
            f"{_AUTHORS} TeaCache4HiDream-I1",
            runtime_signal="timestep_embedding", warmup_fraction=0.1, cooldown_steps=0,
        ),
        CoefficientSet(
            "hidream-dev",
            (1.39997273, -4.30130469, 5.01534416, -2.20504164, 0.93942874),
            "HiDream-I1-Dev",
            "embedded image tokens",
            1.0,
            "1.0 -> ~2x",
            "ComfyUI-TeaCache",
            runtime_signal="image_tokens", cooldown_steps=0,
        ),
        CoefficientSet(
            "hidream-fast",
            (2.26509623, -6.88864563, 7.61123826, -3.10849353, 0.99927602),
            "HiDream-I1-Fast",
            "embedded image tokens",
            1.5,
            "1.5 -> ~1.7x",
            "ComfyUI-TeaCache",
            runtime_signal="image_tokens", cooldown_steps=0,
        ),
        CoefficientSet(
            "cogvideox-2b",
            (-3.10658903e01, 2.54732368e01, -5.92380459e00, 1.75769064e00, -3.61568434e-03),
            "CogVideoX-2b (CogVideoXTransformer3DModel)",
            "timestep embedding emb (the temb the blocks receive)",
            0.2,
            "0.1 / 0.2",
            f"{_AUTHORS} TeaCache4CogVideoX1.5",
        ),
        CoefficientSet(
            "cogvideox-5b",
            (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02),
            "CogVideoX-5b, 5b-I2V, ConsisID (CogVideoXTransformer3DModel)",
            "timestep embedding emb",
            0.15,
            "ConsisID 0.1->1.6x, 0.15->2.1x, 0.2->2.5x",
            f"{_AUTHORS} TeaCache4CogVideoX1.5, TeaCache4ConsisID",
        ),
        CoefficientSet(
            "cogvideox1.5-5b",
            (2.50210439e02, -1.65061612e02, 3.57804877e01, -7.81551492e-01, 3.58559703e-02),
            "CogVideoX1.5-5B (CogVideoXTransformer3DModel)",
            "timestep embedding emb (+ofs)",
            0.2,
            "0.1->1.3x, 0.2->1.8x, 0.3->2.1x",
            f"{_AUTHORS} TeaCache4CogVideoX1.5",
        ),
        CoefficientSet(
            # One public port mistyped the linear term as -3.06001e-01; this is the original.
            "cogvideox1.5-5b-i2v",
            (1.22842302e02, -1.04088754e02, 2.62981677e01, -3.06009921e-01, 3.71213220e-02),
            "CogVideoX1.5-5B-I2V (CogVideoXTransformer3DModel)",
            "timestep embedding emb (+ofs)",
            0.2,
            "0.1->1.5x, 0.2->2.2x, 0.3->2.7x",
            f"{_AUTHORS} TeaCache4CogVideoX1.5",
        ),
        CoefficientSet(
            "cosmos-7b",
            (2.71156237e02, -9.19775607e01, 2.24437250e00, 2.08355751e00, 1.41776330e-01),
            "Cosmos 7B",
            "block-0 adaLN-modulated x",
            0.3,
            "0.3->1.4x, 0.4->2.0x",
            f"{_AUTHORS} TeaCache4Cosmos",
        ),
        CoefficientSet(
            "wan2.1-t2v-1.3b",
            (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
            "Wan2.1 t2v-1.3B (WanTransformer3DModel)",
            "e: time embedding before time_projection",
            0.07,
            "0.05/0.07/0.08 -> ~1.5/1.6/2.0x",
            f"{_AUTHORS} TeaCache4Wan2.1",
            runtime_signal="timestep_embedding",
        ),
        CoefficientSet(
            "wan2.1-t2v-14b",
            (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
            "Wan2.1 t2v-14B (WanTransformer3DModel)",
            "e: time embedding before time_projection",
            0.15,
            "0.14/0.15/0.2 -> 1.4/1.8/2.0x",
            f"{_AUTHORS} TeaCache4Wan2.1",
            runtime_signal="timestep_embedding",
        ),
        CoefficientSet(
            "wan2.1-i2v-14b-480p",
            (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01),
            "Wan2.1 i2v-14B-480P (WanTransformer3DModel)",
            "e: time embedding before time_projection",
            0.19,
            "0.13/0.19/0.26",
            f"{_AUTHORS} TeaCache4Wan2.1",
            runtime_signal="timestep_embedding",
        ),
        CoefficientSet(
            "wan2.1-i2v-14b-720p",
            (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
            "Wan2.1 i2v-14B-720P (WanTransformer3DModel)",
            "e: time embedding before time_projection",
            0.2,
            "0.18/0.2/0.3",
            f"{_AUTHORS} TeaCache4Wan2.1",
            runtime_signal="timestep_embedding",
        ),
        CoefficientSet(
            "wan2.1-t2v-1.3b-ret",
            (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
            "Wan2.1 t2v-1.3B, ret_steps mode (WanTransformer3DModel)",
            "e0 = time_projection(e) (the timestep_proj the blocks receive)",
            0.05,
            "0.05 / 0.10 (first 5 steps forced, not the last)",
            f"{_AUTHORS} TeaCache4Wan2.1",
            runtime_signal="timestep_projection", warmup_steps=5, cooldown_steps=0,
        ),
        CoefficientSet(
            "wan2.1-t2v-14b-ret",
            (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
            "Wan2.1 t2v-14B, ret_steps mode (WanTransformer3DModel)",
            "e0 = time_projection(e)",
            0.1,
            "0.10 / 0.20 (first 5 steps forced, not the last)",
            f"{_AUTHORS} TeaCache4Wan2.1",
            runtime_signal="timestep_projection", warmup_steps=5, cooldown_steps=0,
        ),
        CoefficientSet(
            "wan2.1-i2v-480p-ret",
            (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
            "Wan2.1 i2v-480P, ret_steps mode (WanTransformer3DModel)",
            "e0 = time_projection(e)",
            0.2,
            "0.20 / 0.30 (first 5 steps forced, not the last)",
            f"{_AUTHORS} TeaCache4Wan2.1",
            runtime_signal="timestep_projection", warmup_steps=5, cooldown_steps=0,
        ),
        CoefficientSet(
            "wan2.1-i2v-720p-ret",
            (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
            "Wan2.1 i2v-720P, ret_steps mode; reused for Wan2.2 / Fun / VACE by some ports",
            "e0 = time_projection(e)",
            0.2,
            "0.20 / 0.30 (first 5 steps forced, not the last)",
            f"{_AUTHORS} TeaCache4Wan2.1",
            runtime_signal="timestep_projection", warmup_steps=5, cooldown_steps=0,
        ),
        CoefficientSet(
            # Provenance unclear: the values look hand-rounded.
            "qwen-image",
            (-4.50000000e02, 2.80000000e02, -4.50000000e01, 3.20000000e00, -2.00000000e-02),
            "Qwen-Image, -Edit, -Layered (QwenImageTransformer2DModel)",
            "block 0 image stream: _modulate(img_norm1(h), img_mod(temb).chunk(2)[0])",
            0.2,
            "0.2 default",
            # vLLM-Omni's TeaCache (vllm_omni/diffusion/cache/teacache/config.py), which took the values from
            # ComfyUI-TeaCache. poly(0) = -0.02: vLLM-Omni accumulates |poly(x)|, so an unchanged signal still
            # adds to the accumulator, and adds 1e-8 to the denominator.
            "vllm-omni (from ComfyUI-TeaCache)",
            abs_rescaled=True,
            denominator_eps=1e-8,
        ),
        CoefficientSet(
            "easyanimate-v5.1-7b",
            (1.07862322, -4.19362456, 3.06725828, 0.33161686, 0.02374758),
            "EasyAnimate V5.1-7b",
            "block 0 norm1",
            0.08,
            "0.08",
            "EasyAnimate",
        ),
        CoefficientSet(
            "easyanimate-v5.1-12b",
            (-10.47857366, 8.33844143, -0.78477557, 0.68798618, 0.0136149),
            "EasyAnimate V5.1-12b",
            "block 0 norm1",
            0.08,
            "(no published threshold; 0.08 as for 7b)",
            "EasyAnimate",
        ),
        CoefficientSet(
            "open-sora-1.2",
            (2.17546007e02, -1.18329252e02, 2.68662585e01, -4.59364272e-02, 4.84426240e-02),
            "Open-Sora 1.2",
            "spatial block 0 modulated input",
            0.1,
            "0.1 / 0.2",
            f"{_AUTHORS} TeaCache4Open-Sora",
        ),
        CoefficientSet(
            "latte",
            (-2.46434137e03, 3.08044764e02, 8.07447667e01, -4.11385132e00, 1.11001402e-01),
            "Latte",
            "block 0 modulated input",
            0.1,
            "0.1 / 0.2",
            f"{_AUTHORS} TeaCache4Latte",
        ),
    )
}


def polyval(coefficients: Sequence[float], x: float) -> float:
    """Evaluate a polynomial (highest power first) at `x` in float64, by Horner's rule."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


def resolve(coefficients: str | Sequence[float]) -> tuple[float, ...]:
    """A named published set or an explicit sequence -> validated float tuple (highest power first)."""
    if isinstance(coefficients, str):
        if coefficients not in PUBLISHED:
            known = ", ".join(sorted(PUBLISHED))
            raise ValueError(f"unknown coefficient set {coefficients!r}; known sets: {known}")
        return PUBLISHED[coefficients].coefficients
    try:
        values = tuple(float(c) for c in coefficients)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"coefficients must be a set name or a sequence of numbers, got {coefficients!r}"
        ) from e
    if not 1 <= len(values) <= MAX_COEFFICIENTS:
        raise ValueError(
            f"coefficients must hold 1 to {MAX_COEFFICIENTS} values (degree < {MAX_COEFFICIENTS}), "
            f"got {len(values)}: {values}"
        )
    bad = [c for c in values if not math.isfinite(c)]
    if bad:
        raise ValueError(f"coefficients must be finite, got {values}")
    return values


# --- Calibrated sets: the JSON files `teacache_kernels calibrate` writes ------------------------------

FILE_FORMAT = "teacache_kernels/coefficients/1"
# The signal names most families' cached spans compute (a family may define others: ModelFamily.signals).
RUNTIME_SIGNALS = ("modulated_input", "timestep_embedding")


@dataclass(frozen=True)
class CalibratedSet:
    """One fitted sequence length of a calibrated model."""

    seq_len: int
    coefficients: tuple[float, ...]
    x_range: tuple[float, float]  # the x values the fit saw
    recommended_thresh: float | None  # from `teacache_kernels threshold --save`, if it was run
    signal: str


def load_calibrated(path, model: str | None = None) -> tuple[str, tuple[CalibratedSet, ...]]:
    """(model name, its sets sorted by sequence length) from a calibration file; errors name what is wrong."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"coefficients_file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"coefficients_file {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT or not isinstance(data.get("models"), dict):
        raise ValueError(f"coefficients_file {str(path)!r} is not a {FILE_FORMAT!r} file (write it with `calibrate`)")
    models = data["models"]
    if model is None:
        if len(models) != 1:
            raise ValueError(f"coefficients_file {str(path)!r} holds models {sorted(models)}: choose one with calibrated_model=")
        model = next(iter(models))
    if model not in models:
        raise ValueError(f"coefficients_file {str(path)!r} has no model {model!r}; it has {sorted(models)}")
    sets = []
    for seq_len, entry in models[model].items():
        try:
            lo, hi = (float(v) for v in entry["x_range"])
            thresh = entry.get("recommended_thresh")
            sets.append(
                CalibratedSet(
                    seq_len=int(seq_len),
                    coefficients=resolve(entry["coefficients"]),
                    x_range=(lo, hi),
                    recommended_thresh=None if thresh is None else float(thresh),
                    signal=str(entry["signal"]),
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"coefficients_file {str(path)!r}: model {model!r}, sequence length {seq_len}: {e}") from None
    if not sets:
        raise ValueError(f"coefficients_file {str(path)!r}: model {model!r} has no fitted sequence length")
    signals = {s.signal for s in sets}
    if len(signals) != 1:  # whether the model's family computes it is checked when enabling
        raise ValueError(
            f"coefficients_file {str(path)!r}: model {model!r} was fitted on signal(s) {sorted(signals)}; "
            "TeaCache runs on one signal for all sequence lengths"
        )
    return model, tuple(sorted(sets, key=lambda s: s.seq_len))


def nearest_index(lengths: Sequence[int], seq_len: int) -> int:
    """Index of the length closest to `seq_len` (on a tie, the longer). A plain loop: torch.compile traces it."""
    best = 0
    for i, n in enumerate(lengths):
        d, b = abs(n - seq_len), abs(lengths[best] - seq_len)
        if d < b or (d == b and n > lengths[best]):
            best = i
    return best


def nearest(sets: Sequence[CalibratedSet], seq_len: int) -> CalibratedSet:
    """The set fitted at the sequence length closest to `seq_len` (on a tie, the longer one)."""
    return sets[nearest_index([s.seq_len for s in sets], seq_len)]
