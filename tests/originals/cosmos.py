"""TeaCache4Cosmos (ali-vilab/TeaCache, TeaCache4Cosmos/teacache_sample_video_t2v.py; the i2v script's TeaCache code
is the same), ported from NVIDIA's cosmos1 GeneralDIT onto diffusers 0.42.1's CosmosTransformer3DModel.

As written (the TeaCache part of the patched `GeneralDIT.forward`, lines 88-226 of the t2v script):

    inp = x.clone()
    shift_B_D, scale_B_D, gate_B_D = (self.blocks["block0"].blocks[0].adaLN_modulation(affline_emb_B_D)
                                      + adaln_lora_B_3D).chunk(n_adaln_chunks, dim=1)
    modulated_inp = adaln_norm_state(self.blocks["block0"].blocks[0].norm_state, inp, scale, shift)
    if self.cnt%2 == 0:
        self.is_even = True # even->condition odd->uncondition
        if self.cnt == 0 or self.cnt == self.num_steps:
            should_calc_even = True
            self.accumulated_rel_l1_distance_even = 0
        else:
            coefficients = [2.71156237e+02, -9.19775607e+01, 2.24437250e+00, 2.08355751e+00, 1.41776330e-01]
            rescale_func = np.poly1d(coefficients)
            self.accumulated_rel_l1_distance_even += rescale_func(((modulated_inp-self.previous_modulated_input_even).abs().mean() / self.previous_modulated_input_even.abs().mean()).cpu().item())
            if self.accumulated_rel_l1_distance_even < self.rel_l1_thresh:
                should_calc_even = False
            else:
                should_calc_even = True
                self.accumulated_rel_l1_distance_even = 0
        self.previous_modulated_input_even = modulated_inp.clone()
        self.cnt += 1
        if self.cnt == self.num_steps+2:
            self.cnt = 0
    else:   (the same with _odd, forced at cnt == 1 or cnt == num_steps+1)
    ...
    if not should_calc_<branch>: x += self.previous_residual_<branch>
    else: ori_x = x.clone(); <all blocks>; self.previous_residual_<branch> = x - ori_x
    decoder_head(x, ...)   (final adaLN norm, linear, unpatchify)

- signal: block 0's first sub-block (self-attention of "FA-CA-MLP") adaLN input: LayerNorm without affine
  (eps 1e-6) of x, times 1 + scale, plus shift, from SiLU-Linear-Linear of the RMS-normed timestep embedding plus
  the adaLN LoRA term. In diffusers that is `transformer_blocks[0].norm1`'s modules (activation, linear_1,
  linear_2, `+ temb`, norm), written out below as the original writes them. `x` is taken before block 0 adds the
  learnable per-block position embedding (cosmos1's GeneralDITTransformerBlock adds it first thing; so does
  diffusers' block);
- two states by call parity on one counter: even calls cond, odd calls uncond (cosmos1's `x0_fn` calls
  `denoise(condition)` then `denoise(uncondition)`);
- forced: even cnt 0 and num_steps, odd cnt 1 and num_steps + 1; wrap at num_steps + 2. The script sets
  `num_steps = 2 * steps`, and its sampler ("2ab" multistep, `sample_clean=True`) evaluates `x0_fn` steps + 1
  times: the first and last call of each branch, one generation per wrap. diffusers' loop evaluates the model
  `num_inference_steps` times per branch, so `enable` sets num_steps = 2 * (num_inference_steps - 1): the same
  first and last call of each branch, and the same wrap;
- residual: `x` over all blocks, before the final layer.
The script runs the 7B model in bf16: its means are bf16 before `.item()`.

Recorded `cnt`: the branch's own call index (the shared counter halved), the step index each branch's state is
compared at.
"""

from __future__ import annotations

import numpy as np
import torch

from . import Recorder, bind_forward

COEFFICIENTS = [2.71156237e02, -9.19775607e01, 2.24437250e00, 2.08355751e00, 1.41776330e-01]


class TeaCache4Cosmos(Recorder):
    def __init__(self, transformer, rel_l1_thresh: float, num_inference_steps: int, coefficients=None):
        super().__init__()
        self.coefficients = list(COEFFICIENTS if coefficients is None else coefficients)
        # The script's setup (class attributes there).
        transformer.enable_teacache = True
        transformer.cnt = 0
        transformer.num_steps = 2 * (num_inference_steps - 1)  # see the module docstring
        transformer.rel_l1_thresh = rel_l1_thresh
        transformer.accumulated_rel_l1_distance_even = 0
        transformer.accumulated_rel_l1_distance_odd = 0
        transformer.previous_modulated_input_even = None
        transformer.previous_modulated_input_odd = None
        transformer.previous_residual_even = None
        transformer.previous_residual_odd = None
        transformer._original_teacache = self
        bind_forward(transformer, teacache_forward)


