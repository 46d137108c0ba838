"""TeaCache4Wan2.1 (ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py at 8ae3503, lines 438-582 and
867-978), ported onto diffusers 0.42.1's WanTransformer3DModel.

As written (the TeaCache part of the patched WanModel.forward; `e` is the time embedding, `e0` its
`time_projection`, the modulation the blocks receive):

    with amp.autocast(dtype=torch.float32):
        e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, t).float())
        e0 = self.time_projection(e).unflatten(1, (6, self.dim))
    ...
    modulated_inp = e0 if self.use_ref_steps else e
    if self.cnt%2==0: # even -> conditon
        self.is_even = True
        if self.cnt < self.ret_steps or self.cnt >= self.cutoff_steps:
                should_calc_even = True
                self.accumulated_rel_l1_distance_even = 0
        else:
            rescale_func = np.poly1d(self.coefficients)
            self.accumulated_rel_l1_distance_even += rescale_func(((modulated_inp-self.previous_e0_even).abs().mean() / self.previous_e0_even.abs().mean()).cpu().item())
            if self.accumulated_rel_l1_distance_even < self.teacache_thresh:
                should_calc_even = False
            else:
                should_calc_even = True
                self.accumulated_rel_l1_distance_even = 0
        self.previous_e0_even = modulated_inp.clone()
    else: # odd -> unconditon
        <the same with _odd>
    if self.is_even:
        if not should_calc_even:
            x += self.previous_residual_even
        else:
            ori_x = x.clone()
            for block in self.blocks:
                x = block(x, **kwargs)
            self.previous_residual_even = x - ori_x
    else: <the same with _odd>
    x = self.head(x, e)
    x = self.unpatchify(x, grid_sizes)
    self.cnt += 1
    if self.cnt >= self.num_steps:
        self.cnt = 0

Setup (generate(), class attributes there): num_steps = sample_steps*2; use_ret_steps: ret_steps = 5*2,
cutoff_steps = sample_steps*2; otherwise ret_steps = 1*2, cutoff_steps = sample_steps*2 - 2; coefficients
by substring of --ckpt_dir ('1.3B' / '14B' for t2v, '480P' / '720P' for i2v), one table per mode.

- the counter counts transformer calls; Wan's generate() calls cond then uncond every step, so even calls
  are cond and odd calls uncond: two states ("even", "odd": the keys recorded here), each with its own
  accumulator, previous signal and residual. diffusers' Wan pipelines also call cond then uncond;
- forced calls (counter values, N = sample_steps): non-ret {0, 1, 2N-2, 2N-1}, i.e. both branches of the
  first and the last step; ret {0, ..., 9}, the first 5 steps, and never the last;
- signal: non-ret `e` = diffusers' `temb` (time_embedder output, before act_fn + time_proj); ret `e0` =
  diffusers' `timestep_proj` (unflattened to (B, 6, dim)), the blocks' modulation input;
- residual: over all blocks, after the last block and before the head (diffusers: before `norm_out`);
- no reset between generations except the counter's wrap at num_steps.
Precision: the original computes `e`, `e0` in float32 (autocast float32, asserted); diffusers casts `temb`
to the prompt embeddings' dtype and runs `time_proj` in the model dtype, so on a bf16 diffusers model both
signals are bf16. The tiny models here are float32 throughout.
Not in the original (none of Wan2.2, VACE, TI2V): the Wan2.2 `expand_timesteps` path (per-token timesteps,
`temb` of shape (B, seq, dim)) is carried over from the diffusers forward unchanged. `enable` patches one
transformer; a two-stage pipeline's experts must be enabled one by one (each with its own counter).
"""

from __future__ import annotations

import numpy as np
import torch

from . import Recorder, bind_forward

# (model, use_ret_steps) -> coefficients, as the script's generate() assigns them (lines 881-892, 965-976).
COEFFICIENTS = {
    ("t2v-1.3B", False): [2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01],
    ("t2v-14B", False): [-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404],
    ("i2v-14B-480P", False): [-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01],
    ("i2v-14B-720P", False): [-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683],
    ("t2v-1.3B", True): [-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02],
    ("t2v-14B", True): [-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01],
    ("i2v-14B-480P", True): [2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01],
    ("i2v-14B-720P", True): [8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02],
}


class TeaCache4Wan(Recorder):
    def __init__(self, transformer, rel_l1_thresh: float, num_steps: int, coefficients, use_ret_steps: bool):
        """`num_steps` is the number of denoising steps (the script's --sample_steps), as for the other ports;
        the counter's period is twice that, as the script sets it."""
        super().__init__()
        if isinstance(coefficients, str):
            if (coefficients, use_ret_steps) not in COEFFICIENTS:
                known = sorted({k for k, _ in COEFFICIENTS})
                raise ValueError(f"unknown Wan coefficients {coefficients!r}; known: {known}")
            coefficients = COEFFICIENTS[coefficients, use_ret_steps]
        # The script's setup (class attributes there).
        transformer.enable_teacache = True
        transformer.cnt = 0
        transformer.num_steps = num_steps * 2
        transformer.teacache_thresh = rel_l1_thresh
        transformer.accumulated_rel_l1_distance_even = 0
        transformer.accumulated_rel_l1_distance_odd = 0
        transformer.previous_e0_even = None
        transformer.previous_e0_odd = None
        transformer.previous_residual_even = None
        transformer.previous_residual_odd = None
        transformer.use_ref_steps = use_ret_steps
        transformer.coefficients = list(coefficients)
        if use_ret_steps:
            transformer.ret_steps = 5 * 2
            transformer.cutoff_steps = num_steps * 2
        else:
            transformer.ret_steps = 1 * 2
            transformer.cutoff_steps = num_steps * 2 - 2
        transformer._original_teacache = self
        bind_forward(transformer, teacache_forward)


