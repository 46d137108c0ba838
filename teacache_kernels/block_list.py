"""The block list of a transformer with TeaCache on: the same blocks, the same names, another iteration.

`install.py` swaps the class of the model's own `nn.ModuleList` for `CachedBlockList` (and back when
disabled), so every block stays registered where diffusers put it.
"""

from __future__ import annotations

from typing import Iterator

from torch import nn

YIELDS = "_teacache_yields"  # instance attribute of a CachedBlockList: what iterating it yields


class CachedBlockList(nn.ModuleList):
    """A transformer's block list while TeaCache is on: the same blocks under the same names.

    Only iteration differs: it yields what the installation put in `_teacache_yields` (the span, or
    nothing). Indexing, `len`, slicing, `named_modules` and `state_dict` see the real blocks.
    """

    def __iter__(self) -> Iterator[nn.Module]:
        yields = self.__dict__.get(YIELDS)
        return iter(yields) if yields is not None else iter(self._modules.values())

    def __repr__(self) -> str:
        return nn.ModuleList.__repr__(nn.ModuleList(self._modules.values()))


def original_blocks(blocks: nn.ModuleList) -> Iterator[nn.Module]:
    """The real blocks of a (possibly cached) block list, in order: what the span runs."""
    return iter(blocks._modules.values())


_cached_classes: dict[type, type] = {nn.ModuleList: CachedBlockList}


def cached_class(cls: type) -> type:
    # A model whose block list is a ModuleList subclass keeps its class's behaviour, with our iteration.
    if cls not in _cached_classes:
        _cached_classes[cls] = type(f"Cached{cls.__name__}", (CachedBlockList, cls), {})
    return _cached_classes[cls]


class PassThrough(nn.Module):
    """A module whose work the cached span took over (a family's `tail`): its call returns its input."""

    def forward(self, x, *args, **kwargs):
        return x


_pass_through_classes: dict[type, type] = {}


def pass_through_class(cls: type) -> type:
    if cls not in _pass_through_classes:
        _pass_through_classes[cls] = type(f"PassThrough{cls.__name__}", (PassThrough, cls), {})
    return _pass_through_classes[cls]
