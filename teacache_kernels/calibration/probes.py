"""Where calibration reads each candidate signal and the target, per transformer family.

A probe names a submodule and which of its tensors to take (its output, its first input, or what a
function computes from its arguments). A family's probes are the built-in signals it offers, the span
input and the span output (for the "residual" target), and which signals the runtime can compute.
Every registered `ModelFamily` gets them from its own definition (`family_probes`): each signal
function is called on block 0's arguments, exactly as the cached span calls it, the span input is
block 0's first cached stream and the span output the last block's (or the family's tail's). `PROBES`
keeps hand-written entries by class name (FLUX), which take precedence. Any other signal name is a
submodule path of the user's (`transformer.get_submodule(name)`), read from its output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

# The signals TeaCache's cached forward can compare at run time; other signals are reported, not selectable.
from ..coefficients import RUNTIME_SIGNALS

DEFAULT_SIGNALS = ("modulated_input", "timestep_embedding", "hidden_states")
TARGETS = ("output", "residual")


@dataclass(frozen=True)
class Probe:
    """A tensor seen during a transformer call: `module`'s output (or input), element `index` of a tuple."""

    module: str  # submodule path, as `get_submodule` takes it
    where: str = "output"  # "output" or "input" (the first positional argument, unless `fn`)
    index: int | None = None  # element of a tuple output; None: the first tensor in it
    # where="input": fn(module, call) -> tensor, `call` mapping the module's parameter names to this call's
    # arguments (a ModelFamily signal function, called on block 0).
    fn: Callable[[nn.Module, dict], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.where not in ("output", "input"):
            raise ValueError(f"Probe.where must be 'output' or 'input', got {self.where!r}")
        if self.fn is not None and self.where != "input":
            raise ValueError("Probe.fn reads a module's arguments: it needs where='input'")


@dataclass(frozen=True)
class FamilyProbes:
    signals: dict[str, Probe]  # built-in signal name -> where it is read
    span_input: Probe  # the stream entering the cached block span
    span_output: Probe  # the stream leaving it (residual = span_output - span_input)
    runtime_signals: tuple[str, ...] = field(default=RUNTIME_SIGNALS)


PROBES: dict[str, FamilyProbes] = {
    "FluxTransformer2DModel": FamilyProbes(
        signals={
            # What TeaCache4FLUX (and this package's FluxBlockSpan) compares: block 0's modulated image stream.
            "modulated_input": Probe("transformer_blocks.0.norm1", "output", 0),
            "timestep_embedding": Probe("time_text_embed"),  # temb
            "hidden_states": Probe("x_embedder"),  # the embedded image tokens: the span's input
        },
        span_input=Probe("x_embedder"),
        span_output=Probe("norm_out", "input"),  # norm_out(hidden_states, temb): the span's output
    ),
}


def family_probes(family, transformer: nn.Module) -> FamilyProbes:
    """The probes of a registered `ModelFamily`: where its cached span reads its signal and its residual."""
    first_block = f"{family.block_lists[0]}.0"
    stream = family.cached[0]  # the stream whose length keys calibrated sets, as at run time
    signals = {name: Probe(first_block, "input", fn=fn) for name, fn in family.signals.items()}
    for name, (path, index) in family.captures.items():  # a signal read off a submodule's output (Wan's `e`)
        if name in signals:
            signals[name] = Probe(path, "output", index)
    span_input = Probe(first_block, "input", fn=lambda block, call: call[stream])
    signals.setdefault("hidden_states", span_input)
    if family.tail is not None:  # the span ends with the tail (Mochi's norm_out): the residual is taken after it
        span_output = Probe(family.tail[0])
    else:
        last = [name for name in family.block_lists if len(transformer.get_submodule(name))][-1]
        index = family.returns.index(stream) if len(family.returns) > 1 else None
        span_output = Probe(f"{last}.{len(transformer.get_submodule(last)) - 1}", index=index)
    return FamilyProbes(signals, span_input, span_output, tuple(family.signals))


def probes_for(transformer: nn.Module) -> FamilyProbes | None:
    """The probes of `transformer`'s class or nearest known base class (a `PROBES` entry, else its registered
    ModelFamily's); None for a class TeaCache does not know."""
    from ..models import FAMILIES

    for cls in type(transformer).__mro__:
        if cls.__name__ in PROBES:
            return PROBES[cls.__name__]
        if cls.__name__ in FAMILIES:
            return family_probes(FAMILIES[cls.__name__], transformer)
    return None


def resolve_signal(transformer: nn.Module, name: str) -> Probe:
    """A built-in signal name of the family, or a user-named submodule path (its output)."""
    family = probes_for(transformer)
    if family is not None and name in family.signals:
        return family.signals[name]
    try:
        transformer.get_submodule(name)
    except AttributeError:
        builtin = sorted(family.signals) if family is not None else []
        raise ValueError(
            f"unknown signal {name!r}: not a built-in signal of {type(transformer).__name__} "
            f"({', '.join(builtin) or 'none: this family has no built-in probes'}) and not a submodule path"
        ) from None
    return Probe(name)


def first_tensor(value, index: int | None = None) -> torch.Tensor:
    """`value` if a tensor; element `index` (default: the first tensor) of a tuple/list; else an error."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        if index is not None:
            return first_tensor(value[index])
        for v in value:
            if isinstance(v, torch.Tensor):
                return v
    if hasattr(value, "to_tuple"):  # diffusers BaseOutput
        return first_tensor(value.to_tuple(), index)
    raise TypeError(f"expected a tensor or a tuple holding one, got {type(value).__name__}")
