"""Where calibration reads each candidate signal and the target, per transformer family.

A probe names a submodule and which of its tensors to take (its output, or its first input). Adding a
family is one entry in `PROBES`: the built-in signals it offers, the span input and the span output
(for the "residual" target), and which signals the runtime can compute. Any other signal name is a
submodule path of the user's (`transformer.get_submodule(name)`), read from its output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    where: str = "output"  # "output" or "input" (the first positional argument)
    index: int | None = None  # element of a tuple output; None: the first tensor in it

    def __post_init__(self) -> None:
        if self.where not in ("output", "input"):
            raise ValueError(f"Probe.where must be 'output' or 'input', got {self.where!r}")


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


def probes_for(transformer: nn.Module) -> FamilyProbes | None:
    """The probes of `transformer`'s class or nearest known base class; None for an unknown family."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in PROBES:
            return PROBES[cls.__name__]
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
