"""Learning each generation's start and step count from a pipeline's scheduler, for every enabled transformer.

Pipelines set the scheduler's timesteps before their first transformer call, so patching `set_timesteps`
(and `set_begin_index`, which img2img pipelines call to skip steps) sees every generation start. A
scheduler is patched once, however many transformers follow it (Wan 2.2's `transformer` and
`transformer_2`): the patch calls every follower, and the last follower to leave restores the scheduler.

A transformer that runs only part of a generation (Wan 2.2: `transformer` the steps whose timestep is at
or above `boundary_ratio * num_train_timesteps`, `transformer_2` the rest) has a `stage`; its step count is
the steps of its part, and `step_offset` the generation's step index of its first call.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

_FOLLOWERS = "_teacache_followers"  # the scheduler's instance attribute holding its Followers
_METHODS = ("set_timesteps", "set_begin_index")


@dataclass
class Followers:
    installations: list = field(default_factory=list)
    shadowed: dict[str, Any] = field(default_factory=dict)  # method -> the instance attribute it shadowed, or None


def follow(inst, pipeline) -> None:
    """Make `inst` start a new generation, with the right step count, whenever `pipeline.scheduler` is set."""
    scheduler = pipeline.scheduler
    inst.pipeline, inst.scheduler = pipeline, scheduler
    followers = scheduler.__dict__.get(_FOLLOWERS)
    if followers is None:
        followers = Followers()
        for method in _METHODS:
            original = getattr(scheduler, method, None)
            if original is None:
                continue

            # functools.wraps keeps the signature: pipelines inspect set_timesteps for `sigmas`/`timesteps`.
            @functools.wraps(original)
            def patched(*args, _original=original, _followers=followers, **kwargs):
                result = _original(*args, **kwargs)
                for follower in list(_followers.installations):
                    new_generation(follower)
                return result

            followers.shadowed[method] = scheduler.__dict__.get(method)
            setattr(scheduler, method, patched)
        setattr(scheduler, _FOLLOWERS, followers)
    followers.installations.append(inst)

    def follow_a_replaced_scheduler():
        # Host side, at each cache_context entry: if the pipeline's scheduler was swapped, follow the new one.
        if pipeline.scheduler is not inst.scheduler:
            unfollow(inst)
            follow(inst, pipeline)
            if getattr(pipeline.scheduler, "timesteps", None) is not None:  # already set for this generation
                new_generation(inst)

    inst.on_context_entry = follow_a_replaced_scheduler


def unfollow(inst) -> None:
    scheduler = inst.scheduler
    followers = scheduler.__dict__.get(_FOLLOWERS) if scheduler is not None else None
    inst.scheduler = inst.on_context_entry = None
    if followers is None or inst not in followers.installations:
        return
    followers.installations.remove(inst)
    if not followers.installations:  # the last one out restores the scheduler
        for method, shadowed in followers.shadowed.items():
            delattr(scheduler, method)
            if shadowed is not None:
                setattr(scheduler, method, shadowed)
        delattr(scheduler, _FOLLOWERS)


def stage_steps(inst) -> tuple[int, int]:
    """(step offset, calls) of `inst`'s transformer in the generation the followed scheduler was set up for."""
    scheduler = inst.scheduler
    timesteps = scheduler.timesteps[getattr(scheduler, "begin_index", None) or 0 :]
    if inst.stage is None:
        return 0, len(timesteps)
    boundary = inst.pipeline.config.boundary_ratio * scheduler.config.num_train_timesteps
    # Once per generation, when the pipeline sets the timesteps (never on the per-step path).
    high = int((timesteps >= boundary).sum().item())  # host-ok
    return (0, high) if inst.stage == "high" else (high, len(timesteps) - high)


def new_generation(inst) -> None:
    """Reset the state, and count this generation's calls of `inst`'s transformer from the followed scheduler."""
    inst.step_offset, calls = stage_steps(inst)
    inst.cache.set_config(with_steps(inst.cache.config, calls))
    inst.cache.reset()
    inst.check_ranks_agree()  # many GPUs: every rank runs this generation with the same steps (once per generation)


def with_steps(config, steps: int | None):
    return dataclasses.replace(config, num_inference_steps=None if steps is None else max(1, steps))
