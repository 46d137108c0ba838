"""CogVideoX (CogVideoXTransformer3DModel): 2b, 5b, 5b-I2V, 1.5-5B, 1.5-5B-I2V, ConsisID's transformer.

The authors' TeaCache4CogVideoX1.5 (and TeaCache4ConsisID for the 5b set):
- signal: the timestep embedding `emb` (plus the ofs embedding on 1.5-I2V), the `temb` the blocks receive;
- one state: the pipelines batch cond and uncond into one call (`cache_context("cond_uncond")`);
- first and last calls computed;
- the residuals of both streams are cached, over all blocks, before `norm_final`.
The coefficient set comes from the model's config (the authors' script picks it by checkpoint name):
no RoPE -> 2b; RoPE without a temporal patch -> 5b (5b-I2V has the same set); a temporal patch
(`patch_size_t`) -> 1.5-5B, or 1.5-5B-I2V when the model has an ofs embedding or runs in an
image-to-video pipeline.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import ModelFamily


def _default_coefficients(transformer: nn.Module, pipeline: Any) -> str:
    config = transformer.config
    if config.patch_size_t is None:
        return "cogvideox-5b" if config.use_rotary_positional_embeddings else "cogvideox-2b"
    i2v = config.ofs_embed_dim is not None or (pipeline is not None and "ImageToVideo" in type(pipeline).__name__)
    return "cogvideox1.5-5b-i2v" if i2v else "cogvideox1.5-5b"


COGVIDEOX = ModelFamily(
    name="cogvideox",
    class_names=("CogVideoXTransformer3DModel",),
    block_lists=("transformer_blocks",),
    signals={"timestep_embedding": lambda block, call: call["temb"]},
    streams=("hidden_states", "encoder_hidden_states"),
    cached=("hidden_states", "encoder_hidden_states"),
    default_coefficients=_default_coefficients,
)
