"""TeaCache4CogVideoX1.5 (ali-vilab/TeaCache, TeaCache4CogVideoX1.5/teacache_sample_video.py), ported onto
diffusers 0.42.1's CogVideoXTransformer3DModel.

As written (the TeaCache part of the patched forward):

    emb = self.time_embedding(t_emb, timestep_cond)   (+ ofs_emb on 1.5-I2V)
    ...
    if self.cnt == 0 or self.cnt == self.num_steps-1:
        should_calc = True
        self.accumulated_rel_l1_distance = 0
    else:
        rescale_func = np.poly1d(self.coefficients)
        self.accumulated_rel_l1_distance += rescale_func(((emb-self.previous_modulated_input).abs().mean() / self.previous_modulated_input.abs().mean()).cpu().item())
        if self.accumulated_rel_l1_distance < self.rel_l1_thresh:
            should_calc = False
        else:
            should_calc = True
            self.accumulated_rel_l1_distance = 0
    self.previous_modulated_input = emb
    self.cnt += 1
    if self.cnt == self.num_steps:
        self.cnt = 0
    ...
    if not should_calc:
        hidden_states += self.previous_residual
        encoder_hidden_states += self.previous_residual_encoder
    else:
        ori_hidden_states = hidden_states.clone(); ori_encoder_hidden_states = encoder_hidden_states.clone()
        <blocks>
        self.previous_residual = hidden_states - ori_hidden_states
        self.previous_residual_encoder = encoder_hidden_states - ori_encoder_hidden_states
    (5B / 1.5: cat([encoder, hidden]) -> norm_final -> slice; 2B: norm_final(hidden)), norm_out, proj_out

- signal: the timestep embedding `emb` of the whole CFG batch (the pipelines batch uncond and cond into one
  call: one state, one decision per step); the counter counts calls, `num_steps = num_inference_steps`;
- both streams' residuals over all blocks, before `norm_final`;
- coefficients from `coefficients_dict[mode]`, the checkpoint folder name (`COEFFICIENTS` below);
- no reset between generations except the counter's wrap.
The script runs bf16 (`torch_dtype=torch.bfloat16`): its means are bf16 tensors before `.item()`.
"""

from __future__ import annotations

import numpy as np
import torch

from . import Recorder, bind_forward

COEFFICIENTS = {
    "CogVideoX-2b": [-3.10658903e01, 2.54732368e01, -5.92380459e00, 1.75769064e00, -3.61568434e-03],
    "CogVideoX-5b": [-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02],
    "CogVideoX-5b-I2V": [-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02],
    "CogVideoX1.5-5B": [2.50210439e02, -1.65061612e02, 3.57804877e01, -7.81551492e-01, 3.58559703e-02],
    "CogVideoX1.5-5B-I2V": [1.22842302e02, -1.04088754e02, 2.62981677e01, -3.06009921e-01, 3.71213220e-02],
}


class TeaCache4CogVideoX(Recorder):
    def __init__(self, transformer, rel_l1_thresh: float, num_steps: int, coefficients):
        super().__init__()
        # The script's setup (class attributes there).
        transformer.enable_teacache = True
        transformer.rel_l1_thresh = rel_l1_thresh
        transformer.accumulated_rel_l1_distance = 0
        transformer.previous_modulated_input = None
        transformer.previous_residual = None
        transformer.previous_residual_encoder = None
        transformer.num_steps = num_steps
        transformer.cnt = 0
        transformer.coefficients = list(COEFFICIENTS[coefficients] if isinstance(coefficients, str) else coefficients)
        transformer._original_teacache = self
        bind_forward(transformer, teacache_forward)


def teacache_forward(
    self,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    timestep,
    timestep_cond=None,
    ofs=None,
    image_rotary_emb=None,
    attention_kwargs=None,
    return_dict: bool = True,
):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    port: TeaCache4CogVideoX = self._original_teacache
    batch_size, num_frames, channels, height, width = hidden_states.shape

    # 1. Time embedding
    timesteps = timestep
    t_emb = self.time_proj(timesteps)
    t_emb = t_emb.to(dtype=hidden_states.dtype)
    emb = self.time_embedding(t_emb, timestep_cond)

    if self.ofs_embedding is not None:
        ofs_emb = self.ofs_proj(ofs)
        ofs_emb = ofs_emb.to(dtype=hidden_states.dtype)
        ofs_emb = self.ofs_embedding(ofs_emb)
        emb = emb + ofs_emb

    # 2. Patch embedding
    hidden_states = self.patch_embed(encoder_hidden_states, hidden_states)
    hidden_states = self.embedding_dropout(hidden_states)

    text_seq_length = encoder_hidden_states.shape[1]
    encoder_hidden_states = hidden_states[:, :text_seq_length]
    hidden_states = hidden_states[:, text_seq_length:]

    if self.enable_teacache:
        cnt, x, y, candidate, forced = self.cnt, None, None, None, True
        if self.cnt == 0 or self.cnt == self.num_steps - 1:
            should_calc = True
            self.accumulated_rel_l1_distance = 0
        else:
            forced = False
            rescale_func = np.poly1d(self.coefficients)
            x = ((emb - self.previous_modulated_input).abs().mean() / self.previous_modulated_input.abs().mean()).cpu().item()
            y = rescale_func(x)
            self.accumulated_rel_l1_distance += y
            candidate = self.accumulated_rel_l1_distance
            if self.accumulated_rel_l1_distance < self.rel_l1_thresh:
                should_calc = False
            else:
                should_calc = True
                self.accumulated_rel_l1_distance = 0
        self.previous_modulated_input = emb
        self.cnt += 1
        if self.cnt == self.num_steps:
            self.cnt = 0
        port.record("cond_uncond", cnt, x, y, candidate, self.accumulated_rel_l1_distance, forced, should_calc)

    if self.enable_teacache and not should_calc:
        hidden_states += self.previous_residual
        encoder_hidden_states += self.previous_residual_encoder
    else:
        ori_hidden_states = hidden_states.clone()
        ori_encoder_hidden_states = encoder_hidden_states.clone()
        # 4. Transformer blocks (the original passes no attention_kwargs: an older block signature)
        for block in self.transformer_blocks:
            hidden_states, encoder_hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                temb=emb,
                image_rotary_emb=image_rotary_emb,
            )
        if self.enable_teacache:
            self.previous_residual = hidden_states - ori_hidden_states
            self.previous_residual_encoder = encoder_hidden_states - ori_encoder_hidden_states

    if not self.config.use_rotary_positional_embeddings:
        # CogVideoX-2B
        hidden_states = self.norm_final(hidden_states)
    else:
        # CogVideoX-5B and CogvideoX1.5-5B
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        hidden_states = self.norm_final(hidden_states)
        hidden_states = hidden_states[:, text_seq_length:]

    # 5. Final block
    hidden_states = self.norm_out(hidden_states, temb=emb)
    hidden_states = self.proj_out(hidden_states)

    # 6. Unpatchify
    p = self.config.patch_size
    p_t = self.config.patch_size_t

    if p_t is None:
        output = hidden_states.reshape(batch_size, num_frames, height // p, width // p, -1, p, p)
        output = output.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
    else:
        output = hidden_states.reshape(batch_size, (num_frames + p_t - 1) // p_t, height // p, width // p, -1, p_t, p, p)
        output = output.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)

    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)


def enable(pipe_or_transformer, rel_l1_thresh: float, num_steps: int, coefficients="CogVideoX-5b") -> TeaCache4CogVideoX:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return TeaCache4CogVideoX(transformer, rel_l1_thresh, num_steps, coefficients)
