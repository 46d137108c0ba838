"""TeaCache4HunyuanVideo (ali-vilab/TeaCache, TeaCache4HunyuanVideo/teacache_sample_video.py), ported onto
diffusers 0.42.1's HunyuanVideoTransformer3DModel.

The original patches hyvideo's `HYVideoDiffusionTransformer.forward`. Its TeaCache, as written:

    vec = self.time_in(t) + self.vector_in(text_states_2) [+ self.guidance_in(guidance)]
    img = self.img_in(img); txt = self.txt_in(txt, t, text_mask)
    if self.enable_teacache:
        inp = img.clone()
        vec_ = vec.clone()
        (img_mod1_shift, img_mod1_scale, ...) = self.double_blocks[0].img_mod(vec_).chunk(6, dim=-1)
        normed_inp = self.double_blocks[0].img_norm1(inp)
        modulated_inp = modulate(normed_inp, shift=img_mod1_shift, scale=img_mod1_scale)
        if self.cnt == 0 or self.cnt == self.num_steps-1:
            should_calc = True
            self.accumulated_rel_l1_distance = 0
        else:
            coefficients = [7.33226126e+02, -4.01131952e+02,  6.75869174e+01, -3.14987800e+00, 9.61237896e-02]
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
    if self.enable_teacache:
        if not should_calc:
            img += self.previous_residual
        else:
            ori_img = img.clone()
            <double blocks>; x = torch.cat((img, txt), 1); <single blocks>; img = x[:, :img_seq_len, ...]
            self.previous_residual = img - ori_img
    img = self.final_layer(img, vec)

- the signal is block 0's image-stream modulated input: hyvideo's `img_mod` is SiLU then Linear of `vec`
  (diffusers: `transformer_blocks[0].norm1.silu` / `.linear`, the same chunk order), `img_norm1` a LayerNorm
  without affine, eps 1e-6 (`norm1.norm`), `modulate(x, shift, scale) = x * (1 + scale.unsqueeze(1)) +
  shift.unsqueeze(1)`; hyvideo's `vec` is diffusers' `temb` (timestep + pooled text + guidance embeddings);
- one state per transformer, one counter over *calls*, `num_steps = args.infer_steps`; HunyuanVideo is
  guidance-distilled (`embedded_cfg_scale`): one call per step;
- residual on the image stream only, over the double and the single blocks, before `final_layer`
  (diffusers: `norm_out`, `proj_out`). diffusers' single blocks concatenate and split the streams inside,
  what the original does around its loop: the same operations on the same values.

True CFG (HunyuanVideoPipeline's `true_cfg_scale > 1` with a negative prompt: "cond" then "uncond" calls each
step, in diffusers' cache contexts) is not something the original handles (hyvideo batches the two into one
call when `cfg_scale > 1`): with `per_context=False` (the literal original) both branches share its one
state and its one counter; `per_context=True` gives each cache context its own full copy of the state,
which is what running the original on each branch alone would do.
The script runs bf16: its distance means were bf16-rounded before `.item()`.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from . import Recorder, bind_forward

COEFFICIENTS = [7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02]


class _State:
    def __init__(self, num_steps: int, rel_l1_thresh: float):
        # The script's class attributes (`main()`, after loading the sampler).
        self.enable_teacache = True
        self.cnt = 0
        self.num_steps = num_steps
        self.rel_l1_thresh = rel_l1_thresh
        self.accumulated_rel_l1_distance = 0
        self.previous_modulated_input = None
        self.previous_residual = None


class TeaCache4HunyuanVideo(Recorder):
    def __init__(self, transformer, rel_l1_thresh: float, num_steps: int, per_context: bool = False):
        super().__init__()
        self.rel_l1_thresh, self.num_steps = rel_l1_thresh, num_steps
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


def modulate(x, shift=None, scale=None):
    """hyvideo.modules.modulate_layers.modulate."""
    if scale is None and shift is None:
        return x
    elif shift is None:
        return x * (1 + scale.unsqueeze(1))
    elif scale is None:
        return x + shift.unsqueeze(1)
    else:
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def teacache_forward(
    self,
    hidden_states: torch.Tensor,
    timestep: torch.LongTensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor,
    pooled_projections: torch.Tensor,
    guidance: torch.Tensor = None,
    attention_kwargs=None,
    return_dict: bool = True,
):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    port: TeaCache4HunyuanVideo = self._original_teacache
    tc = port.state()  # `self` of the original's TeaCache attributes
    assert self.config.image_condition_type != "token_replace", "not ported"

    batch_size, num_channels, num_frames, height, width = hidden_states.shape
    p, p_t = self.config.patch_size, self.config.patch_size_t
    post_patch_num_frames = num_frames // p_t
    post_patch_height = height // p
    post_patch_width = width // p
    first_frame_num_tokens = 1 * post_patch_height * post_patch_width

    # 1. RoPE
    image_rotary_emb = self.rope(hidden_states)

    # 2. Conditional embeddings (hyvideo's `vec`)
    temb, token_replace_emb = self.time_text_embed(timestep, pooled_projections, guidance)

    hidden_states = self.x_embedder(hidden_states)
    encoder_hidden_states = self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)

    # 3. Attention mask preparation
    latent_sequence_length = hidden_states.shape[1]
    condition_sequence_length = encoder_hidden_states.shape[1]
    sequence_length = latent_sequence_length + condition_sequence_length
    attention_mask = torch.ones(batch_size, sequence_length, device=hidden_states.device, dtype=torch.bool)
    effective_condition_sequence_length = encoder_attention_mask.sum(dim=1, dtype=torch.int)
    effective_sequence_length = latent_sequence_length + effective_condition_sequence_length
    indices = torch.arange(sequence_length, device=hidden_states.device).unsqueeze(0)
    mask_indices = indices >= effective_sequence_length.unsqueeze(1)
    attention_mask = attention_mask.masked_fill(mask_indices, False)
    attention_mask = attention_mask.unsqueeze(1).unsqueeze(1)

    # --- TeaCache, as in teacache_sample_video.py ---
    x = y = candidate = None
    cnt = tc.cnt
    if tc.enable_teacache:
        inp = hidden_states.clone()
        vec_ = temb.clone()
        img_mod = self.transformer_blocks[0].norm1  # hyvideo's double_blocks[0].img_mod and img_norm1
        (img_mod1_shift, img_mod1_scale, img_mod1_gate, img_mod2_shift, img_mod2_scale, img_mod2_gate) = (
            img_mod.linear(img_mod.silu(vec_)).chunk(6, dim=-1)
        )
        normed_inp = img_mod.norm(inp)
        modulated_inp = modulate(normed_inp, shift=img_mod1_shift, scale=img_mod1_scale)
        if tc.cnt == 0 or tc.cnt == tc.num_steps - 1:
            should_calc = True
            tc.accumulated_rel_l1_distance = 0
            forced = True
        else:
            forced = False
            rescale_func = np.poly1d(COEFFICIENTS)
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
        # 4. Transformer blocks
        for block in self.transformer_blocks:
            hidden_states, encoder_hidden_states = block(
                hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb, token_replace_emb,
                first_frame_num_tokens,
            )  # fmt: skip
        for block in self.single_transformer_blocks:
            hidden_states, encoder_hidden_states = block(
                hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb, token_replace_emb,
                first_frame_num_tokens,
            )  # fmt: skip
        if tc.enable_teacache:
            tc.previous_residual = hidden_states - ori_hidden_states

    # 5. Output projection (hyvideo's final_layer)
    hidden_states = self.norm_out(hidden_states, temb)
    hidden_states = self.proj_out(hidden_states)

    hidden_states = hidden_states.reshape(
        batch_size, post_patch_num_frames, post_patch_height, post_patch_width, -1, p_t, p, p
    )
    hidden_states = hidden_states.permute(0, 4, 1, 5, 2, 6, 3, 7)
    hidden_states = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    if not return_dict:
        return (hidden_states,)
    return Transformer2DModelOutput(sample=hidden_states)


def enable(pipe_or_transformer, rel_l1_thresh: float, num_steps: int, **kwargs) -> TeaCache4HunyuanVideo:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return TeaCache4HunyuanVideo(transformer, rel_l1_thresh, num_steps, **kwargs)
