"""enable_teacache / disable_teacache / reset_teacache / summary: the public entry points."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .config import ResolvedConfig, TeaCacheConfig
from .follow import follow, with_steps


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


def enable_teacache(
    pipe_or_transformer: Any,
    config: TeaCacheConfig | None = None,
    *,
    reference: bool | None = None,
    transformer_2: TeaCacheConfig | dict | None = None,
    process_group: Any = "auto",
    **fields,
):
    """Turn TeaCache on for a diffusers pipeline or transformer. Returns its argument.

    `config` and/or keyword fields of `TeaCacheConfig` (keywords override `config`). On a pipeline,
    `num_inference_steps` is learned from its scheduler at every call, and each call starts a new
    generation. On a bare transformer, `num_inference_steps` is required: the step counter wraps at it.
    Calling it again on an enabled model updates the config in place (no recompilation).
    `reference=True` runs the eager oracle (`reference.ReferenceCache`) instead of the fused ops; unset, enabling
    again keeps the implementation the model has (the fused ops on a first enable).
    Enable before `torch.compile`. Module and parameter names do not change: LoRAs, attention processors,
    offloading and layerwise casting work the same before or after enabling (README, "While enabled").

    A pipeline with two transformers (Wan 2.2: `transformer` for the high-noise steps, `transformer_2` for
    the low-noise ones) gets TeaCache on both, each with its own state, forced calls and step count (the
    steps it runs, from the scheduler and the pipeline's `boundary_ratio`). `transformer_2`: fields (a dict)
    or a whole `TeaCacheConfig` for the second one, e.g. its own `rel_l1_thresh` or `coefficients`.

    A model you calibrated yourself: `enable_teacache(pipe, coefficients_file="my_model.teacache.json")`
    (written by `python -m teacache_kernels calibrate`): each CFG context uses the set fitted at the
    sequence length nearest its own, and that set's recommended threshold unless `rel_l1_thresh` is given.

    Many GPUs (README, "Many GPUs"): `process_group` is the group of ranks that split the sequence (context
    parallelism), over which each decision sums its signal's partial sums so that every rank decides alike.
    "auto" (the default) takes it from the transformer's diffusers parallel config, now or when
    `enable_parallelism` runs later; give a ProcessGroup (or a 1-D DeviceMesh) for other frameworks (xDiT).
    Every rank of the group must enable with the same settings: that is checked here, collectively.
    """
    pipeline, transformer = _split(pipe_or_transformer)
    second = _second_transformer(pipeline)
    if transformer_2 is not None and second is None:
        raise ValueError(f"transformer_2={transformer_2!r} was given, but {type(pipe_or_transformer).__name__} has no transformer_2")
    if transformer_2 is not None and not isinstance(transformer_2, (dict, TeaCacheConfig)):
        raise TypeError(f"transformer_2 must be a dict of TeaCacheConfig fields or a TeaCacheConfig, got {type(transformer_2).__name__}")
    staged = second is not None and getattr(pipeline.config, "boundary_ratio", None) is not None
    plans = [_plan(pipeline, transformer, config, fields, "high" if staged else None)]
    if second is not None:
        config_2, fields_2 = (transformer_2, {}) if isinstance(transformer_2, TeaCacheConfig) else (config, {**fields, **(transformer_2 or {})})
        plans.append(_plan(pipeline, second, config_2, fields_2, "low" if staged else None))
    for plan in plans:  # every transformer's config is valid: now change the models
        _apply(*plan, reference=reference, process_group=process_group)
    return pipe_or_transformer


def _second_transformer(pipeline) -> nn.Module | None:
    second = getattr(pipeline, "transformer_2", None) if pipeline is not None else None
    return _unwrap(second) if isinstance(second, nn.Module) else None


def _plan(pipeline, transformer: nn.Module, config: TeaCacheConfig | None, fields: dict, stage: str | None) -> tuple:
    """Validate enabling `transformer`: (pipeline, transformer, installation or None, family, config, resolved, stage)."""
    from .models import family_for

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
            "only until the next one", stacklevel=3
        )  # fmt: skip
    family = inst.family if inst is not None else family_for(transformer)
    reason = family.unsupported_pipeline(pipeline) if pipeline is not None else None
    if reason is not None:
        raise NotImplementedError(f"TeaCache cannot serve {type(pipeline).__name__}: {reason}")
    chosen = config.coefficients is not None or config.coefficients_file is not None
    resolved = ResolvedConfig.resolve(config, None if chosen else family.coefficients_for(transformer, pipeline))
    _check_signal(resolved, family)
    if inst is not None and inst.pipeline is not None:  # the scheduler's step count stands until it is set again
        resolved = with_steps(resolved, inst.cache.config.num_inference_steps)
    return pipeline, transformer, inst, family, config, resolved, stage


def _apply(pipeline, transformer, inst, family, config, resolved, stage, *, reference: bool | None, process_group: Any) -> None:
    from .cached_forward import FusedCache
    from .install import install, uninstall
    from .reference import ReferenceCache

    if inst is not None and reference is not None and isinstance(inst.cache, ReferenceCache) != reference:
        uninstall(inst)  # switching implementation: start over, same pipeline and step count
        inst = None
    fresh = inst is None
    if inst is not None:
        inst.cache.set_config(resolved)
        inst.cache.reset()
    else:
        inst = install(transformer, family, ReferenceCache(resolved) if reference else FusedCache(resolved))  # None: fused
    inst.user_config = config
    inst.process_group = process_group
    try:
        inst.join_group()  # many GPUs: the ranks that split the sequence must agree (a collective)
    except Exception:
        if fresh:
            uninstall(inst)  # the model as it was: nothing half-enabled
        raise
    if pipeline is not None and inst.pipeline is None:
        inst.stage = stage
        follow(inst, pipeline)


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
    from .coefficients import PUBLISHED

    if resolved.signal in family.signals:
        return
    if resolved.calibrated:
        what = "the coefficients file was fitted on"
    elif resolved.coefficient_set is not None and PUBLISHED[resolved.coefficient_set].runtime_signal is not None:
        what = f"the coefficient set {resolved.coefficient_set!r} was fitted on"
    else:
        return  # a set that names no signal: the family's own
    raise ValueError(
        f"{what} the signal {resolved.signal!r}, which TeaCache's {family.name} span does not compute; "
        f"it computes {sorted(family.signals)}"
    )


def disable_teacache(pipe_or_transformer: Any):
    """Turn TeaCache off: the model(s) (and scheduler) are exactly as before enabling. No-op if it was off."""
    from .install import uninstall

    for _, transformer in reversed(_transformers(pipe_or_transformer)):
        inst = getattr(transformer, "_teacache", None)
        if inst is not None:
            uninstall(inst)
    return pipe_or_transformer


def reset_teacache(pipe_or_transformer: Any, num_inference_steps: int | None = None) -> None:
    """Start a new generation now (for hand-written loops), optionally with a new step count."""
    for _, inst in _installations(pipe_or_transformer):
        if num_inference_steps is not None:
            inst.user_config = inst.user_config.replace(num_inference_steps=num_inference_steps)  # validates
            inst.cache.set_config(with_steps(inst.cache.config, num_inference_steps))
        inst.cache.reset()
        inst.check_ranks_agree()  # many GPUs: the same step count on every rank


def summary(pipe_or_transformer: Any):
    """Which calls ran the blocks and which reused the residual, per CFG context, and the cache's memory (see
    report.Summary). A pipeline with TeaCache on two transformers (Wan 2.2): a `report.StagedSummary` of both."""
    from .report import StagedSummary, Summary

    installations = _installations(pipe_or_transformer)
    if len(installations) == 1:
        return Summary.of(installations[0][1])
    return StagedSummary({name: Summary.of(inst) for name, inst in installations})


def _transformers(pipe_or_transformer: Any) -> list[tuple[str, nn.Module]]:
    """(attribute, transformer) of a pipeline's transformers (`transformer`, and `transformer_2` if it has one), or
    ("transformer", it) for a transformer."""
    pipeline, transformer = _split(pipe_or_transformer)
    second = _second_transformer(pipeline)
    return [("transformer", transformer)] + ([("transformer_2", second)] if second is not None else [])


def _installations(pipe_or_transformer: Any) -> list[tuple[str, Any]]:
    found = [(name, getattr(t, "_teacache", None)) for name, t in _transformers(pipe_or_transformer)]
    found = [(name, inst) for name, inst in found if inst is not None]
    if not found:
        _, transformer = _split(pipe_or_transformer)
        raise RuntimeError(f"TeaCache is not enabled on this {type(transformer).__name__}; call enable_teacache first")
    return found
