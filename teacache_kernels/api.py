"""enable_teacache / disable_teacache / reset_teacache / summary: the public entry points."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

from torch import nn

from .config import ResolvedConfig, TeaCacheConfig


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)  # a torch.compile'd module wraps the original


def _split(obj: Any) -> tuple[Any, nn.Module]:
    """(pipeline or None, transformer) for a diffusers pipeline, a transformer or a compiled transformer."""
    if isinstance(obj, nn.Module):
        return None, _unwrap(obj)
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, nn.Module) and hasattr(obj, "scheduler"):
        return obj, _unwrap(transformer)
    raise TypeError(
        f"expected a diffusers pipeline with a .transformer, or a transformer module; got {type(obj).__name__}"
    )


def enable_teacache(pipe_or_transformer: Any, config: TeaCacheConfig | None = None, *, reference: bool = False, **fields):
    """Turn TeaCache on for a diffusers pipeline or transformer. Returns its argument.

    `config` and/or keyword fields of `TeaCacheConfig` (keywords override `config`). On a pipeline,
    `num_inference_steps` is learned from its scheduler at every call, and each call starts a new
    generation. On a bare transformer, `num_inference_steps` is required: the step counter wraps at it.
    Calling it again on an enabled model updates the config in place (no recompilation).
    `reference=True` runs the eager oracle (`reference.ReferenceCache`) instead of the fused ops.
    Enable before `torch.compile`. Module and parameter names do not change: LoRAs, attention processors,
    offloading and layerwise casting work the same before or after enabling (README, "While enabled").

    A model you calibrated yourself: `enable_teacache(pipe, coefficients_file="my_model.teacache.json")`
    (written by `python -m teacache_kernels calibrate`): each CFG context uses the set fitted at the
    sequence length nearest its own, and that set's recommended threshold unless `rel_l1_thresh` is given.
    """
    from .cached_forward import FusedCache
    from .install import install, uninstall
    from .models import family_for
    from .reference import ReferenceCache

    pipeline, transformer = _split(pipe_or_transformer)
    inst = getattr(transformer, "_teacache", None)
    other = _other_cache(transformer) if inst is None else None
    if other is not None:
        raise RuntimeError(
            f"cannot enable TeaCache on this {type(transformer).__name__}: diffusers' {other} is already enabled on it, "
            "and the two would skip the same work; call transformer.disable_cache() first"
        )
    # Enabling again updates: fields not given keep their current values.
    config = TeaCacheConfig.from_fields(config or (inst.user_config if inst is not None else None), fields)
    pipeline = pipeline or (inst.pipeline if inst is not None else None)
    if pipeline is None and config.num_inference_steps is None:
        raise ValueError(
            "num_inference_steps is required when enabling TeaCache on a bare transformer "
            "(it forces the last step and starts a new generation); a pipeline supplies it from its scheduler"
        )
    if pipeline is not None and "num_inference_steps" in fields:
        warnings.warn(
            "num_inference_steps is learned from the pipeline's scheduler at every call; the value given is used "
            "only until the next one", stacklevel=2
        )  # fmt: skip
    family = inst.family if inst is not None else family_for(transformer)
    resolved = ResolvedConfig.resolve(config, family.coefficients_for(transformer, pipeline))
    _check_signal(resolved, family)
    if inst is not None and inst.pipeline is not None:  # the scheduler's step count stands until it is set again
        resolved = _with_steps(resolved, inst.cache.config.num_inference_steps)

    # Everything is validated: now change the model.
    if inst is not None and isinstance(inst.cache, ReferenceCache) != reference:
        uninstall(inst)  # switching implementation: start over, same pipeline and step count
        inst = None
    if inst is not None:
        inst.cache.set_config(resolved)
        inst.cache.reset()
    else:
        inst = install(transformer, family, ReferenceCache(resolved) if reference else FusedCache(resolved))
    inst.user_config = config
    if pipeline is not None and inst.pipeline is None:
        _follow_scheduler(inst, pipeline)
    return pipe_or_transformer


# Hooks diffusers' caches register (diffusers/hooks/*.py), for caches applied without `enable_cache`.
_CACHE_HOOKS = (
    "faster_cache", "fbc_", "mag_cache", "pyramid_attention_broadcast", "sea_cache", "taylorseer_cache", "text_kv_cache",
)  # fmt: skip


def _other_cache(transformer: nn.Module) -> str | None:
    """The name of a diffusers cache enabled on `transformer` (by enable_cache or a hook function), or None."""
    config = getattr(transformer, "_cache_config", None)
    if config is not None:
        return type(config).__name__
    for name, module in transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}):
            if hook.startswith(_CACHE_HOOKS):
                return f"cache hook {hook!r} on {name or 'the transformer'}"
    return None


def _check_signal(resolved: ResolvedConfig, family) -> None:
    if resolved.calibrated and resolved.signal not in family.signals:
        raise ValueError(
            f"the coefficients file was fitted on the signal {resolved.signal!r}, which TeaCache's {family.name} span "
            f"does not compute; it computes {sorted(family.signals)}"
        )


def _follow_scheduler(inst, pipeline) -> None:
    """Learn num_inference_steps from the scheduler and start a new generation whenever it is set.

    Pipelines set the scheduler's timesteps before their first transformer call, so patching
    `set_timesteps` (and `set_begin_index`, which img2img pipelines call to skip steps) sees every
    generation start. If the pipeline's scheduler is replaced later, the next `cache_context` entry
    (host side, before the first transformer call of that generation) follows the new one.
    """
    scheduler = pipeline.scheduler
    inst.pipeline, inst.scheduler = pipeline, scheduler
    for method in ("set_timesteps", "set_begin_index"):
        original = getattr(scheduler, method, None)
        if original is None:
            continue

        # functools.wraps keeps the signature: pipelines inspect set_timesteps for `sigmas`/`timesteps`.
        @functools.wraps(original)
        def patched(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            _new_generation(inst)
            return result

        inst.scheduler_patches[method] = scheduler.__dict__.get(method)
        setattr(scheduler, method, patched)

    def follow_a_replaced_scheduler():
        if pipeline.scheduler is not inst.scheduler:
            from .install import unpatch_scheduler

            unpatch_scheduler(inst)
            _follow_scheduler(inst, pipeline)
            if getattr(pipeline.scheduler, "timesteps", None) is not None:  # already set for this generation
                _new_generation(inst)

    inst.on_context_entry = follow_a_replaced_scheduler


def _new_generation(inst) -> None:
    """Reset the state, and count this generation's transformer calls from the followed scheduler."""
    scheduler = inst.scheduler
    calls = len(scheduler.timesteps) - (getattr(scheduler, "begin_index", None) or 0)
    inst.cache.set_config(_with_steps(inst.cache.config, calls))
    inst.cache.reset()


