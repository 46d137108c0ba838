"""Put a cached span into a transformer, and take it out again leaving the model exactly as it was.

Enabling changes no module name, no parameter name and no `state_dict` key. What it changes:
  - the class of each of the transformer's block lists, in place: `CachedBlockList` (a `ModuleList`
    subclass) keeps every block registered where diffusers put it (so LoRA, attention processors,
    group offloading, layerwise casting and checkpoints see the model they expect), and changes only
    what iterating the list yields: the first list yields the cached span once, the others nothing. The
    transformer's own forward, untouched, runs `for block in self.transformer_blocks: ...` and so calls
    the span once; the span runs the real blocks. No forward is copied.
  - `cache_context(name)`, which diffusers pipelines call around each CFG branch, also selects the
    cache's per-context state;
  - `enable_cache` (diffusers' other caches) refuses while TeaCache is on, naming both;
  - `enable_parallelism` (diffusers' context/tensor parallelism) also finds the ranks that split the
    sequence, over which the decision then sums (parallel.py);
  - a forward pre-hook refuses inputs the cached span cannot honour, naming them.
Every callable left on the model is a bound method of the `Installation`, so `copy.deepcopy` of an
enabled model gives the copy its own installation, cache and state (see `Installation.__deepcopy__`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import parallel
from .block_list import YIELDS, CachedBlockList, cached_class, pass_through_class
from .follow import unfollow, with_steps
from .models import ModelFamily

# Dynamo settings held while any model has TeaCache on, each restored when the last holder is disabled:
# - specialize_float: torch 2.13's torch.cond takes no symbolic float among its operands, and with
#   dynamic=True Dynamo turns every float attribute a block reads (LayerNorm's eps...) into one; the default
#   dynamic=None specializes them anyway.
# - automatic_dynamic_shapes off: a call with a new batch size or resolution compiles a static graph of its own,
#   once, reading that layout's state (cached_forward: a state per layout, kept); Dynamo's default would switch to
#   a dynamic graph whose buffers are the last layout's, recompiling at every later size change. An explicit
#   `dynamic=True` still compiles one dynamic graph.
# - a family's own `dynamo_config` (Mochi: capture_dynamic_output_shape_ops, since its attention calls
#   torch.nonzero inside the branch, which torch.cond cannot leave; fullgraph=True turns it on anyway).
_held: dict[str, list] = {}  # setting -> [holders, value before the first hold]


def _hold_dynamo_config(settings: dict) -> None:
    config = torch._dynamo.config
    for name, value in settings.items():
        if name not in _held:
            _held[name] = [0, getattr(config, name)]
            setattr(config, name, value)
        _held[name][0] += 1


def _release_dynamo_config(settings: dict) -> None:
    for name in settings:
        _held[name][0] -= 1
        if _held[name][0] == 0:
            setattr(torch._dynamo.config, name, _held.pop(name)[1])


def _dynamo_settings(family: ModelFamily) -> dict:
    return {"specialize_float": True, "automatic_dynamic_shapes": False, **family.dynamo_config}


@dataclass
class Installation:
    transformer: nn.Module
    family: ModelFamily
    cache: Any  # FusedCache or ReferenceCache
    span: nn.Module
    list_classes: dict[str, type]  # block list attribute -> its class before enabling
    pre_hook_id: int | None = None
    pipeline: Any = None
    scheduler: Any = None  # the scheduler followed (follow.py; the pipeline's may be swapped later)
    stage: str | None = None  # "high" / "low": the part of each generation this transformer runs (Wan 2.2)
    user_config: Any = None  # the TeaCacheConfig as given; enabling again updates it
    on_context_entry: Any = None  # called (host side) whenever cache_context is entered
    base_cache_context: Any = None  # what `transformer.cache_context` was before enabling
    shadowed: dict[str, Any] = field(default_factory=dict)  # instance attributes we shadowed -> their value
    tail_class: type | None = None  # the class of the family's tail module before it was made pass-through
    step_offset: int = 0  # the generation's step index of this transformer's first call (Wan 2.2's second stage)
    capture_hooks: dict[str, tuple[str, int]] = field(default_factory=dict)  # capture -> (submodule path, hook id)
    process_group: Any = "auto"  # as given to enable_teacache: "auto" (from diffusers' parallel config), None, a group
    base_enable_parallelism: Any = None  # what `transformer.enable_parallelism` was before enabling

    @property
    def block_lists(self) -> dict[str, nn.ModuleList]:
        return {name: getattr(self.transformer, name) for name in self.list_classes}

    # -- what the model calls while enabled (bound methods: deepcopy follows them) --

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """Select the CFG context's state; where the pipeline says which step this is, set the step from it.

        diffusers' Wan pipelines pass `step_index` (and `num_inference_steps`): the call's index in this
        transformer's share of the generation (`step_index - step_offset`: Wan 2.2's low-noise transformer
        starts where the high-noise one stopped) is then the state's step, so a generation's start and its
        forced calls never depend on counting alone. Without it (most pipelines), the state counts calls.
        """
        if self.on_context_entry is not None:
            self.on_context_entry()
        base = self.base_cache_context
        with base(name, **kwargs) if base is not None else contextlib.nullcontext():
            previous = self.cache.activate(name)
            try:
                steps = kwargs.get("num_inference_steps")
                if steps is not None and self.pipeline is None and steps != self.cache.config.num_inference_steps:
                    self.cache.set_config(with_steps(self.cache.config, int(steps)))
                if kwargs.get("step_index") is not None:
                    self.cache.at_step(int(kwargs["step_index"]) - self.step_offset)
                yield
            finally:
                self.cache.activate(previous)

    def join_group(self) -> None:
        """Find the ranks that split the signal (context parallelism) and check that they agree. Host side: when
        enabling, and after diffusers' `enable_parallelism` (the model's own, shadowed while enabled)."""
        group = self.cache.group = parallel.resolve_group(self.transformer, self.process_group)
        if group is not None:
            parallel.move_block_split_to_span(self)
        ranks = 1 if group is None else torch.distributed.get_world_size(group)
        if self.cache.config.sequence_ranks != ranks:  # a calibrated file's set goes by the whole sequence's length
            self.cache.set_config(dataclasses.replace(self.cache.config, sequence_ranks=ranks))
        self.check_ranks_agree()

    def check_ranks_agree(self) -> None:
        """Every rank that splits the signal must run the same config and step count (a collective, host side)."""
        parallel.check_agreement(self.cache.group, type(self.transformer).__name__, self.cache.config)

    def enable_parallelism(self, *args, **kwargs):
        if self.base_enable_parallelism is None:
            raise AttributeError(f"{type(self.transformer).__name__} has no enable_parallelism")
        result = self.base_enable_parallelism(*args, **kwargs)
        self.join_group()
        return result

    def enable_cache(self, config) -> None:
        raise RuntimeError(
            f"TeaCache (teacache_kernels) is enabled on this {type(self.transformer).__name__}; diffusers' "
            f"{type(config).__name__} on top of it would skip the same work twice: call "
            "teacache_kernels.disable_teacache(...) first, or keep TeaCache alone"
        )

    def check_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        what = self.family.unsupported_input(args, kwargs)
        if what is not None:
            raise NotImplementedError(
                f"TeaCache for {type(module).__name__} does not support {what} yet; "
                "call teacache_kernels.disable_teacache() to run this input uncached"
            )
        if torch.is_grad_enabled() and getattr(module, "gradient_checkpointing", False):
            raise RuntimeError(
                f"TeaCache cannot run with gradient checkpointing on this {type(module).__name__}: the checkpoint "
                "would recompute the cached span, and with it the stateful skip decision, in the backward pass. "
                "Call transformer.disable_gradient_checkpointing(), or run under torch.no_grad()"
            )

    def capture(self, name: str, index: int | None, many: bool, module: nn.Module, args: tuple, output) -> None:
        """Forward hook on a `family.captures` submodule: keep what the span's signal reads."""
        out = output if index is None else output[index]
        if many:  # "path.*": every child's output of this call, in call order
            self.span.captured.setdefault(name, []).append(out)
        else:
            self.span.captured[name] = out

    def __deepcopy__(self, memo: dict) -> "Installation":
        """The copy drives the copied transformer, with its own cache and state.

        It follows no pipeline: the copy is not in one. It keeps the step count last learned.
        """
        new = copy.copy(self)
        memo[id(self)] = new
        group = getattr(self.cache, "group", None)
        if group is not None:  # a process group is shared, never copied: the copy runs on the same ranks
            memo[id(group)] = group
        for name in ("transformer", "cache", "span", "user_config", "base_cache_context", "base_enable_parallelism", "shadowed"):
            setattr(new, name, copy.deepcopy(getattr(self, name), memo))
        new.pipeline = new.scheduler = new.on_context_entry = new.stage = None
        _hold_dynamo_config(_dynamo_settings(new.family))  # the copy is enabled too: its own disable releases it
        return new