def teacache_forward(
    self,
    hidden_states: torch.Tensor,
    timestep: torch.LongTensor,
    encoder_hidden_states: torch.Tensor,
    encoder_hidden_states_image=None,
    return_dict: bool = True,
    attention_kwargs=None,
):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    port: TeaCache4Wan = self._original_teacache
    batch_size, _, num_frames, height, width = hidden_states.shape
    p_t, p_h, p_w = self.config.patch_size
    post_patch_num_frames = num_frames // p_t
    post_patch_height = height // p_h
    post_patch_width = width // p_w

    rotary_emb = self.rope(hidden_states)

    hidden_states = self.patch_embedding(hidden_states)
    hidden_states = hidden_states.flatten(2).transpose(1, 2)
    hidden_states = hidden_states.contiguous()

    # timestep shape: batch_size, or batch_size, seq_len (wan 2.2 ti2v)
    if timestep.ndim == 2:
        ts_seq_len = timestep.shape[1]
        timestep = timestep.flatten()
    else:
        ts_seq_len = None

    # The original's e (temb) and e0 (timestep_proj).
    temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = self.condition_embedder(
        timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=ts_seq_len
    )
    if ts_seq_len is not None:
        timestep_proj = timestep_proj.unflatten(2, (6, -1))
    else:
        timestep_proj = timestep_proj.unflatten(1, (6, -1))

    if encoder_hidden_states_image is not None:
        encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

    if self.enable_teacache:
        modulated_inp = timestep_proj if self.use_ref_steps else temb
        cnt, x, y, candidate = self.cnt, None, None, None
        if self.cnt % 2 == 0:  # even -> conditon
            self.is_even = True
            forced = self.cnt < self.ret_steps or self.cnt >= self.cutoff_steps
            if forced:
                should_calc_even = True
                self.accumulated_rel_l1_distance_even = 0
            else:
                rescale_func = np.poly1d(self.coefficients)
                x = ((modulated_inp - self.previous_e0_even).abs().mean() / self.previous_e0_even.abs().mean()).cpu().item()
                y = rescale_func(x)
                self.accumulated_rel_l1_distance_even += y
                candidate = self.accumulated_rel_l1_distance_even
                if self.accumulated_rel_l1_distance_even < self.teacache_thresh:
                    should_calc_even = False
                else:
                    should_calc_even = True
                    self.accumulated_rel_l1_distance_even = 0
            self.previous_e0_even = modulated_inp.clone()
            port.record("even", cnt, x, y, candidate, self.accumulated_rel_l1_distance_even, forced, should_calc_even)
        else:  # odd -> unconditon
            self.is_even = False
            forced = self.cnt < self.ret_steps or self.cnt >= self.cutoff_steps
            if forced:
                should_calc_odd = True
                self.accumulated_rel_l1_distance_odd = 0
            else:
                rescale_func = np.poly1d(self.coefficients)
                x = ((modulated_inp - self.previous_e0_odd).abs().mean() / self.previous_e0_odd.abs().mean()).cpu().item()
                y = rescale_func(x)
                self.accumulated_rel_l1_distance_odd += y
                candidate = self.accumulated_rel_l1_distance_odd
                if self.accumulated_rel_l1_distance_odd < self.teacache_thresh:
                    should_calc_odd = False
                else:
                    should_calc_odd = True
                    self.accumulated_rel_l1_distance_odd = 0
            self.previous_e0_odd = modulated_inp.clone()
            port.record("odd", cnt, x, y, candidate, self.accumulated_rel_l1_distance_odd, forced, should_calc_odd)

    if self.enable_teacache:
        if self.is_even:
            if not should_calc_even:
                hidden_states += self.previous_residual_even
            else:
                ori_hidden_states = hidden_states.clone()
                for block in self.blocks:
                    hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
                self.previous_residual_even = hidden_states - ori_hidden_states
        else:
            if not should_calc_odd:
                hidden_states += self.previous_residual_odd
            else:
                ori_hidden_states = hidden_states.clone()
                for block in self.blocks:
                    hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
                self.previous_residual_odd = hidden_states - ori_hidden_states
    else:
        for block in self.blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)

    # The original's head(x, e): norm, modulation by e and the head's table, projection.
    if temb.ndim == 3:
        shift, scale = (self.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
        shift = shift.squeeze(2)
        scale = scale.squeeze(2)
    else:
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    shift = shift.to(hidden_states.device)
    scale = scale.to(hidden_states.device)

    hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
    hidden_states = self.proj_out(hidden_states)

    hidden_states = hidden_states.reshape(
        batch_size, post_patch_num_frames, post_patch_height, post_patch_width, p_t, p_h, p_w, -1
    )
    hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
    output = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    # The original counts every call, computed or reused, at the very end of its forward.
    self.cnt += 1
    if self.cnt >= self.num_steps:
        self.cnt = 0

    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)


def enable(pipe_or_transformer, rel_l1_thresh: float, num_steps: int, coefficients_name="t2v-1.3B",
           use_ret_steps: bool = False) -> TeaCache4Wan:  # fmt: skip
    """Patch one WanTransformer3DModel (a pipeline's `transformer`). `coefficients_name`: a key of COEFFICIENTS'
    models, or a list of 5 coefficients."""
    if getattr(pipe_or_transformer, "transformer_2", None) is not None:
        raise ValueError(
            "the original TeaCache4Wan2.1 patches one Wan2.1 model; this pipeline has a transformer_2 (Wan2.2 "
            "two-stage): enable each transformer separately, with the number of steps it runs"
        )
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return TeaCache4Wan(transformer, rel_l1_thresh, num_steps, coefficients_name, use_ret_steps)
