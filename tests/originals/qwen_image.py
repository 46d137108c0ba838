"""vLLM-Omni's TeaCache for Qwen-Image (vllm-project/vllm-omni @ be81443c, vllm_omni/diffusion/cache/teacache/),
ported onto diffusers 0.42.1's QwenImageTransformer2DModel.

vLLM-Omni's `TeaCacheHook.new_forward` replaces the whole transformer forward: `extract_qwen_context` redoes
the preprocessing and computes the signal, the hook decides, runs the blocks or applies the residuals, and
the extractor's `postprocess` runs `norm_out`/`proj_out`. As written (hook.py):

    if module.do_true_cfg and self._forward_cnt % 2 == 1: cache_branch = "negative"
    else: cache_branch = "positive"
    ...
    # _should_compute_full_transformer
    if state.cnt == 0:
        state.accumulated_rel_l1_distance = 0.0
        return True
    if state.previous_modulated_input is None:
        return True
    rel_distance = ((modulated_inp - state.previous_modulated_input).abs().mean()
                    / (state.previous_modulated_input.abs().mean() + 1e-8)).cpu().item()
    rescaled_distance = float(self.rescale_func(rel_distance))       # np.poly1d(config.coefficients)
    state.accumulated_rel_l1_distance += abs(rescaled_distance)
    if state.accumulated_rel_l1_distance < self.config.rel_l1_thresh:
        return False  # Use cache
    else:
        state.accumulated_rel_l1_distance = 0.0  # Reset accumulator
        return True  # Compute
    ...
    if not should_compute and state.previous_residual is not None:
        ctx.hidden_states = ctx.hidden_states + state.previous_residual
        ctx.encoder_hidden_states = ctx.encoder_hidden_states + state.previous_residual_encoder
    else:
        ori_hidden_states = ctx.hidden_states.clone(); ori_encoder_hidden_states = ctx.encoder_hidden_states.clone()
        outputs = ctx.run_transformer_blocks()                # all transformer_blocks -> (h, e)
        state.previous_residual = (ctx.hidden_states - ori_hidden_states).detach()
        state.previous_residual_encoder = (ctx.encoder_hidden_states - ori_encoder_hidden_states).detach()
    state.previous_modulated_input = ctx.modulated_input.detach()
    state.cnt += 1
    self._forward_cnt += 1
    return ctx.postprocess(output)                           # norm_out(h, temb), proj_out

- the branch is the parity of the hook's call count when the pipeline set `transformer.do_true_cfg`
  (vLLM-Omni's Qwen pipelines do, before the positive call); each branch has a full state of its own;
- only the first call of each branch is forced (`cnt == 0`); nothing forces the last call (its guide says
  the first and last are computed; its code does not) and the hook does not know the step count;
- `refresh()` is what vLLM-Omni's worker does before each request (`cache_backend.refresh` ->
  `reset_hook("teacache")` -> `reset_state`: all branch states cleared, `_forward_cnt = 0`); the hook itself
  never notices a new generation.

The extractor, on diffusers' modules: the signal in the form of its first version (#179),
`_modulate(img_norm1(h), img_mod(temb).chunk(2, -1)[0])[0]` (HEAD calls vLLM-Omni's fused AdaLayerNorm,
the same values). diffusers 0.42.1 has no `txt_seq_lens`: the text length for RoPE and the mask the blocks
get are computed as diffusers' forward computes them (`compute_text_seq_len_from_mask`). `zero_cond_t`
models are not ported (the HEAD extractor ignores it; the tiny model does not use it).
vLLM-Omni runs Qwen-Image in bf16: its means are bf16 tensors before `.item()`, so its `+ 1e-8` vanishes.
"""

from __future__ import annotations

import numpy as np
import torch

from . import Recorder, bind_forward

COEFFICIENTS = [-4.50000000e02, 2.80000000e02, -4.50000000e01, 3.20000000e00, -2.00000000e-02]


class TeaCacheState:
    def __init__(self):
        self.cnt = 0
        self.accumulated_rel_l1_distance = 0.0
        self.previous_modulated_input = None
        self.previous_residual = None
        self.previous_residual_encoder = None


class TeaCacheHook(Recorder):
    """vLLM-Omni's hook: config, rescale function, per-branch states, call count."""

    def __init__(self, transformer, rel_l1_thresh: float = 0.2, coefficients=None):
        super().__init__()
        if rel_l1_thresh <= 0:  # vLLM-Omni's TeaCacheConfig.__post_init__
            raise ValueError(f"rel_l1_thresh must be positive, got {rel_l1_thresh}")
        assert not transformer.zero_cond_t, "zero_cond_t models are not ported"
        self.rel_l1_thresh = rel_l1_thresh
        self.rescale_func = np.poly1d(list(COEFFICIENTS if coefficients is None else coefficients))
        self.states: dict[str, TeaCacheState] = {}
        self._forward_cnt = 0
        self.transformer = transformer
        transformer.do_true_cfg = False  # vllm_omni/diffusion/cache/base.py sets it False; the pipeline sets it per request
        transformer._original_teacache = self
        bind_forward(transformer, teacache_forward)

    def refresh(self, do_true_cfg: bool) -> None:
        """Before a request: the worker's refresh (reset_state), and the pipeline setting `do_true_cfg`."""
        self.states.clear()
        self._forward_cnt = 0
        self.transformer.do_true_cfg = do_true_cfg

    def should_compute(self, state: TeaCacheState, modulated_inp: torch.Tensor, key: str) -> bool:
        cnt = state.cnt
        if state.cnt == 0:
            state.accumulated_rel_l1_distance = 0.0
            self._pending = (key, cnt, None, None, None, True)
            return True
        if state.previous_modulated_input is None:
            self._pending = (key, cnt, None, None, None, True)
            return True
        rel_distance = (
            ((modulated_inp - state.previous_modulated_input).abs().mean() / (state.previous_modulated_input.abs().mean() + 1e-8))
            .cpu()
            .item()
        )
        rescaled_distance = float(self.rescale_func(rel_distance))
        state.accumulated_rel_l1_distance += abs(rescaled_distance)
        self._pending = (key, cnt, rel_distance, abs(rescaled_distance), state.accumulated_rel_l1_distance, False)
        if state.accumulated_rel_l1_distance < self.rel_l1_thresh:
            return False
        else:
            state.accumulated_rel_l1_distance = 0.0
            return True


