"""TeaCache4Lumina2 (ali-vilab/TeaCache, TeaCache4Lumina2/teacache_lumina2.py: `teacache_forward_working`),
on diffusers 0.42.1's Lumina2Transformer2DModel (the forward it patches is written for this diffusers layout).

As written (the TeaCache part of the patched forward):

    cache_key = max_seq_len                                   # joint text+image length of this call
    if cache_key not in self.cache:
        self.cache[cache_key] = {"accumulated_rel_l1_distance": 0.0, "previous_modulated_input": None,
                                 "previous_residual": None}
    current_cache = self.cache[cache_key]
    modulated_inp, _, _, _ = self.layers[0].norm1(input_to_main_loop, temb)
    if self.cnt == 0 or self.cnt == self.num_steps - 1:
        should_calc = True
        current_cache["accumulated_rel_l1_distance"] = 0.0
    else:
        if current_cache["previous_modulated_input"] is not None:
            coefficients = [393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344]  # v1
            rescale_func = np.poly1d(coefficients)
            prev_mod_input = current_cache["previous_modulated_input"]
            prev_mean = prev_mod_input.abs().mean()
            if prev_mean.item() > 1e-9:
                rel_l1_change = ((modulated_inp - prev_mod_input).abs().mean() / prev_mean).cpu().item()
            else:
                rel_l1_change = 0.0 if modulated_inp.abs().mean().item() < 1e-9 else float('inf')
            current_cache["accumulated_rel_l1_distance"] += rescale_func(rel_l1_change)
            if current_cache["accumulated_rel_l1_distance"] < self.rel_l1_thresh:
                should_calc = False
            else:
                should_calc = True
                current_cache["accumulated_rel_l1_distance"] = 0.0
        else:
            should_calc = True
            current_cache["accumulated_rel_l1_distance"] = 0.0
    current_cache["previous_modulated_input"] = modulated_inp.clone()
    if self.uncond_seq_len is None:
        self.uncond_seq_len = cache_key
    if cache_key != self.uncond_seq_len:
        self.cnt += 1
        if self.cnt >= self.num_steps:
            self.cnt = 0

- state (accumulator, previous signal, residual) per joint sequence length; ONE counter `cnt` for all of
  them, which advances only on calls whose length differs from the first call's (`uncond_seq_len` is the
  first key seen: with Lumina2Pipeline that is the cond branch, and the uncond call advances it). With CFG
  on every step, cond and uncond of step i both read cnt == i.
- the residual is over `self.layers` on the joint stream, before `norm_out` (the refiners always run).
- nothing is reset between generations except through the counter's wrap.
The original hard-codes the v1 coefficients; its comment gives the v2 set to switch to (`coefficients=`).
The script runs bf16: its means are bf16 tensors before `.item()`.
"""

from __future__ import annotations

import numpy as np
import torch

from . import Recorder, bind_forward

V1 = [393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344]
V2 = [225.7042019806413, -608.8453716535591, 304.1869942338369, 124.21267720116742, -1.4089066892956552]


class TeaCache4Lumina2(Recorder):
    def __init__(self, transformer, rel_l1_thresh: float, num_steps: int, coefficients=None):
        super().__init__()
        self.coefficients = list(V1 if coefficients is None else coefficients)
        # The script's setup (class attributes there).
        transformer.enable_teacache = True
        transformer.cnt = 0
        transformer.num_steps = num_steps
        transformer.rel_l1_thresh = rel_l1_thresh
        transformer.cache = {}
        transformer.uncond_seq_len = None
        transformer._original_teacache = self
        bind_forward(transformer, teacache_forward_working)