def _with_steps(config: ResolvedConfig, steps: int | None) -> ResolvedConfig:
    return dataclasses.replace(config, num_inference_steps=None if steps is None else max(1, steps))


def disable_teacache(pipe_or_transformer: Any):
    """Turn TeaCache off: the model (and scheduler) are exactly as before enabling. No-op if it was off."""
    from .install import uninstall

    _, transformer = _split(pipe_or_transformer)
    inst = getattr(transformer, "_teacache", None)
    if inst is not None:
        uninstall(inst)
    return pipe_or_transformer


def reset_teacache(pipe_or_transformer: Any, num_inference_steps: int | None = None) -> None:
    """Start a new generation now (for hand-written loops), optionally with a new step count."""
    inst = _installation(pipe_or_transformer)
    if num_inference_steps is not None:
        inst.user_config = inst.user_config.replace(num_inference_steps=num_inference_steps)  # validates
        inst.cache.set_config(_with_steps(inst.cache.config, num_inference_steps))
    inst.cache.reset()


def summary(pipe_or_transformer: Any):
    """Which calls ran the blocks and which reused the residual, per CFG context (see report.Summary)."""
    from .report import Summary

    return Summary.of(_installation(pipe_or_transformer))


def _installation(pipe_or_transformer: Any):
    _, transformer = _split(pipe_or_transformer)
    inst = getattr(transformer, "_teacache", None)
    if inst is None:
        raise RuntimeError(f"TeaCache is not enabled on this {type(transformer).__name__}; call enable_teacache first")
    return inst