def teacache_forward(
    self,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor = None,
    encoder_hidden_states_mask: torch.Tensor = None,
    timestep: torch.Tensor = None,
    img_shapes=None,
    guidance: torch.Tensor = None,
    attention_kwargs=None,
    controlnet_block_samples=None,
    additional_t_cond=None,
    return_dict: bool = True,
):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask

    hook: TeaCacheHook = self._original_teacache
    module = self
    assert controlnet_block_samples is None, "not ported (vLLM-Omni has no ControlNet path)"

    # ---- extract_qwen_context: preprocessing ----
    hidden_states = module.img_in(hidden_states)
    timestep = timestep.to(device=hidden_states.device, dtype=hidden_states.dtype)
    encoder_hidden_states = module.txt_norm(encoder_hidden_states)
    encoder_hidden_states = module.txt_in(encoder_hidden_states)
    # diffusers 0.42.1 in place of vLLM-Omni's txt_seq_lens:
    text_seq_len, _, encoder_hidden_states_mask = compute_text_seq_len_from_mask(encoder_hidden_states, encoder_hidden_states_mask)

    if guidance is not None:
        guidance = guidance.to(hidden_states.dtype) * 1000

    temb = (
        module.time_text_embed(timestep, hidden_states, additional_t_cond)
        if guidance is None
        else module.time_text_embed(timestep, guidance, hidden_states, additional_t_cond)
    )

    image_rotary_emb = module.pos_embed(img_shapes, max_txt_seq_len=text_seq_len, device=hidden_states.device)

    # ---- extract_qwen_context: the modulated input ----
    block = module.transformer_blocks[0]
    img_mod_params = block.img_mod(temb)
    img_mod1, _ = img_mod_params.chunk(2, dim=-1)
    img_modulated, _ = block._modulate(block.img_norm1(hidden_states), img_mod1)

    def run_transformer_blocks():
        h = hidden_states
        e = encoder_hidden_states
        for block in module.transformer_blocks:
            e, h = block(
                hidden_states=h,
                encoder_hidden_states=e,
                encoder_hidden_states_mask=encoder_hidden_states_mask,
                temb=temb,
                image_rotary_emb=image_rotary_emb,
                joint_attention_kwargs=attention_kwargs,
            )
        return (h, e)

    def postprocess(h):
        h = module.norm_out(h, temb)
        output = module.proj_out(h)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    # ---- TeaCacheHook.new_forward ----
    if module.do_true_cfg and hook._forward_cnt % 2 == 1:
        cache_branch = "negative"
    else:
        cache_branch = "positive"
    context_name = f"teacache_{cache_branch}"
    state = hook.states.setdefault(context_name, TeaCacheState())

    should_compute = hook.should_compute(state, img_modulated, cache_branch)

    ctx_hidden_states, ctx_encoder_hidden_states = hidden_states, encoder_hidden_states
    if not should_compute and state.previous_residual is not None:
        ctx_hidden_states = ctx_hidden_states + state.previous_residual
        if state.previous_residual_encoder is not None and ctx_encoder_hidden_states is not None:
            ctx_encoder_hidden_states = ctx_encoder_hidden_states + state.previous_residual_encoder
        output = ctx_hidden_states
        computed = False
    else:
        ori_hidden_states = ctx_hidden_states.clone()
        ori_encoder_hidden_states = ctx_encoder_hidden_states.clone() if ctx_encoder_hidden_states is not None else None
        outputs = run_transformer_blocks()
        ctx_hidden_states = outputs[0]
        if len(outputs) > 1 and ctx_encoder_hidden_states is not None:
            ctx_encoder_hidden_states = outputs[1]
        state.previous_residual = (ctx_hidden_states - ori_hidden_states).detach()
        if ori_encoder_hidden_states is not None:
            state.previous_residual_encoder = (ctx_encoder_hidden_states - ori_encoder_hidden_states).detach()
        output = ctx_hidden_states
        computed = True

    state.previous_modulated_input = img_modulated.detach()
    state.cnt += 1
    hook._forward_cnt += 1

    key, cnt, x, y, candidate, forced = hook._pending
    hook.record(key, cnt, x, y, candidate, state.accumulated_rel_l1_distance, forced or (computed and not should_compute), computed)
    return postprocess(output)


def enable(pipe_or_transformer, rel_l1_thresh: float, **kwargs) -> TeaCacheHook:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return TeaCacheHook(transformer, rel_l1_thresh, **kwargs)