# The transformer's methods an installation replaces (instance attributes; uninstall restores the class's).
_SHADOWED = ("cache_context", "enable_cache", "enable_parallelism")


def install(transformer: nn.Module, family: ModelFamily, cache) -> Installation:
    lists = {name: getattr(transformer, name, None) for name in family.block_lists}
    for name, blocks in lists.items():
        if not isinstance(blocks, nn.ModuleList) or (name == family.block_lists[0] and len(blocks) == 0):
            raise ValueError(f"{type(transformer).__name__}.{name} should be the model's nn.ModuleList of blocks, got {blocks!r:.80}")
        if isinstance(blocks, CachedBlockList):
            raise RuntimeError(f"{type(transformer).__name__}.{name} is already cached by another installation")
    tail = getattr(transformer, family.tail[0]) if family.tail is not None else None
    span = family.span_class(*lists.values(), family=family, cache=cache, tail=tail)
    inst = Installation(transformer, family, cache, span, {name: type(blocks) for name, blocks in lists.items()})
    if tail is not None:
        inst.tail_class = type(tail)
        tail.__class__ = pass_through_class(type(tail))

    for i, blocks in enumerate(lists.values()):
        blocks.__class__ = cached_class(type(blocks))
        setattr(blocks, YIELDS, (span,) if i == 0 else ())

    for name, (path, index) in family.captures.items():
        many = path.endswith(".*")  # a hook on every child of the module at the path
        hook = functools.partial(inst.capture, name, index, many)  # a partial of a bound method: deepcopy rebinds it
        targets = [(f"{path[:-2]}.{c}", m) for c, m in transformer.get_submodule(path[:-2]).named_children()] if many else [(path, transformer.get_submodule(path))]
        for i, (target, module) in enumerate(targets):
            inst.capture_hooks[f"{name}.{i}" if many else name] = (target, module.register_forward_hook(hook).id)
    handle = transformer.register_forward_pre_hook(inst.check_inputs, with_kwargs=True)
    inst.pre_hook_id = handle.id  # the id, not the handle: a handle's weak reference would survive deepcopy
    inst.base_cache_context = getattr(transformer, "cache_context", None)
    inst.base_enable_parallelism = getattr(transformer, "enable_parallelism", None)
    for name in _SHADOWED:
        # An instance attribute shadows the class's method; uninstall restores what was there.
        if name in vars(transformer):
            inst.shadowed[name] = vars(transformer)[name]
        setattr(transformer, name, getattr(inst, name))
    transformer._teacache = inst
    _hold_dynamo_config(_dynamo_settings(family))
    return inst


def uninstall(inst: Installation) -> None:
    t = inst.transformer
    parallel.restore_block_split(inst)
    for name, blocks in inst.block_lists.items():
        del blocks.__dict__[YIELDS]
        blocks.__class__ = inst.list_classes[name]
    if inst.tail_class is not None:
        getattr(t, inst.family.tail[0]).__class__ = inst.tail_class
    for path, hook_id in inst.capture_hooks.values():
        t.get_submodule(path)._forward_hooks.pop(hook_id, None)
    t._forward_pre_hooks.pop(inst.pre_hook_id, None)
    t._forward_pre_hooks_with_kwargs.pop(inst.pre_hook_id, None)
    for name in _SHADOWED:
        delattr(t, name)
        if name in inst.shadowed:
            setattr(t, name, inst.shadowed[name])
    unfollow(inst)
    del t._teacache
    _release_dynamo_config(_dynamo_settings(inst.family))
