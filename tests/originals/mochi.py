"""TeaCache4Mochi (ali-vilab/TeaCache, TeaCache4Mochi/teacache_mochi.py), on diffusers 0.42.1's
MochiTransformer3DModel (the forward it patches has the same layout in 0.42.1).

As written (the TeaCache part of the patched forward):

    inp = hidden_states.clone()
    temb_ = temb.clone()
    modulated_inp, gate_msa, scale_mlp, gate_mlp = self.transformer_blocks[0].norm1(inp, temb_)
    if self.cnt == 0 or self.cnt == self.num_steps-1:
        should_calc = True
        self.accumulated_rel_l1_distance = 0
    else:
        coefficients = [-3.51241319e+03,  8.11675948e+02, -6.09400215e+01,  2.42429681e+00, 3.05291719e-03]
        rescale_func = np.poly1d(coefficients)
        self.accumulated_rel_l1_distance += rescale_func(((modulated_inp-self.previous_modulated_input).abs().mean() / self.previous_modulated_input.abs().mean()).cpu().item())
        if self.accumulated_rel_l1_distance < self.rel_l1_thresh:
            should_calc = False
        else:
            should_calc = True
            self.accumulated_rel_l1_distance = 0
    self.previous_modulated_input = modulated_inp
    self.cnt += 1
    if self.cnt == self.num_steps:
        self.cnt = 0
    ...
    if not should_calc:
        hidden_states += self.previous_residual
    else:
        ori_hidden_states = hidden_states.clone()
        <blocks>
        hidden_states = self.norm_out(hidden_states, temb)
        self.previous_residual = hidden_states - ori_hidden_states
    hidden_states = self.proj_out(hidden_states)

- one state: MochiPipeline batches uncond and cond into one call; the counter counts calls;
- the image stream's residual is taken AFTER `norm_out` (a reused call applies `proj_out` to x + residual,
  without `norm_out`); the text stream is not cached (unused after the blocks);
- no reset between generations except the counter's wrap.
The script runs under `torch.autocast("cuda", torch.bfloat16)`: its signal and means are bf16 before `.item()`.
"""

from __future__ import annotations

import numpy as np
import torch

from . import Recorder, bind_forward

COEFFICIENTS = [-3.51241319e03, 8.11675948e02, -6.09400215e01, 2.42429681e00, 3.05291719e-03]


class TeaCache4Mochi(Recorder):
    def __init__(self, transformer, rel_l1_thresh: float, num_steps: int, coefficients=None):
        super().__init__()
        self.coefficients = list(COEFFICIENTS if coefficients is None else coefficients)
        # The script's setup (class attributes there).
        transformer.enable_teacache = True
        transformer.cnt = 0
        transformer.num_steps = num_steps
        transformer.rel_l1_thresh = rel_l1_thresh
        transformer.accumulated_rel_l1_distance = 0
        transformer.previous_modulated_input = None
        transformer.previous_residual = None
        transformer._original_teacache = self
        bind_forward(transformer, teacache_forward)


def teacache_forward(
    self,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    timestep: torch.LongTensor,
    encoder_attention_mask: torch.Tensor,
    attention_kwargs=None,
    return_dict: bool = True,
):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    port: TeaCache4Mochi = self._original_teacache
    batch_size, num_channels, num_frames, height, width = hidden_states.shape
    p = self.config.patch_size

    post_patch_height = height // p
    post_patch_width = width // p

    temb, encoder_hidden_states = self.time_embed(
        timestep,
        encoder_hidden_states,
        encoder_attention_mask,
        hidden_dtype=hidden_states.dtype,
    )

    hidden_states = hidden_states.permute(0, 2, 1, 3, 4).flatten(0, 1)
    hidden_states = self.patch_embed(hidden_states)
    hidden_states = hidden_states.unflatten(0, (batch_size, -1)).flatten(1, 2)

    image_rotary_emb = self.rope(
        self.pos_frequencies,
        num_frames,
        post_patch_height,
        post_patch_width,
        device=hidden_states.device,
        dtype=torch.float32,
    )

    if self.enable_teacache:
        inp = hidden_states.clone()
        temb_ = temb.clone()
        modulated_inp, gate_msa, scale_mlp, gate_mlp = self.transformer_blocks[0].norm1(inp, temb_)
        cnt, x, y, candidate, forced = self.cnt, None, None, None, True
        if self.cnt == 0 or self.cnt == self.num_steps - 1:
            should_calc = True
            self.accumulated_rel_l1_distance = 0
        else:
            forced = False
            coefficients = port.coefficients
            rescale_func = np.poly1d(coefficients)
            x = ((modulated_inp - self.previous_modulated_input).abs().mean() / self.previous_modulated_input.abs().mean()).cpu().item()
            y = rescale_func(x)
            self.accumulated_rel_l1_distance += y
            candidate = self.accumulated_rel_l1_distance
            if self.accumulated_rel_l1_distance < self.rel_l1_thresh:
                should_calc = False
            else:
                should_calc = True
                self.accumulated_rel_l1_distance = 0
        self.previous_modulated_input = modulated_inp
        self.cnt += 1
        if self.cnt == self.num_steps:
            self.cnt = 0
        port.record("cond_uncond", cnt, x, y, candidate, self.accumulated_rel_l1_distance, forced, should_calc)

    if self.enable_teacache and not should_calc:
        hidden_states += self.previous_residual
    else:
        ori_hidden_states = hidden_states.clone()
        for block in self.transformer_blocks:
            hidden_states, encoder_hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                temb=temb,
                encoder_attention_mask=encoder_attention_mask,
                image_rotary_emb=image_rotary_emb,
            )
        hidden_states = self.norm_out(hidden_states, temb)
        if self.enable_teacache:
            self.previous_residual = hidden_states - ori_hidden_states

    hidden_states = self.proj_out(hidden_states)

    hidden_states = hidden_states.reshape(batch_size, num_frames, post_patch_height, post_patch_width, p, p, -1)
    hidden_states = hidden_states.permute(0, 6, 1, 2, 4, 3, 5)
    output = hidden_states.reshape(batch_size, -1, num_frames, height, width)

    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)


def enable(pipe_or_transformer, rel_l1_thresh: float, num_steps: int, **kwargs) -> TeaCache4Mochi:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return TeaCache4Mochi(transformer, rel_l1_thresh, num_steps, **kwargs)
