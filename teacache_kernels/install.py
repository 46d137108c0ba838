"""Put a cached span into a transformer, and take it out again leaving the model exactly as it was.

What enabling changes on the transformer (and disabling undoes):
  - its block lists: the first holds the span (which holds the original lists), the others are empty;
    the transformer's own forward runs unchanged and calls the span once. No forward is copied.
  - `state_dict()` / `load_state_dict()` keep the original key names (hooks map them), so a checkpoint
    saved while TeaCache is on loads into a plain model and back.
  - `cache_context(name)`, which diffusers pipelines call around each CFG branch, also selects the
    cache's per-context state.
  - a forward pre-hook refuses inputs the cached span cannot honour, naming them.
Module names (`named_modules()`) do change while enabled: load LoRAs and set attention processors
before enabling TeaCache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .models import ModelFamily


@dataclass
class Installation:
    transformer: nn.Module
    family: ModelFamily
    cache: Any  # FusedCache or ReferenceCache
    original_lists: dict[str, nn.ModuleList]
    handles: list = field(default_factory=list)
    pipeline: Any = None
    scheduler: Any = None  # the scheduler whose methods were patched (the pipeline's may be swapped later)
    scheduler_patches: dict[str, Any] = field(default_factory=dict)  # method name -> instance attribute it shadowed
    user_config: Any = None  # the TeaCacheConfig as given; enabling again updates it
    on_context_entry: Any = None  # called (host side) whenever cache_context is entered
    shadowed_cache_context: Any = None  # an instance attribute `cache_context` we shadowed, if any


def _span_prefix(family: ModelFamily) -> str:
    return f"{family.block_lists[0]}.0."


def install(transformer: nn.Module, family: ModelFamily, cache) -> Installation:
    lists = {name: getattr(transformer, name, None) for name in family.block_lists}
    for name, blocks in lists.items():
        if not isinstance(blocks, nn.ModuleList) or (name == family.block_lists[0] and len(blocks) == 0):
            raise ValueError(f"{type(transformer).__name__}.{name} should be the model's nn.ModuleList of blocks, got {blocks!r:.80}")
    span = family.span_class(*lists.values(), cache=cache)
    inst = Installation(transformer, family, cache, lists)

    first, *rest = family.block_lists
    setattr(transformer, first, nn.ModuleList([span]))
    for name in rest:
        setattr(transformer, name, nn.ModuleList())

    prefix = _span_prefix(family)

    def canonical_keys(module, state_dict, sd_prefix, local_metadata):
        inner = sd_prefix + prefix
        items = list(state_dict.items())  # rebuilt in order: renamed keys keep their original position
        state_dict.clear()
        for key, value in items:
            state_dict[sd_prefix + key[len(inner) :] if key.startswith(inner) else key] = value

    def span_keys(module, state_dict, sd_prefix, *args):
        inner = sd_prefix + prefix
        for key in list(state_dict):
            if not key.startswith(sd_prefix):
                continue
            rest = key[len(sd_prefix) :]
            if key.startswith(inner) and rest[len(prefix) :].split(".", 1)[0] in family.block_lists:
                continue  # already names a block inside the span
            if rest.split(".", 1)[0] in family.block_lists:
                state_dict[inner + rest] = state_dict.pop(key)

    def refuse_unsupported(module, args, kwargs):
        what = family.unsupported_input(args, kwargs)
        if what is not None:
            raise NotImplementedError(
                f"TeaCache for {type(module).__name__} does not support {what} yet; "
                "call teacache_kernels.disable_teacache() to run this input uncached"
            )

    inst.handles = [
        transformer.register_state_dict_post_hook(canonical_keys),
        transformer.register_load_state_dict_pre_hook(span_keys),
        transformer.register_forward_pre_hook(refuse_unsupported, with_kwargs=True),
    ]
    _route_cache_context(inst)
    transformer._teacache = inst
    return inst


def _route_cache_context(inst: Installation) -> None:
    transformer, cache = inst.transformer, inst.cache
    original = getattr(transformer, "cache_context", None)  # diffusers' CacheMixin.cache_context, if any
    inst.shadowed_cache_context = vars(transformer).get("cache_context")

    @contextlib.contextmanager
    def cache_context(name: str, **kwargs):
        if inst.on_context_entry is not None:
            inst.on_context_entry()
        with original(name, **kwargs) if original is not None else contextlib.nullcontext():
            previous = cache.activate(name)
            try:
                yield
            finally:
                cache.activate(previous)

    # An instance attribute shadows the class's method; uninstall restores what was there. A compiled
    # module (OptimizedModule) forwards attribute lookups to the original, so pipelines reach this too.
    transformer.cache_context = cache_context


def unpatch_scheduler(inst: Installation) -> None:
    for method, shadowed in inst.scheduler_patches.items():
        delattr(inst.scheduler, method)
        if shadowed is not None:
            setattr(inst.scheduler, method, shadowed)
    inst.scheduler_patches = {}


def uninstall(inst: Installation) -> None:
    t = inst.transformer
    for name, blocks in inst.original_lists.items():
        setattr(t, name, blocks)
    for h in inst.handles:
        h.remove()
    del t.cache_context
    if inst.shadowed_cache_context is not None:
        t.cache_context = inst.shadowed_cache_context
    unpatch_scheduler(inst)
    del t._teacache
