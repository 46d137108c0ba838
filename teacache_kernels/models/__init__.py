"""Registry of supported transformer families, keyed by diffusers class name."""

from __future__ import annotations

from torch import nn

from .base import ModelFamily
from .flux import FLUX

FAMILIES: dict[str, ModelFamily] = {cls: fam for fam in (FLUX,) for cls in fam.class_names}


def family_for(transformer: nn.Module) -> ModelFamily:
    """The family of `transformer`'s class (or of the nearest supported base class)."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise NotImplementedError(
        f"TeaCache is not supported for {type(transformer).__name__} yet; supported classes: "
        f"{', '.join(sorted(FAMILIES))}"
    )


__all__ = ["FAMILIES", "ModelFamily", "family_for"]
