"""HiDream-I1 (HiDreamImageTransformer2DModel): Full (the authors' TeaCache4HiDream-I1), Dev and Fast (ComfyUI-TeaCache).

- signal, per coefficient set (its `runtime_signal`): hidream-full compares `t_embedder`'s output, the timestep
  embedding before `+ p_embedder(pooled_embeds)` (so not the `temb` the blocks receive), captured from the module;
  hidream-dev and hidream-fast compare the embedded image tokens, `x_embedder`'s output: block 0's `hidden_states`;
- forced calls, per set: hidream-full computes the first 10% of the calls (the original's `cnt < num_steps * 0.1`:
  ceil(0.1 n)) and not the last; dev and fast compute only the first (ComfyUI-TeaCache's "no previous signal");
- one state: HiDreamImagePipeline batches uncond and cond into one call (guidance_scale > 1; Dev and Fast run
  without CFG) and sets no cache context, as the original's one counter over calls assumes;
- the residual is cached on the image tokens only, over the double- then the single-stream blocks, before
  `final_layer` (the original: `hidden_states[:, :image_tokens_seq_len] - ori_hidden_states`).

Why a span of its own (`HiDreamSpan`): diffusers' forward hands every block another projected Llama layer,
`caption_projection[i](encoder_hidden_states_llama3[llama_layers[i]])`, a list local to the forward. Double block
i takes `cat([text, llama_i])` and its text output is cut back to the T5 + last-Llama tokens; between the lists
the text joins the image tokens; single block j takes `cat([joint, llama_{num_layers + j}])`, cut back after.
Block 0's arguments carry llama_0 only, so the span captures every caption projection's output
(`captures` "caption_projection.*") and does that glue itself, exactly as the forward does (same ops, same order;
threshold 0 equals the plain model bit for bit). It returns the image tokens and the text as it came in: the
forward appends the text, runs no single block (its list yields nothing) and cuts the image tokens back out.

One deviation, measured in tests/test_hidream.py (dev and fast only): ComfyUI-TeaCache stores its signal as
`hidden_states.to(cache_device)`, which with its default cache_device (the model's) is `hidden_states` itself; a
reused call then adds the residual to it in place, so the next call compares with the previous tokens plus the
residual. The package compares the tokens as embedded (ComfyUI with the cache on another device, and what a
calibration run, which reuses nothing, measures). At the same thresholds the tiny model's schedules differ by a
computed call or so either way. hidream-full (the authors' `timesteps.clone()`) has no such aliasing.

Default coefficients: hidream-full. Full, Dev and Fast share the transformer config (Dev and Fast are distilled
weights) and the pipeline class, so nothing at enabling tells them apart: give coefficients="hidream-dev" or
"hidream-fast" for the distilled models.

torch.compile: diffusers' MoE feed-forward (every block of the released models) reads its expert counts on the
host (`bincount().cpu().numpy()` in `moe_infer`), which fullgraph=True cannot trace even without TeaCache, and
which a torch.cond branch cannot leave as a graph break: the cached span compiles for `num_routed_experts=0`
models only. Eager TeaCache serves every config.
"""

from __future__ import annotations

import torch

from ..block_list import original_blocks
from .base import BlockSpan, ModelFamily

LLAMA = "caption_projection"  # the capture: every caption projection's output of the call, in call order


class HiDreamSpan(BlockSpan):
    """Both block lists as one cached unit, with diffusers' per-block Llama states and glue between the lists."""

    def forward(self, *args, **kwargs):
        call = self.bind(args, kwargs)
        call.update(self.take_captures())
        signal = self.signal(call)
        double, single = (list(original_blocks(blocks)) for blocks in self.block_lists)
        llama = call[LLAMA][: len(double) + len(single)]  # the last projection is T5's, already in the text
        text, masks, temb, rope = (call[k] for k in ("encoder_hidden_states", "hidden_states_masks", "temb", "image_rotary_emb"))
        text_len = text.shape[1] - llama[0].shape[1]  # the T5 and last-Llama tokens every double block carries on

        def full(hidden_states):
            # diffusers 0.42.1 HiDreamImageTransformer2DModel.forward, "# 2. Blocks", with the lists' glue.
            initial = text[:, :text_len]
            for block, states in zip(double, llama):
                hidden_states, initial = block(hidden_states=hidden_states, hidden_states_masks=masks,
                                               encoder_hidden_states=torch.cat([initial, states], dim=1), temb=temb,
                                               image_rotary_emb=rope)  # fmt: skip
                initial = initial[:, :text_len]
            image_len = hidden_states.shape[1]
            hidden_states = torch.cat([hidden_states, initial], dim=1)
            joint_len = hidden_states.shape[1]
            joint_masks = masks
            if masks is not None:  # non-square latents: the image tokens are padded to max_seq and masked
                ones = torch.ones((masks.shape[0], initial.shape[1] + llama[len(double) - 1].shape[1]), device=masks.device, dtype=masks.dtype)
                joint_masks = torch.cat([masks, ones], dim=1)
            for block, states in zip(single, llama[len(double) :]):
                hidden_states = torch.cat([hidden_states, states], dim=1)
                hidden_states = block(hidden_states=hidden_states, hidden_states_masks=joint_masks, encoder_hidden_states=None,
                                      temb=temb, image_rotary_emb=rope)[:, :joint_len]  # fmt: skip
            return (hidden_states[:, :image_len],)

        (image,) = self.cache.run(signal, (call["hidden_states"],), full)
        return image, text


HIDREAM = ModelFamily(
    name="hidream",
    class_names=("HiDreamImageTransformer2DModel",),
    block_lists=("double_stream_blocks", "single_stream_blocks"),
    signals={
        "timestep_embedding": lambda block, call: call["t_embedder"],  # hidream-full
        "image_tokens": lambda block, call: call["hidden_states"],  # hidream-dev, hidream-fast
    },
    streams=("hidden_states", "encoder_hidden_states"),
    returns=("hidden_states", "encoder_hidden_states"),
    cached=("hidden_states",),
    default_coefficients="hidream-full",
    captures={"t_embedder": ("t_embedder", None), LLAMA: ("caption_projection.*", None)},
    span_class=HiDreamSpan,
)
