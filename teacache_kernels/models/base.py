"""What the generic installer needs to know about a transformer family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class ModelFamily:
    name: str
    class_names: tuple[str, ...]  # diffusers classes this family handles
    # Attribute names of the transformer's block lists, in execution order. The first is replaced by a
    # one-element list holding the span (its forward runs every list); the others by empty lists, so the
    # transformer's own forward, untouched, calls the span exactly once.
    block_lists: tuple[str, ...]
    # span_class(*original_lists, cache=...) -> nn.Module with the forward signature of the first list's blocks
    span_class: type[torch.nn.Module]
    # (transformer, pipeline or None) -> name of the published coefficient set to use by default
    default_coefficients: Callable[[torch.nn.Module, Any], str]
    # (args, kwargs) of a transformer call -> the name of an input this package cannot cache yet, or None
    unsupported_input: Callable[[tuple, dict], str | None]
