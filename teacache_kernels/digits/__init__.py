"""The embedded model: a small FLUX transformer trained on scikit-learn's 8x8 digits, shipped in the package.

    from teacache_kernels import digits
    transformer = digits.load_transformer()
    images = digits.generate(transformer, labels=range(10), seed=0)   # [10, 8, 8] in [-1, 1]

It is a real diffusers `FluxTransformer2DModel` (2 double + 4 single blocks, 2.3M parameters) trained
with flow matching by `python -m teacache_kernels.digits.train`, so TeaCache's FLUX cached forward,
diffusers' caches and torch.compile all apply to it unchanged, and its trajectories are real ones:
the quality numbers measured on it mean something, unlike those of random-weight models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import CONFIG, IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, TOKENS, build_transformer, conditioning, pack, unpack
from .sampling import GUIDANCE_SCALE, NUM_STEPS, generate, initial_noise

WEIGHTS_DIR = Path(__file__).with_name("weights")
COEFFICIENTS_FILE = Path(__file__).with_name("teacache.json")  # written by `teacache_kernels calibrate --model digits`
MODEL_NAME = "teacache-digits"


def load_transformer(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The trained model from the package's own files (diffusers `from_pretrained` on a local folder: no hub)."""
    from diffusers import FluxTransformer2DModel

    if not (WEIGHTS_DIR / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(
            f"no trained weights in {WEIGHTS_DIR}: run `python -m teacache_kernels.digits.train` to make them"
        )
    # low_cpu_mem_usage=False: 9 MB load in full; without `accelerate` diffusers would warn about it.
    model = FluxTransformer2DModel.from_pretrained(WEIGHTS_DIR, torch_dtype=dtype, low_cpu_mem_usage=False)
    return model.to(device).eval()


__all__ = [
    "CONFIG",
    "COEFFICIENTS_FILE",
    "GUIDANCE_SCALE",
    "IMAGE_SIZE",
    "MODEL_NAME",
    "NULL_CLASS",
    "NUM_CLASSES",
    "NUM_STEPS",
    "TOKENS",
    "WEIGHTS_DIR",
    "build_transformer",
    "conditioning",
    "generate",
    "initial_noise",
    "load_transformer",
    "pack",
    "unpack",
]
