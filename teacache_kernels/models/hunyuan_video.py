"""HunyuanVideo (HunyuanVideoTransformer3DModel): the authors' TeaCache4HunyuanVideo.

- signal: double block 0's image-stream modulated input, `transformer_blocks[0].norm1(hidden_states,
  emb=temb)[0]` (the original: `modulate(double_blocks[0].img_norm1(img), img_mod(vec) shift/scale)`, the
  same LayerNorm without affine, eps 1e-6, and the same SiLU + Linear modulation of the same `vec`);
- the first and last calls compute (the original's `cnt == 0 or cnt == num_steps - 1`);
- state per CFG context: the original counts calls of the transformer, one per step (HunyuanVideo is
  guidance-distilled: `embedded_cfg_scale`, and its sampler batches cond and uncond when true CFG is on);
  diffusers' HunyuanVideoPipeline calls `cache_context("cond")`, and `("uncond")` only with `true_cfg_scale > 1`;
- the residual is cached on the image stream only, over the double-stream then the single-stream blocks,
  before `norm_out` (the original: `img = x[:, :img_seq_len]` after the single blocks, minus the input `img`,
  then `final_layer`). diffusers' single blocks split the joint sequence back into the two streams, so the
  span's image stream is that slice; the text stream is not read after the blocks and leaves the span as it came.

One difference from the generic span: diffusers calls every block positionally with the rotary embedding
fifth, which the double blocks name `freqs_cis` and the single blocks `image_rotary_emb`; both take `**kwargs`.
The span (`HunyuanVideoSpan`) passes it under both names, so each block reads its own and ignores the other.
`image_condition_type="token_replace"` (HunyuanVideo-I2V) builds blocks of other classes that take no extra
keywords (and token-replace modulation the original never covered): refused by name when enabling.
`latent_concat` (the other I2V variant) uses the ordinary blocks and is served; its coefficients are the T2V set.

Two more transformer classes build on these blocks. Neither subclasses HunyuanVideoTransformer3DModel (diffusers
0.42.1), so neither would reach this family through `family_for`'s MRO walk; each is a family of its own:

- FramePack (`HunyuanVideoFramepackTransformer3DModel`, lllyasviel/FramePack): the same double and single blocks,
  called positionally the same way, with the history latents' tokens packed in front of the window's. FramePack's
  own code (diffusers_helper/models/hunyuan_video_packed.py, `initialize_teacache`) is TeaCache4HunyuanVideo on
  the packed sequence: block 0's `norm1(hidden_states, emb=temb)[0]`, the HunyuanVideo set, first and last
  calls forced, the residual over all packed image tokens before the slice to the window and `norm_out`; a
  new state per section (its demo calls `initialize_teacache` before each; diffusers' pipeline sets the
  scheduler's timesteps per section, which starts a new generation here). Served with the `hunyuan-video` set.
  Its decision `acc >= thresh` differs from TeaCache4HunyuanVideo's only at a NaN distance (FramePack reuses,
  and keeps reusing until the next forced call; the package computes). diffusers' FramePack pipeline enters no
  `cache_context`: with `true_cfg_scale > 1` the cond and uncond calls share one state and one call counter
  (wrapping at the step count, mid-section), exactly as FramePack's own code does with `cfg > 1`; the released
  checkpoints are guidance-distilled and FramePack runs them at `cfg = 1` (measured in tests/test_hunyuan_video.py).
- HunyuanVideo 1.5 (`HunyuanVideo15Transformer3DModel`): one list of double-stream blocks (no single-stream
  blocks) with the same call and the same adaLN-Zero `norm1`; its pipeline calls `cache_context("pred_cond")`
  and `("pred_uncond")`. The same span applies exactly (threshold 0 is the plain model bit for bit), but no
  TeaCache coefficients for it are published (the authors' repository has none; Tencent's HunyuanVideo-1.5
  "teacache" option is AngelSlim's fixed step schedule, no polynomial), and the HunyuanVideo set was fitted on
  another model: `enable_teacache` asks for `coefficients=[...]` or a `coefficients_file` (`python -m
  teacache_kernels calibrate`).
"""

from __future__ import annotations

import dataclasses
import inspect

from torch import nn

from .base import BlockSpan, ModelFamily
from .flux import FLUX

_ROTARY_NAMES = ("freqs_cis", "image_rotary_emb")  # double blocks, single blocks


class HunyuanVideoSpan(BlockSpan):
    """The generic span, with the rotary embedding given to every block under both of its names."""

    def __init__(self, *block_lists: nn.ModuleList, **kwargs):
        for blocks in block_lists:
            for block in blocks._modules.values():
                if not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(block.forward).parameters.values()):
                    raise NotImplementedError(
                        f"TeaCache does not support HunyuanVideo with {type(block).__name__} blocks "
                        "(image_condition_type='token_replace', HunyuanVideo-I2V) yet"
                    )
        super().__init__(*block_lists, **kwargs)

    def forward(self, *args, **kwargs):
        call = self.bind(args, kwargs)
        rotary = next((call[n] for n in _ROTARY_NAMES if n in call), None)
        for name in _ROTARY_NAMES:
            call.setdefault(name, rotary)
        return super().forward(**call)


HUNYUAN_VIDEO = ModelFamily(
    name="hunyuan-video",
    class_names=("HunyuanVideoTransformer3DModel",),
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    signals=FLUX.signals,  # the same adaLN-Zero `norm1(hidden_states, emb=temb)`, or temb itself
    streams=("hidden_states", "encoder_hidden_states"),
    returns=("hidden_states", "encoder_hidden_states"),
    cached=("hidden_states",),
    default_coefficients="hunyuan-video",
    span_class=HunyuanVideoSpan,
)

# The same blocks behind another embedding of the inputs (history tokens packed in front of the window's).
HUNYUAN_VIDEO_FRAMEPACK = dataclasses.replace(
    HUNYUAN_VIDEO, name="hunyuan-video-framepack", class_names=("HunyuanVideoFramepackTransformer3DModel",)
)

# One block list; no published coefficients (default_coefficients None: enable_teacache asks for them).
HUNYUAN_VIDEO_15 = dataclasses.replace(
    HUNYUAN_VIDEO, name="hunyuan-video-1.5", class_names=("HunyuanVideo15Transformer3DModel",),
    block_lists=("transformer_blocks",), default_coefficients=None,
)  # fmt: skip
