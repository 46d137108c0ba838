"""TeaCache4HiDream-I1 (ali-vilab/TeaCache, TeaCache4HiDream-I1/teacache_hidream_i1.py), on diffusers 0.42.1's
HiDreamImageTransformer2DModel (the forward it patches has the same layout in 0.42.1), and, for the Dev and
Fast sets, ComfyUI-TeaCache's `teacache_hidream_forward` (welltop-cn/ComfyUI-TeaCache nodes.py at 91dff8e).

The authors' script (HiDream-I1-Full), as written (the TeaCache part of the patched forward):

    timesteps = self.t_embedder(timesteps, hidden_states_type)
    p_embedder = self.p_embedder(pooled_embeds)
    temb = timesteps + p_embedder
    ...
    if self.enable_teacache:
        modulated_inp = timesteps.clone()
        if self.cnt < self.ret_steps:
            should_calc = True
            self.accumulated_rel_l1_distance = 0
        else:
            rescale_func = np.poly1d(self.coefficients)
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
            hidden_states += self.previous_residual
        else:
            ori_hidden_states = hidden_states.clone()
            <double blocks, concatenation, single blocks>
            hidden_states = hidden_states[:, :image_tokens_seq_len, ...]
            self.previous_residual = hidden_states - ori_hidden_states
    output = self.final_layer(hidden_states, temb)

  with `ret_steps = num_inference_steps * 0.1` and `num_steps = num_inference_steps` (class attributes):
- signal: `t_embedder`'s output (not temb), of the whole CFG batch: HiDreamImagePipeline batches uncond and cond
  into one call, so one state and one decision per step; the counter counts calls;
- forced: the calls with `cnt < 0.1 * num_steps` (the first ceil(n / 10)); the last call is not forced;
- the image tokens' residual over all blocks, before `final_layer`; no reset except the counter's wrap.
The script runs bf16: its means are bf16 tensors before `.item()`.

ComfyUI-TeaCache (model_type "hidream_i1_dev" / "hidream_i1_fast"), as written, for one cond/uncond key:

    modulated_inp = timesteps if "full" in model_type else hidden_states      # after x_embedder
    if cache['previous_modulated_input'] is not None:
        cache['accumulated_rel_l1_distance'] += poly1d(coefficients, ((modulated_inp-cache['previous_modulated_input']).abs().mean() / cache['previous_modulated_input'].abs().mean()))
        if cache['accumulated_rel_l1_distance'] < rel_l1_thresh: cache['should_calc'] = False
        else: cache['should_calc'] = True; cache['accumulated_rel_l1_distance'] = 0
    cache['previous_modulated_input'] = modulated_inp

  (`poly1d` there: a sum of `coeff * x ** k` in the tensor's dtype), the same residual, and the state deleted at
  each sampling's step index 0 (`should_calc` starts True). Dev and Fast are guidance-distilled: ComfyUI runs
  them with one key, as diffusers' pipeline runs them without CFG (guidance_scale 0); its per-key split of a CFG
  batch is not ported. Its start/end percent options are left at their defaults (0, 1: every step). Here the
  reset at step 0 is a call counter wrapping at `num_steps` (recorded as `cnt`).
  One behaviour hangs on ComfyUI's `cache_device` option: the signal is `hidden_states.to(cache_device)`. On
  another device (cache_device "cpu" with the model on a GPU) that is a copy; on the model's device (the default,
  "cuda") it is `hidden_states` itself, which a reused call then changes in place (`hidden_states += residual`),
  so the next call compares with the previous tokens *plus the residual*. `aliased=False` ports the copy (what
  the package does), `aliased=True` the default device's aliasing (tests/test_hidream.py measures the difference).

Left out of the forward, besides the common departures (originals/__init__.py): diffusers 0.42.1's
`.to(hidden_states.device)` on the text states (one device here), and the script's dead
`hidden_states_masks = hidden_states_masks[:, :image_tokens_seq_len]` after `unpatchify`, which on a reused call
with non-square latents (the masked path) raises NameError: `image_tokens_seq_len` is only set by the blocks.
The fidelity tests run square latents; the package serves both (tests/test_hidream.py).
"""