def teacache_forward_working(
    self,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor,
    attention_kwargs=None,
    return_dict: bool = True,
):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    port: TeaCache4Lumina2 = self._original_teacache

    batch_size, _, height, width = hidden_states.shape
    temb, encoder_hidden_states_processed = self.time_caption_embed(hidden_states, timestep, encoder_hidden_states)
    (image_patch_embeddings, context_rotary_emb, noise_rotary_emb, joint_rotary_emb,
     encoder_seq_lengths, seq_lengths) = self.rope_embedder(hidden_states, encoder_attention_mask)  # fmt: skip
    image_patch_embeddings = self.x_embedder(image_patch_embeddings)
    for layer in self.context_refiner:
        encoder_hidden_states_processed = layer(encoder_hidden_states_processed, encoder_attention_mask, context_rotary_emb)
    for layer in self.noise_refiner:
        image_patch_embeddings = layer(image_patch_embeddings, None, noise_rotary_emb, temb)

    max_seq_len = max(seq_lengths)
    input_to_main_loop = image_patch_embeddings.new_zeros(batch_size, max_seq_len, self.config.hidden_size)
    for i, (enc_len, seq_len_val) in enumerate(zip(encoder_seq_lengths, seq_lengths)):
        input_to_main_loop[i, :enc_len] = encoder_hidden_states_processed[i, :enc_len]
        input_to_main_loop[i, enc_len:seq_len_val] = image_patch_embeddings[i]

    use_mask = len(set(seq_lengths)) > 1
    attention_mask_for_main_loop_arg = None
    if use_mask:
        mask = input_to_main_loop.new_zeros(batch_size, max_seq_len, dtype=torch.bool)
        for i, (enc_len, seq_len_val) in enumerate(zip(encoder_seq_lengths, seq_lengths)):
            mask[i, :seq_len_val] = True
        attention_mask_for_main_loop_arg = mask

    should_calc = True
    if self.enable_teacache:
        cache_key = max_seq_len
        if cache_key not in self.cache:
            self.cache[cache_key] = {
                "accumulated_rel_l1_distance": 0.0,
                "previous_modulated_input": None,
                "previous_residual": None,
            }

        current_cache = self.cache[cache_key]
        modulated_inp, _, _, _ = self.layers[0].norm1(input_to_main_loop, temb)
        cnt, x, y, candidate, forced = self.cnt, None, None, None, True

        if self.cnt == 0 or self.cnt == self.num_steps - 1:
            should_calc = True
            current_cache["accumulated_rel_l1_distance"] = 0.0
        else:
            if current_cache["previous_modulated_input"] is not None:
                coefficients = port.coefficients
                rescale_func = np.poly1d(coefficients)
                prev_mod_input = current_cache["previous_modulated_input"]
                prev_mean = prev_mod_input.abs().mean()

                if prev_mean.item() > 1e-9:
                    rel_l1_change = ((modulated_inp - prev_mod_input).abs().mean() / prev_mean).cpu().item()
                else:
                    rel_l1_change = 0.0 if modulated_inp.abs().mean().item() < 1e-9 else float("inf")

                x, y, forced = rel_l1_change, rescale_func(rel_l1_change), False
                current_cache["accumulated_rel_l1_distance"] += rescale_func(rel_l1_change)
                candidate = current_cache["accumulated_rel_l1_distance"]

                if current_cache["accumulated_rel_l1_distance"] < self.rel_l1_thresh:
                    should_calc = False
                else:
                    should_calc = True
                    current_cache["accumulated_rel_l1_distance"] = 0.0
            else:
                should_calc = True
                current_cache["accumulated_rel_l1_distance"] = 0.0

        current_cache["previous_modulated_input"] = modulated_inp.clone()

        if self.uncond_seq_len is None:
            self.uncond_seq_len = cache_key
        if cache_key != self.uncond_seq_len:
            self.cnt += 1
            if self.cnt >= self.num_steps:
                self.cnt = 0

    if self.enable_teacache and not should_calc:
        if max_seq_len in self.cache and "previous_residual" in self.cache[max_seq_len] and self.cache[max_seq_len]["previous_residual"] is not None:
            processed_hidden_states = input_to_main_loop + self.cache[max_seq_len]["previous_residual"]
        else:  # unreachable: a key's first call has no previous signal, so it computes
            raise AssertionError("no residual for a reused call")

    if not (self.enable_teacache and not should_calc):
        current_processing_states = input_to_main_loop
        for layer in self.layers:
            current_processing_states = layer(current_processing_states, attention_mask_for_main_loop_arg, joint_rotary_emb, temb)

        if self.enable_teacache:
            self.cache[max_seq_len]["previous_residual"] = current_processing_states - input_to_main_loop

        processed_hidden_states = current_processing_states

    if self.enable_teacache:
        port.record(f"seq{max_seq_len}", cnt, x, y, candidate, self.cache[max_seq_len]["accumulated_rel_l1_distance"], forced, should_calc)

    output_after_norm = self.norm_out(processed_hidden_states, temb)
    p = self.config.patch_size
    final_output_list = []
    for i, (enc_len, seq_len_val) in enumerate(zip(encoder_seq_lengths, seq_lengths)):
        image_part = output_after_norm[i][enc_len:seq_len_val]
        h_p, w_p = height // p, width // p
        reconstructed_image = image_part.view(h_p, w_p, p, p, self.out_channels).permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2)
        final_output_list.append(reconstructed_image)

    final_output_tensor = torch.stack(final_output_list, dim=0)

    if not return_dict:
        return (final_output_tensor,)
    return Transformer2DModelOutput(sample=final_output_tensor)


def enable(pipe_or_transformer, rel_l1_thresh: float, num_steps: int, **kwargs) -> TeaCache4Lumina2:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return TeaCache4Lumina2(transformer, rel_l1_thresh, num_steps, **kwargs)
