"""TeaCache4FLUX (ali-vilab/TeaCache, TeaCache4FLUX/teacache_flux.py), ported onto diffusers 0.42.1's FluxTransformer2DModel.

The original patches `FluxTransformer2DModel.forward`. Its TeaCache, as written:

    if self.enable_teacache:
        inp = hidden_states.clone()
        temb_ = temb.clone()
        modulated_inp, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.transformer_blocks[0].norm1(inp, emb=temb_)
        if self.cnt == 0 or self.cnt == self.num_steps-1:
            should_calc = True
            self.accumulated_rel_l1_distance = 0
        else:
            coefficients = [4.98651651e+02, -2.83781631e+02,  5.58554382e+01, -3.82021401e+00, 2.64230861e-01]
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
            <double blocks>; hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
            <single blocks>; hidden_states = hidden_states[:, encoder_hidden_states.shape[1] :, ...]
            self.previous_residual = hidden_states - ori_hidden_states
    hidden_states = self.norm_out(hidden_states, temb); output = self.proj_out(hidden_states)

- one state per transformer, one counter over *calls*; the script sets `num_steps = num_inference_steps`
  and runs FLUX.1-dev, which is guidance-distilled: one transformer call per step, no CFG branches;
- residual on the image stream only, over the double and the single blocks, before `norm_out`.

diffusers 0.42.1's single blocks take and return both streams (they concatenate and split inside, what the
original did around the loop): the same operations on the same values.

True CFG (FluxPipeline's `true_cfg_scale` with a negative prompt: "cond" then "uncond" calls each step) is
not something the original handles: with `per_context=False` (the literal original) both branches share its
one state and its one counter. `per_context=True` gives each diffusers `cache_context` its own full copy of
the original's state, which is what running the original on each branch alone would do.
The published run is fp16 (`torch_dtype=torch.float16`): its distance means were fp16-rounded before `.item()`.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from . import Recorder, bind_forward

COEFFICIENTS = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]


class _State:
    def __init__(self, num_steps: int, rel_l1_thresh: float):
        # The script's class attributes.
        self.enable_teacache = True
        self.cnt = 0
        self.num_steps = num_steps
        self.rel_l1_thresh = rel_l1_thresh
        self.accumulated_rel_l1_distance = 0
        self.previous_modulated_input = None
        self.previous_residual = None


class TeaCache4FLUX(Recorder):
    def __init__(self, transformer, rel_l1_thresh: float, num_steps: int, per_context: bool = False, coefficients=None):
        super().__init__()
        self.rel_l1_thresh, self.num_steps, self.per_context = rel_l1_thresh, num_steps, per_context
        self.coefficients = list(COEFFICIENTS if coefficients is None else coefficients)
        self.states: dict[str, _State] = {}
        self.context = "transformer"  # the one state of the original
        if per_context:
            base = transformer.cache_context

            @contextlib.contextmanager
            def cache_context(name, **kwargs):
                previous, self.context = self.context, name
                try:
                    with base(name, **kwargs):
                        yield
                finally:
                    self.context = previous

            transformer.cache_context = cache_context
        transformer._original_teacache = self
        bind_forward(transformer, teacache_forward)

    def state(self) -> _State:
        if self.context not in self.states:
            self.states[self.context] = _State(self.num_steps, self.rel_l1_thresh)
        return self.states[self.context]


def teacache_forward(
    self,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor = None,
    pooled_projections: torch.Tensor = None,
    timestep: torch.LongTensor = None,
    img_ids: torch.Tensor = None,
    txt_ids: torch.Tensor = None,
    guidance: torch.Tensor = None,
    joint_attention_kwargs=None,
    controlnet_block_samples=None,
    controlnet_single_block_samples=None,
    return_dict: bool = True,
    controlnet_blocks_repeat: bool = False,
):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    port: TeaCache4FLUX = self._original_teacache
    tc = port.state()  # `self` of the original's TeaCache attributes
    assert controlnet_block_samples is None and controlnet_single_block_samples is None, "not ported"
    assert not (joint_attention_kwargs and "ip_adapter_image_embeds" in joint_attention_kwargs), "not ported"

    hidden_states = self.x_embedder(hidden_states)

    timestep = timestep.to(hidden_states.dtype) * 1000
    if guidance is not None:
        guidance = guidance.to(hidden_states.dtype) * 1000
    else:
        guidance = None

    temb = (
        self.time_text_embed(timestep, pooled_projections)
        if guidance is None
        else self.time_text_embed(timestep, guidance, pooled_projections)
    )
    encoder_hidden_states = self.context_embedder(encoder_hidden_states)

    if txt_ids.ndim == 3:
        txt_ids = txt_ids[0]
    if img_ids.ndim == 3:
        img_ids = img_ids[0]

    ids = torch.cat((txt_ids, img_ids), dim=0)
    image_rotary_emb = self.pos_embed(ids)

    # --- TeaCache, as in teacache_flux.py ---
    x = y = candidate = None
    cnt = tc.cnt
    if tc.enable_teacache:
        inp = hidden_states.clone()
        temb_ = temb.clone()
        modulated_inp, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.transformer_blocks[0].norm1(inp, emb=temb_)
        if tc.cnt == 0 or tc.cnt == tc.num_steps - 1:
            should_calc = True
            tc.accumulated_rel_l1_distance = 0
            forced = True
        else:
            forced = False
            rescale_func = np.poly1d(port.coefficients)
            x = ((modulated_inp - tc.previous_modulated_input).abs().mean() / tc.previous_modulated_input.abs().mean()).cpu().item()
            y = rescale_func(x)
            tc.accumulated_rel_l1_distance += y
            candidate = tc.accumulated_rel_l1_distance
            if tc.accumulated_rel_l1_distance < tc.rel_l1_thresh:
                should_calc = False
            else:
                should_calc = True
                tc.accumulated_rel_l1_distance = 0
        tc.previous_modulated_input = modulated_inp
        tc.cnt += 1
        if tc.cnt == tc.num_steps:
            tc.cnt = 0
        port.record(port.context, cnt, x, y, candidate, tc.accumulated_rel_l1_distance, forced, should_calc)

    if tc.enable_teacache and not should_calc:
        hidden_states += tc.previous_residual
    else:
        ori_hidden_states = hidden_states.clone()
        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                temb=temb,
                image_rotary_emb=image_rotary_emb,
                joint_attention_kwargs=joint_attention_kwargs,
            )
        for block in self.single_transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                temb=temb,
                image_rotary_emb=image_rotary_emb,
                joint_attention_kwargs=joint_attention_kwargs,
            )
        if tc.enable_teacache:
            tc.previous_residual = hidden_states - ori_hidden_states

    hidden_states = self.norm_out(hidden_states, temb)
    output = self.proj_out(hidden_states)

    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)


def enable(pipe_or_transformer, rel_l1_thresh: float, num_steps: int, **kwargs) -> TeaCache4FLUX:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return TeaCache4FLUX(transformer, rel_l1_thresh, num_steps, **kwargs)