from __future__ import annotations

import numpy as np
import torch

from . import Recorder, bind_forward

COEFFICIENTS = {  # the authors' script (full), ComfyUI-TeaCache nodes.py (all three)
    "full": [-3.13605009e04, -7.12425503e02, 4.91363285e01, 8.26515490e00, 1.08053901e-01],
    "dev": [1.39997273, -4.30130469, 5.01534416, -2.20504164, 0.93942874],
    "fast": [2.26509623, -6.88864563, 7.61123826, -3.10849353, 0.99927602],
}


def comfy_poly1d(coefficients, x):
    result = torch.zeros_like(x)
    for i, coeff in enumerate(coefficients):
        result += coeff * (x ** (len(coefficients) - 1 - i))
    return result


class TeaCache4HiDream(Recorder):
    def __init__(self, transformer, rel_l1_thresh: float, num_steps: int, model_type: str = "full", aliased: bool = False):
        super().__init__()
        self.model_type = model_type  # "full": the authors' script; "dev" / "fast": ComfyUI-TeaCache
        self.aliased = aliased  # ComfyUI's cache_device is the model's device: the stored signal is hidden_states itself
        # The script's setup (class attributes there).
        transformer.enable_teacache = True
        transformer.cnt = 0
        transformer.num_steps = num_steps
        transformer.ret_steps = num_steps * 0.1
        transformer.rel_l1_thresh = rel_l1_thresh
        transformer.coefficients = COEFFICIENTS[model_type]
        transformer.accumulated_rel_l1_distance = 0
        transformer.previous_modulated_input = None
        transformer.previous_residual = None
        transformer._original_teacache = self
        bind_forward(transformer, teacache_forward)


def decide_authors(self, port, timesteps):
    cnt, x, y, candidate, forced = self.cnt, None, None, None, True
    modulated_inp = timesteps.clone()
    if self.cnt < self.ret_steps:
        should_calc = True
        self.accumulated_rel_l1_distance = 0
    else:
        forced = False
        rescale_func = np.poly1d(self.coefficients)
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
    port.record("transformer", cnt, x, y, candidate, self.accumulated_rel_l1_distance, forced, should_calc)
    return should_calc


def decide_comfy(self, port, hidden_states):
    cnt, x, y, candidate = self.cnt, None, None, None
    if self.cnt == 0:  # ComfyUI's wrapper deletes the state at the sampling's step index 0
        self.previous_modulated_input, self.accumulated_rel_l1_distance = None, 0
    modulated_inp = hidden_states if port.aliased else hidden_states.clone()  # .to(cache_device): same or other device
    should_calc = True
    forced = self.previous_modulated_input is None
    if not forced:
        prev = self.previous_modulated_input
        x = (modulated_inp - prev).abs().mean() / prev.abs().mean()
        y = comfy_poly1d(self.coefficients, x)
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
    port.record("transformer", cnt, x, y, candidate, self.accumulated_rel_l1_distance, forced, should_calc)
    return should_calc


