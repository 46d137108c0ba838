"""What TeaCache needs to know about a transformer family, and the one cached span every family uses.

A family is data: the attribute names of the block lists, the block arguments that carry the hidden
streams, what a block returns, which streams carry a residual, and how to compute the signal from block
0's arguments. `BlockSpan` turns that into the module the first block list yields while TeaCache is on
(see block_list.py): called once with block 0's arguments, it computes the signal, decides on the
device, and either runs every block of every list or applies the cached residuals. No forward is copied.

Register a family of your own with `teacache_kernels.register_model(ModelFamily(...))`
(docs/adding_a_model.md).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..block_list import original_blocks

# fn(block_0, call) -> the signal tensor, where `call` maps block 0's parameter names to this call's arguments.
SignalFn = Callable[[nn.Module, dict], torch.Tensor]


def _no_unsupported_input(args: tuple, kwargs: dict) -> str | None:
    return None


def _any_pipeline(pipeline: Any) -> str | None:
    return None


@dataclass(frozen=True)
class ModelFamily:
    """How TeaCache caches one transformer family. Only `name`, `class_names`, `block_lists` and `signals` are required.

    name: a short name (summaries, errors).
    class_names: the transformer classes it serves, by class name (subclasses are found through the MRO).
    block_lists: attribute names of the transformer's `nn.ModuleList`s of blocks, in the order its forward
        runs them. Every block of every list must take the streams under the same parameter names.
    signals: signal name -> `fn(block_0, call)`, where `call` maps block 0's parameter names to the
        arguments of this call (positional ones included). The span compares "modulated_input" when the
        family defines it, else the first; a calibration file selects another by name ("modulated_input"
        and "timestep_embedding" are the names a coefficients file can hold).
    streams: the block parameters that carry hidden states from block to block.
    returns: what a block returns, as names from `streams`, in order; one name: the block returns a tensor.
        Default: `streams` (a tuple) or the one stream (a tensor).
    cached: the streams whose residual (span output - span input) is cached and applied on a reused call.
        Default: the first stream. Streams not listed come out of the span as they went in: list every
        stream the transformer reads after its blocks.
    default_coefficients: the published set for a model of this family: a name, or
        `fn(transformer, pipeline or None) -> name`. None: users give `coefficients` or `coefficients_file`.
    unsupported_input: `fn(args, kwargs)` of a transformer call -> the name of an input the span cannot
        honour (ControlNet residuals added between blocks...), or None. Checked before each call.
    unsupported_pipeline: `fn(pipeline) -> reason or None`: a pipeline the family cannot serve (Cosmos: pipelines
        that call the CFG branches without naming them), refused by name when enabling on it.
    state_key: `fn(call) -> str` when the original keeps its state by something other than the CFG context
        (Lumina2: the joint sequence length, since its pipeline sets no context): each key of each context
        gets a state of its own. None: per context.
    tail: `(attribute, argument names)` of a module the transformer applies to the first cached stream right
        after its blocks, when the original takes its residual after it (Mochi: `("norm_out", ("temb",))`).
        The span then runs it last, with those arguments from the block call, and while TeaCache is on the
        transformer's own call of it passes the stream through.
    captures: signal name -> `(submodule path, index)`: a tensor the transformer computes before its blocks
        but does not hand them (Wan's time embedding `e`, before `time_projection`): while TeaCache is on, a
        forward hook keeps that submodule's output (element `index` of a tuple; None: the output itself) from
        each call, and signal functions find it as `call[name]`. A path ending in ".*" hooks every child of the
        module at the path: `call[name]` is then the list of their outputs in call order (HiDream's per-block
        caption projections).
    dynamo_config: `torch._dynamo.config` settings the span needs under torch.compile, held while a model of
        the family has TeaCache on (Mochi: `capture_dynamic_output_shape_ops`, for the `torch.nonzero` in
        its attention, which a torch.cond branch cannot leave as a graph break).
    """

    name: str
    class_names: tuple[str, ...]
    block_lists: tuple[str, ...]
    signals: Mapping[str, SignalFn]
    streams: tuple[str, ...] = ("hidden_states",)
    returns: tuple[str, ...] | None = None
    cached: tuple[str, ...] | None = None
    default_coefficients: str | Callable[[nn.Module, Any], str] | None = None
    unsupported_input: Callable[[tuple, dict], str | None] = _no_unsupported_input
    unsupported_pipeline: Callable[[Any], str | None] = _any_pipeline
    state_key: Callable[[dict], str] | None = None
    tail: tuple[str, tuple[str, ...]] | None = None
    captures: Mapping[str, tuple[str, int | None]] = field(default_factory=dict)
    dynamo_config: Mapping[str, Any] = field(default_factory=dict)
    span_class: type[nn.Module] = field(default=None)  # type: ignore[assignment]  # BlockSpan unless given

    def __post_init__(self) -> None:
        def names(value, what):
            if isinstance(value, str) or not all(isinstance(v, str) for v in value) or not value:
                raise ValueError(f"ModelFamily {self.name!r}: {what} must be a non-empty tuple of names, got {value!r}")
            return tuple(value)

        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        set_("class_names", names(self.class_names, "class_names"))
        set_("block_lists", names(self.block_lists, "block_lists"))
        set_("streams", names(self.streams, "streams"))
        set_("returns", names(self.returns, "returns") if self.returns is not None else self.streams)
        set_("cached", names(self.cached, "cached") if self.cached is not None else self.streams[:1])
        for what in ("returns", "cached"):
            unknown = [n for n in getattr(self, what) if n not in self.streams]
            if unknown:
                raise ValueError(f"ModelFamily {self.name!r}: {what} names {unknown}, which are not among streams {self.streams}")
        if not self.signals or not all(callable(f) for f in self.signals.values()):
            raise ValueError(f"ModelFamily {self.name!r}: signals must map names to functions fn(block_0, call)")
        set_("signals", dict(self.signals))
        for name, capture in self.captures.items():
            if not (isinstance(capture, tuple) and len(capture) == 2 and isinstance(capture[0], str)
                    and (capture[1] is None or isinstance(capture[1], int))):  # fmt: skip
                raise ValueError(f"ModelFamily {self.name!r}: captures[{name!r}] must be (submodule path, index or None), got {capture!r}")
        set_("captures", dict(self.captures))
        if self.span_class is None:
            set_("span_class", BlockSpan)

    def coefficients_for(self, transformer: nn.Module, pipeline: Any) -> str | None:
        d = self.default_coefficients
        return d(transformer, pipeline) if callable(d) else d


def parameter_names(block: nn.Module) -> tuple[str, ...]:
    """The names of a block's forward parameters, in order (positional arguments are mapped onto them)."""
    params = inspect.signature(block.forward).parameters.values()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


class BlockSpan(nn.Module):
    """All blocks of a family's block lists as one cached unit, called like block 0.

    Not registered in the transformer (its blocks are, where they always were): the first block list
    yields it when iterated. `cache` is a FusedCache or a ReferenceCache.
    """

    def __init__(self, *block_lists: nn.ModuleList, family: ModelFamily, cache, tail: nn.Module | None = None):
        super().__init__()
        self.block_lists = nn.ModuleList(block_lists)  # the span's own view; never part of the transformer
        self.family = family
        self.cache = cache
        self.tail = tail  # the module of family.tail, or None
        self.tail_forward = type(tail).forward if tail is not None else None  # before install makes it pass-through
        self.first_block = block_lists[0][0]
        # Read once here, on the host: a block's parameter names map positional arguments (gradient
        # checkpointing calls blocks positionally) onto names.
        self.names = parameter_names(self.first_block)
        self.captured: dict[str, torch.Tensor] = {}  # family.captures of this transformer call (install's hooks)
        # diffusers' context-parallel split of block 0's inputs, when its plan has one (parallel.py): (hook name, hook)
        self.input_split: tuple[str, Any] | None = None

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """Block 0's parameter names -> this call's arguments (positional ones included)."""
        if self.input_split is not None:  # context parallelism splits block 0's inputs: split the span's instead
            args, kwargs = self.input_split[1].pre_forward(self.first_block, *args, **kwargs)
        call = dict(zip(self.names, args))
        call.update(kwargs)
        missing = [s for s in self.family.streams if s not in call]
        if missing:
            raise TypeError(f"TeaCache's {self.family.name} span was called without the stream(s) {missing}")
        return call

    def take_captures(self) -> dict:
        """This call's `family.captures`, taken (not read: a later call cannot see this call's tensors)."""
        captured = {}
        for name, (path, _) in self.family.captures.items():
            if name not in self.captured:
                raise RuntimeError(f"TeaCache's {self.family.name} span: {path} did not run before the blocks")
            captured[name] = self.captured.pop(name)
        return captured

    def signal(self, call: dict) -> torch.Tensor:
        """The signal the cache compares. The cache's signal name (a plain string: static under compile) picks the
        function; a name this family does not define (the config's default) means the family's first."""
        family = self.family
        signal_fn = family.signals.get(self.cache.signal) or next(iter(family.signals.values()))
        return signal_fn(self.first_block, call)

    def forward(self, *args, **kwargs):
        family = self.family
        call = self.bind(args, kwargs)
        captured = self.take_captures()
        signal = self.signal({**call, **captured} if captured else call)
        streams_in = tuple(call[s] for s in family.cached)
        # The branch reads the cached streams only through its operands: a closure over them would hand
        # torch.cond the same tensors twice (aliased inputs, which it refuses).
        rest = {k: v for k, v in call.items() if k not in family.cached}

        def full(*cached_in):
            state = dict(rest, **dict(zip(family.cached, cached_in)))
            for blocks in self.block_lists:
                for block in original_blocks(blocks):
                    out = block(**state)
                    if len(family.returns) == 1:
                        out = (out,)
                    state.update(zip(family.returns, out))
            if self.tail is not None:
                first = family.cached[0]
                state[first] = self.tail_forward(self.tail, state[first], *(call[a] for a in family.tail[1]))
            return tuple(state[s] for s in family.cached)

        key = family.state_key(call) if family.state_key is not None else None
        cached_out = dict(zip(family.cached, self.cache.run(signal, streams_in, full, key)))
        out = tuple(cached_out.get(name, call[name]) for name in family.returns)
        return out[0] if len(out) == 1 else out
