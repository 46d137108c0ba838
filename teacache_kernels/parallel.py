"""Many GPUs: one decision for all the ranks that run a transformer together.

Under context parallelism (diffusers' Ulysses or Ring attention, `transformer.enable_parallelism(
config=ContextParallelConfig(...))`, or xDiT's sequence parallelism), each rank holds a slice of the sequence, so
each rank's signal is a slice. A decision from the slice alone differs between ranks: one rank runs the blocks
while another reuses, and the next collective inside the blocks hangs or mixes steps. So the decision sums its two
partial sums (sum|m - m_prev|, sum|m_prev|, and the element count) over the ranks that split the signal before the
state machine runs (`ops.decide(..., sum_over_ranks=...)`): every rank computes the same x, the same accumulator and
the same flag, on the device, traceable (functional collectives: no host sync, no graph break).

The sum gathers every rank's three float64 numbers and adds them in rank order on each rank, rather than
all-reducing: the result is then bit-identical on every rank whatever the backend's reduction order, so the ranks'
states never drift apart. A signal that is not split (a timestep embedding) is summed all the same: every rank
then holds W times the same sums, x is unchanged up to rounding, and is still identical on every rank.

Tensor parallelism (diffusers' `_tp_plan`) shards weights, not the sequence: the block inputs and the modulation
are replicated, so every rank computes the same signal and the same decision with nothing to sum. CFG parallelism
(cond on one rank, uncond on another) needs nothing either: each rank's context keeps its own state.

Configs and step counts are checked to agree across the group on the host, once when the group is found
(enabling, or `enable_parallelism` after enabling) and once per generation (when a followed pipeline sets its
timesteps, or `reset_teacache`): a disagreement is a clear error on every rank instead of a hang.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist


def context_parallel_group(transformer: torch.nn.Module) -> Any:
    """The process group over which diffusers' context parallelism splits `transformer`'s sequence, or None.

    diffusers records the config on the model (`_parallel_config`, set by `enable_parallelism` or by
    `from_pretrained(..., parallel_config=...)`); the sequence is split over the flattened ring x ulysses mesh.
    """
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None or mesh.size() == 1:
        return None
    return mesh.get_group()


def resolve_group(transformer: torch.nn.Module, given: Any) -> Any:
    """`given` (a ProcessGroup or a 1-D DeviceMesh; "auto": from the transformer's parallel config) -> a group or None."""
    if isinstance(given, str):
        if given != "auto":
            raise ValueError(f"process_group must be 'auto', None, a ProcessGroup or a DeviceMesh, got {given!r}")
        return context_parallel_group(transformer)
    if given is None:
        return None
    if isinstance(given, dist.device_mesh.DeviceMesh):
        if given.ndim != 1:
            raise ValueError(f"process_group: a DeviceMesh must be 1-D (flatten it), got mesh_dim_names={given.mesh_dim_names}")
        given = given.get_group()
    if not isinstance(given, dist.ProcessGroup):
        raise TypeError(f"process_group must be 'auto', None, a ProcessGroup or a DeviceMesh, got {type(given).__name__}")
    return None if dist.get_world_size(given) == 1 else given


def sum_over_ranks(sums: torch.Tensor, group: Any) -> torch.Tensor:
    """`sums` (fp64 [k]) summed over the ranks of `group`, in rank order: bit-identical on every rank. Traceable."""
    from torch.distributed import _functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # the former from torch 2.13 on
    gathered = gather(sums, 0, group)  # [world * k], rank-major
    return gathered.view(-1, sums.numel()).sum(0)


def check_agreement(group: Any, what: str, config: Any) -> None:
    """Raise on every rank, naming the values, unless every rank of `group` has the same config (step count included).

    A collective (host side): every rank of the group must call it at the same point, as SPMD code does.
    """
    if group is None:
        return
    mine = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    differing = {key: [theirs[key] for theirs in everyone] for key in mine if any(theirs[key] != mine[key] for theirs in everyone)}
    if differing:
        ranks = dist.get_process_group_ranks(group)
        detail = "; ".join(
            f"{key}: " + ", ".join(f"rank {rank}: {value!r}" for rank, value in zip(ranks, values))
            for key, values in differing.items()
        )
        raise ValueError(
            f"TeaCache on {what}: the ranks that split the sequence must make the same decision, but their configs "
            f"differ ({detail}). Enable TeaCache with the same settings, and run the same number of steps, on every rank"
        )


def move_block_split_to_span(inst) -> None:
    """Where diffusers' context-parallel plan splits the inputs of the first block (Qwen-Image: "transformer_blocks.0"),
    the split would happen inside the cached span: its streams whole, its outputs slices, no residual between them.
    The span applies that split to its own call instead (`BlockSpan.bind`), before the signal, exactly as the hook
    would: the hook moves from block 0 to the span while TeaCache is on, and back when it is disabled."""
    from diffusers.hooks.context_parallel import _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE

    registry = getattr(inst.span.first_block, "_diffusers_hook", None)
    name = _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE.format(f"{inst.family.block_lists[0]}.0")
    hook = registry.get_hook(name) if registry is not None else None
    if hook is None:
        return
    registry.remove_hook(name, recurse=False)
    inst.span.input_split = (name, hook)


def restore_block_split(inst) -> None:
    """Undo `move_block_split_to_span`: block 0 splits its own inputs again."""
    if inst.span.input_split is None:
        return
    from diffusers.hooks import HookRegistry

    name, hook = inst.span.input_split
    HookRegistry.check_if_exists_or_initialize(inst.span.first_block).register_hook(hook, name)
    inst.span.input_split = None