def teacache_forward(
    self,
    hidden_states: torch.Tensor,
    timesteps: torch.LongTensor = None,
    encoder_hidden_states_t5: torch.Tensor = None,
    encoder_hidden_states_llama3: torch.Tensor = None,
    pooled_embeds: torch.Tensor = None,
    img_ids=None,
    img_sizes=None,
    hidden_states_masks=None,
    attention_kwargs=None,
    return_dict: bool = True,
):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    port: TeaCache4HiDream = self._original_teacache
    batch_size = hidden_states.shape[0]
    hidden_states_type = hidden_states.dtype

    if hidden_states_masks is None:
        hidden_states, hidden_states_masks, img_sizes, img_ids = self.patchify(hidden_states)
    hidden_states = self.x_embedder(hidden_states)

    timesteps = self.t_embedder(timesteps, hidden_states_type)
    p_embedder = self.p_embedder(pooled_embeds)
    temb = timesteps + p_embedder

    encoder_hidden_states = [encoder_hidden_states_llama3[k] for k in self.config.llama_layers]
    if self.caption_projection is not None:
        new_encoder_hidden_states = []
        for i, enc_hidden_state in enumerate(encoder_hidden_states):
            enc_hidden_state = self.caption_projection[i](enc_hidden_state)
            enc_hidden_state = enc_hidden_state.view(batch_size, -1, hidden_states.shape[-1])
            new_encoder_hidden_states.append(enc_hidden_state)
        encoder_hidden_states = new_encoder_hidden_states
        encoder_hidden_states_t5 = self.caption_projection[-1](encoder_hidden_states_t5)
        encoder_hidden_states_t5 = encoder_hidden_states_t5.view(batch_size, -1, hidden_states.shape[-1])
        encoder_hidden_states.append(encoder_hidden_states_t5)

    txt_ids = torch.zeros(
        batch_size,
        encoder_hidden_states[-1].shape[1] + encoder_hidden_states[-2].shape[1] + encoder_hidden_states[0].shape[1],
        3,
        device=img_ids.device,
        dtype=img_ids.dtype,
    )
    ids = torch.cat((img_ids, txt_ids), dim=1)
    image_rotary_emb = self.pe_embedder(ids)

    block_id = 0
    initial_encoder_hidden_states = torch.cat([encoder_hidden_states[-1], encoder_hidden_states[-2]], dim=1)
    initial_encoder_hidden_states_seq_len = initial_encoder_hidden_states.shape[1]

    if port.model_type == "full":
        should_calc = decide_authors(self, port, timesteps)
    else:
        should_calc = decide_comfy(self, port, hidden_states)

    if not should_calc:
        hidden_states += self.previous_residual
    else:
        ori_hidden_states = hidden_states.clone()
        for bid, block in enumerate(self.double_stream_blocks):
            cur_llama31_encoder_hidden_states = encoder_hidden_states[block_id]
            cur_encoder_hidden_states = torch.cat([initial_encoder_hidden_states, cur_llama31_encoder_hidden_states], dim=1)
            hidden_states, initial_encoder_hidden_states = block(
                hidden_states=hidden_states,
                hidden_states_masks=hidden_states_masks,
                encoder_hidden_states=cur_encoder_hidden_states,
                temb=temb,
                image_rotary_emb=image_rotary_emb,
            )
            initial_encoder_hidden_states = initial_encoder_hidden_states[:, :initial_encoder_hidden_states_seq_len]
            block_id += 1

        image_tokens_seq_len = hidden_states.shape[1]
        hidden_states = torch.cat([hidden_states, initial_encoder_hidden_states], dim=1)
        hidden_states_seq_len = hidden_states.shape[1]
        if hidden_states_masks is not None:
            encoder_attention_mask_ones = torch.ones(
                (batch_size, initial_encoder_hidden_states.shape[1] + cur_llama31_encoder_hidden_states.shape[1]),
                device=hidden_states_masks.device,
                dtype=hidden_states_masks.dtype,
            )
            hidden_states_masks = torch.cat([hidden_states_masks, encoder_attention_mask_ones], dim=1)

        for bid, block in enumerate(self.single_stream_blocks):
            cur_llama31_encoder_hidden_states = encoder_hidden_states[block_id]
            hidden_states = torch.cat([hidden_states, cur_llama31_encoder_hidden_states], dim=1)
            hidden_states = block(
                hidden_states=hidden_states,
                hidden_states_masks=hidden_states_masks,
                encoder_hidden_states=None,
                temb=temb,
                image_rotary_emb=image_rotary_emb,
            )
            hidden_states = hidden_states[:, :hidden_states_seq_len]
            block_id += 1

        hidden_states = hidden_states[:, :image_tokens_seq_len, ...]
        self.previous_residual = hidden_states - ori_hidden_states

    output = self.final_layer(hidden_states, temb)
    output = self.unpatchify(output, img_sizes, self.training)

    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)


def enable(pipe_or_transformer, rel_l1_thresh: float, num_steps: int, model_type: str = "full", aliased: bool = False) -> TeaCache4HiDream:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return TeaCache4HiDream(transformer, rel_l1_thresh, num_steps, model_type, aliased)
