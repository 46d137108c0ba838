"""Registry of supported transformer families, keyed by diffusers class name."""

from __future__ import annotations

from torch import nn

from .base import BlockSpan, ModelFamily
from .cogvideox import COGVIDEOX
from .cosmos import COSMOS
from .flux import FLUX
from .hidream import HIDREAM
from .hunyuan_video import HUNYUAN_VIDEO, HUNYUAN_VIDEO_15, HUNYUAN_VIDEO_FRAMEPACK
from .ltx_video import LTX_VIDEO
from .lumina2 import LUMINA2
from .mochi import MOCHI
from .qwen_image import QWEN_IMAGE
from .wan import WAN

BUILT_IN = (FLUX, QWEN_IMAGE, LUMINA2, COGVIDEOX, MOCHI, HUNYUAN_VIDEO, HUNYUAN_VIDEO_FRAMEPACK, HUNYUAN_VIDEO_15,
            LTX_VIDEO, COSMOS, WAN, HIDREAM)  # fmt: skip
FAMILIES: dict[str, ModelFamily] = {cls: fam for fam in BUILT_IN for cls in fam.class_names}

# Classes of a served model's kin that TeaCache refuses, and why (a registered family of the class wins).
REFUSED: dict[str, str] = {
    "WanVACETransformer3DModel": "its forward adds VACE control hints after some blocks, inside its own block loop, "
    "where a cached span cannot apply them",
    "WanAnimateTransformer3DModel": "no TeaCache coefficients or signal were published for Wan-Animate",
    "WanAnimate2Transformer3DModel": "no TeaCache coefficients or signal were published for Wan-Animate",
}


def register_model(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Make `enable_teacache` serve the classes `family.class_names` (docs/adding_a_model.md). Returns `family`.

    A class already served by a family of another name is an error unless `replace=True`; registering a
    family of the same name again (a re-run notebook cell, a reloaded module) replaces it.
    """
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_model takes a teacache_kernels.ModelFamily, got {type(family).__name__}")
    taken = {c: FAMILIES[c].name for c in family.class_names if c in FAMILIES and FAMILIES[c].name != family.name}
    if taken and not replace:
        raise ValueError(f"{taken} already registered (class -> family); pass replace=True to override")
    for cls in family.class_names:
        FAMILIES[cls] = family
    return family


def family_for(transformer: nn.Module) -> ModelFamily:
    """The family of `transformer`'s class (or of the nearest registered base class)."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
        if cls.__name__ in REFUSED:
            raise NotImplementedError(f"TeaCache does not support {cls.__name__}: {REFUSED[cls.__name__]}")
    raise NotImplementedError(
        f"TeaCache is not supported for {type(transformer).__name__} yet; supported classes: "
        f"{', '.join(sorted(FAMILIES))}. To add it, register its block lists and signal with "
        "teacache_kernels.register_model(ModelFamily(...)): see docs/adding_a_model.md"
    )


__all__ = ["BUILT_IN", "FAMILIES", "REFUSED", "BlockSpan", "ModelFamily", "family_for", "register_model"]
