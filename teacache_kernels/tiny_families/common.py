"""What every tiny family's builders share: seeded random tensors and modules, and the `TinyFamily` record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _mask(length: int, valid: int, dtype=torch.long) -> torch.Tensor:
    m = torch.zeros(1, length, dtype=dtype)
    m[:, :valid] = 1
    return m


def _forked(seed: int, build: Callable[[], Any]) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@dataclass(frozen=True)
class TinyFamily:
    name: str  # the ModelFamily's name
    transformer: Callable[..., Any]
    pipeline: Callable[..., Any]
    generate: Callable[..., torch.Tensor]
    transformer_call: Callable[..., dict]
    contexts: tuple[str, ...]  # the state names a CFG generation produces (summary contexts)