def _decide(self, port: TeaCache4Cosmos, modulated_inp: torch.Tensor, branch: str, first: int, last: int) -> bool:
    """One branch of the original's if/else (identical but for the suffix and the forced counts)."""
    cnt, x, y, candidate, forced = self.cnt, None, None, None, True
    acc_name, prev_name = f"accumulated_rel_l1_distance_{branch}", f"previous_modulated_input_{branch}"
    if self.cnt == first or self.cnt == last:
        should_calc = True
        setattr(self, acc_name, 0)
    else:
        forced = False
        rescale_func = np.poly1d(port.coefficients)
        prev = getattr(self, prev_name)
        x = ((modulated_inp - prev).abs().mean() / prev.abs().mean()).cpu().item()
        y = rescale_func(x)
        setattr(self, acc_name, getattr(self, acc_name) + y)
        candidate = getattr(self, acc_name)
        if getattr(self, acc_name) < self.rel_l1_thresh:
            should_calc = False
        else:
            should_calc = True
            setattr(self, acc_name, 0)
    setattr(self, prev_name, modulated_inp.clone())
    self.cnt += 1
    if self.cnt == self.num_steps + 2:
        self.cnt = 0
    port.record(branch, cnt // 2, x, y, candidate, getattr(self, acc_name), forced, should_calc)
    return should_calc


def teacache_forward(
    self,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    block_controlnet_hidden_states=None,
    attention_mask=None,
    fps=None,
    condition_mask=None,
    padding_mask=None,
    return_dict: bool = True,
):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    port: TeaCache4Cosmos = self._original_teacache
    assert block_controlnet_hidden_states is None, "the original has no ControlNet path"
    batch_size, _, num_frames, height, width = hidden_states.shape

    # diffusers 0.42.1's forward up to the blocks (what cosmos1's forward_before_blocks computes).
    if condition_mask is not None:
        hidden_states = torch.cat([hidden_states, condition_mask], dim=1)
    if self.config.concat_padding_mask:
        from torchvision import transforms

        padding_mask_resized = transforms.functional.resize(
            padding_mask, list(hidden_states.shape[-2:]), interpolation=transforms.InterpolationMode.NEAREST
        )
        hidden_states = torch.cat(
            [hidden_states, padding_mask_resized.unsqueeze(2).repeat(batch_size, 1, num_frames, 1, 1)], dim=1
        )
    if attention_mask is not None:
        attention_mask = attention_mask.unsqueeze(1).unsqueeze(1)
    image_rotary_emb = self.rope(hidden_states, fps=fps)
    extra_pos_emb = self.learnable_pos_embed(hidden_states) if self.config.extra_pos_embed_type else None
    p_t, p_h, p_w = self.config.patch_size
    post_patch_num_frames = num_frames // p_t
    post_patch_height = height // p_h
    post_patch_width = width // p_w
    hidden_states = self.patch_embed(hidden_states)
    hidden_states = hidden_states.flatten(1, 3)
    assert timestep.ndim == 1, "the original's timestep is one per sample"
    temb, embedded_timestep = self.time_embed(hidden_states, timestep)
    text_context = encoder_hidden_states
    if self.config.use_crossattn_projection:
        text_context = self.crossattn_proj(text_context)

    if self.enable_teacache:
        norm1 = self.transformer_blocks[0].norm1  # cosmos1: blocks["block0"].blocks[0] (adaLN_modulation, norm_state)
        inp = hidden_states.clone()
        modulation = norm1.linear_2(norm1.linear_1(norm1.activation(embedded_timestep))) + temb  # + adaln_lora_B_3D
        shift_B_D, scale_B_D, _gate_B_D = modulation.chunk(3, dim=-1)
        shift, scale = shift_B_D.unsqueeze(1), scale_B_D.unsqueeze(1)  # over the sequence (cosmos1: T H W B D)
        modulated_inp = norm1.norm(inp) * (1 + scale) + shift  # adaln_norm_state
        if self.cnt % 2 == 0:
            self.is_even = True  # even->condition odd->uncondition
            should_calc = _decide(self, port, modulated_inp, "even", 0, self.num_steps)
        else:
            self.is_even = False
            should_calc = _decide(self, port, modulated_inp, "odd", 1, self.num_steps + 1)

    branch = "even" if self.is_even else "odd"
    if self.enable_teacache and not should_calc:
        hidden_states += getattr(self, f"previous_residual_{branch}")
    else:
        ori_x = hidden_states.clone()
        for block in self.transformer_blocks:
            hidden_states = block(
                hidden_states, text_context, embedded_timestep, temb, image_rotary_emb, extra_pos_emb, attention_mask, None
            )
        if self.enable_teacache:
            setattr(self, f"previous_residual_{branch}", hidden_states - ori_x)

    # decoder_head: diffusers' norm_out, proj_out and unpatchify.
    hidden_states = self.norm_out(hidden_states, embedded_timestep, temb)
    hidden_states = self.proj_out(hidden_states)
    hidden_states = hidden_states.unflatten(2, (p_h, p_w, p_t, -1))
    hidden_states = hidden_states.unflatten(1, (post_patch_num_frames, post_patch_height, post_patch_width))
    hidden_states = hidden_states.permute(0, 7, 1, 6, 2, 4, 3, 5)
    hidden_states = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    if not return_dict:
        return (hidden_states,)
    return Transformer2DModelOutput(sample=hidden_states)


def enable(pipe_or_transformer, rel_l1_thresh: float, num_inference_steps: int, **kwargs) -> TeaCache4Cosmos:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return TeaCache4Cosmos(transformer, rel_l1_thresh, num_inference_steps, **kwargs)
