"""A tiny random-weight HiDream-I1: HiDreamImageTransformer2DModel, AutoencoderKL and the real HiDreamImagePipeline.

The pipeline batches uncond and cond into one transformer call per step (guidance_scale > 1) and sets no cache
context: one state, "default". The transformer is HiDream's layout in small: double- then single-stream blocks
with MoE feed-forwards, one caption projection per block, each fed another layer of the Llama stack
(`llama_layers`), plus the T5 one. `experts=0` builds plain feed-forwards: diffusers' MoE inference reads expert
counts on the host (`bincount().cpu().numpy()`), which no torch.compile(fullgraph=True) traces, so the compile
tests use that variant.

HiDreamImagePipeline scales every request to the area of `default_sample_size * vae_scale_factor` squared (1024 x
1024 for the real model); the tiny pipeline sets it to 8 (16 x 16 pixels, 8 x 8 latents, 16 image tokens).

One departure from plain random weights, for the schedules' sake: the timestep embedder's last bias is offset by
`T_OFFSET`. With diffusers' default init, `t_embedder`'s output (what the hidream-full set compares) moves 30-90%
a call over 10 steps, where that set's polynomial is deep negative (it is fitted below ~0.07): every call would
reuse at any threshold. Offset, it moves 1-2% a call and the published thresholds compute some calls and reuse
others. It is still a random model: mechanics, not quality.
"""

from __future__ import annotations

import torch

from .common import _forked, _randn

T5_DIM, LLAMA_DIM, POOLED_DIM = 16, 12, 8
LLAMA_STACK = 4  # layers of the (random) Llama hidden-state stack the pipeline hands the transformer
MAX_RESOLUTION = (8, 8)  # latent pixels: max_seq = 16 tokens, what non-square latents are padded to
T_OFFSET = 5.0


def transformer(seed: int = 0, experts: int = 2, **config):
    from diffusers import HiDreamImageTransformer2DModel

    args = dict(patch_size=2, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                caption_channels=[T5_DIM, LLAMA_DIM], text_emb_dim=POOLED_DIM, num_routed_experts=experts,
                num_activated_experts=min(experts, 1), axes_dims_rope=(4, 2, 2), max_resolution=MAX_RESOLUTION,
                llama_layers=[3, 1, 0, 2])  # fmt: skip

    def build():
        model = HiDreamImageTransformer2DModel(**{**args, **config}).eval()
        with torch.no_grad():
            model.t_embedder.timestep_embedder.linear_2.bias.add_(T_OFFSET)
        return model

    return _forked(seed, build)


def pipeline(seed: int = 0, **config):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline

    vae = _forked(seed + 1, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.3611, shift_factor=0.1159).eval())  # fmt: skip
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, text_encoder_4=None,
        tokenizer_4=None, transformer=transformer(seed, **config))  # fmt: skip
    pipe.default_sample_size = 8
    return pipe


def prompt(seed: int) -> dict:
    """One prompt's embeddings as encode_prompt returns them (the Llama ones: a [layers, batch, tokens, dim] stack)."""
    return dict(t5=_randn(1, 6, T5_DIM, seed=seed), llama3=_randn(LLAMA_STACK, 1, 5, LLAMA_DIM, seed=seed + 1),
                pooled=_randn(1, POOLED_DIM, seed=seed + 2))  # fmt: skip


def generate(pipe, steps: int, cfg: bool = True, **kw):
    """Final latents. cfg=True: guidance_scale 5 (HiDream-I1-Full), one batched call per step; cfg=False:
    guidance_scale 0 (Dev, Fast), one conditional call per step."""
    cond, uncond = prompt(2), prompt(12)
    kw = {"height": 16, "width": 16, **kw}
    return pipe(prompt_embeds_t5=cond["t5"], prompt_embeds_llama3=cond["llama3"], pooled_prompt_embeds=cond["pooled"],
                negative_prompt_embeds_t5=uncond["t5"], negative_prompt_embeds_llama3=uncond["llama3"],
                negative_pooled_prompt_embeds=uncond["pooled"], guidance_scale=5.0 if cfg else 0.0,
                num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images  # fmt: skip


def transformer_call(seed: int = 1, height: int = 8, width: int = 8) -> dict:
    # Batch 2 (uncond, cond), as the pipeline calls it with CFG; non-square latents take the masked path.
    uncond, cond = prompt(12), prompt(2)
    return dict(hidden_states=_randn(2, 4, height, width, seed=seed), timesteps=torch.tensor([700.0, 700.0]),
                encoder_hidden_states_t5=torch.cat([uncond["t5"], cond["t5"]]),
                encoder_hidden_states_llama3=torch.cat([uncond["llama3"], cond["llama3"]], dim=1),
                pooled_embeds=torch.cat([uncond["pooled"], cond["pooled"]]), return_dict=False)  # fmt: skip
