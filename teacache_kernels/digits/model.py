"""The embedded model's architecture and its input/output layout.

A real diffusers `FluxTransformer2DModel`, so the FLUX cached forward applies unchanged. The images
are scikit-learn's 8x8 handwritten digits (values 0-16, scaled to [-1, 1]), packed like FLUX latents:
2x2 patches, so 16 image tokens of 4 channels. The "prompt" is the digit: a one-hot text token (and the
same one-hot as the pooled projection) over 10 classes plus a null class for classifier-free guidance,
so the model's own `context_embedder` learns the class embedding and nothing lives outside it.
"""

from __future__ import annotations

import torch

IMAGE_SIZE = 8  # pixels per side, as the dataset ships them
PATCH = 2  # FLUX packs 2x2 patches of the latent
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the unconditional "prompt" for classifier-free guidance
TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 16
CHANNELS = PATCH * PATCH  # 4

CONFIG = dict(
    patch_size=1,
    in_channels=CHANNELS,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=NUM_CLASSES + 1,
    pooled_projection_dim=NUM_CLASSES + 1,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)


def build_transformer(seed: int = 0):
    """The architecture with fresh random weights (what training starts from)."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(**CONFIG)


def pack(images: torch.Tensor) -> torch.Tensor:
    """[B, 8, 8] images -> [B, 16, 4] tokens, FLUX's 2x2 packing (row-major patches)."""
    b = images.shape[0]
    g = IMAGE_SIZE // PATCH
    x = images.reshape(b, g, PATCH, g, PATCH).permute(0, 1, 3, 2, 4)
    return x.reshape(b, TOKENS, CHANNELS)


def unpack(tokens: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack`."""
    b = tokens.shape[0]
    g = IMAGE_SIZE // PATCH
    x = tokens.reshape(b, g, g, PATCH, PATCH).permute(0, 1, 3, 2, 4)
    return x.reshape(b, IMAGE_SIZE, IMAGE_SIZE)


def image_ids(device=None) -> torch.Tensor:
    """FLUX's per-token (0, row, col) positions for the rotary embedding."""
    g = IMAGE_SIZE // PATCH
    ids = torch.zeros(g, g, 3, device=device)
    ids[..., 1] = torch.arange(g, device=device)[:, None]
    ids[..., 2] = torch.arange(g, device=device)[None, :]
    return ids.reshape(TOKENS, 3)


def conditioning(labels: torch.Tensor, dtype=torch.float32) -> dict:
    """Transformer kwargs for a batch of class labels (NULL_CLASS for the unconditional branch)."""
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels > NULL_CLASS)]  # host-ok: once per generation, before the steps
    if bad.numel():
        raise ValueError(f"labels must be digits 0-9 (or {NULL_CLASS} for unconditional), got {bad.tolist()}")  # host-ok: error path
    one_hot = torch.nn.functional.one_hot(labels.long(), NUM_CLASSES + 1).to(dtype)
    return dict(
        encoder_hidden_states=one_hot[:, None, :],
        pooled_projections=one_hot,
        img_ids=image_ids(labels.device),
        txt_ids=torch.zeros(1, 3, device=labels.device),
    )
