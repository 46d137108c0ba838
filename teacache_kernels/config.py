"""TeaCacheConfig: what the user chooses, validated once, with errors that name the bad value."""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Sequence

from . import coefficients as _coefficients


@dataclass(frozen=True)
class TeaCacheConfig:
    """How TeaCache decides, per transformer call, whether to reuse the cached residual.

    rel_l1_thresh: reuse while the accumulated rescaled distance stays below this. 0 turns reuse off
        (every call computes, whatever sign the polynomial takes).
        None: the default of the coefficient set (see `coefficients.PUBLISHED`).
    coefficients: the rescale polynomial, highest power first (at most 8 values), or the name of a
        published set ("flux", "flux-kontext", ...). None: chosen from the model class and pipeline.
    num_inference_steps: transformer calls per generation and CFG context. Learned from the scheduler
        when enabled on a pipeline; required on a bare transformer. The step counter wraps at it, which
        starts a new generation (state reset on the device).
    warmup_steps: the first calls of a generation always compute (the original forces 1).
    cooldown_steps: the last calls of a generation always compute (the original forces 1).
    """

    rel_l1_thresh: float | None = None
    coefficients: str | Sequence[float] | None = None
    num_inference_steps: int | None = None
    warmup_steps: int = 1
    cooldown_steps: int = 1

    def __post_init__(self) -> None:
        t = self.rel_l1_thresh
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
                raise ValueError(f"rel_l1_thresh must be a finite number >= 0, got {t!r}")
            object.__setattr__(self, "rel_l1_thresh", float(t))  # numpy scalars welcome, stored as float
        if self.coefficients is not None:
            # Normalise to a tuple so the config is hashable and cannot change under us.
            resolved = self.coefficients if isinstance(self.coefficients, str) else tuple(self.coefficients)
            _coefficients.resolve(resolved)  # raises with the bad value named
            object.__setattr__(self, "coefficients", resolved)
        for field, least in (("num_inference_steps", 1), ("warmup_steps", 0), ("cooldown_steps", 0)):
            v = getattr(self, field)
            if v is None and field == "num_inference_steps":
                continue
            if not _is_int(v) or v < least:
                raise ValueError(f"{field} must be an integer >= {least}, got {v!r}")
            object.__setattr__(self, field, operator.index(v))

    @classmethod
    def from_fields(cls, config: "TeaCacheConfig | None", fields: dict) -> "TeaCacheConfig":
        """`config` updated with keyword `fields`; an unknown field name is an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"unknown TeaCacheConfig field(s) {unknown}; known fields: {sorted(known)}")
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a TeaCacheConfig, got {type(config).__name__}")
        return dataclasses.replace(config, **fields) if config is not None else cls(**fields)

    def replace(self, **fields) -> "TeaCacheConfig":
        return TeaCacheConfig.from_fields(self, fields)


def _is_int(v) -> bool:
    """An integer (numpy's included), not a bool and not a float that happens to be whole."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class ResolvedConfig:
    """A TeaCacheConfig with every choice made: what the state machine and the kernels run on."""

    rel_l1_thresh: float
    coefficients: tuple[float, ...]
    num_inference_steps: int | None
    warmup_steps: int
    cooldown_steps: int
    coefficient_set: str | None  # the published set's name, when one was used

    @classmethod
    def resolve(cls, config: TeaCacheConfig, default_set: str) -> "ResolvedConfig":
        chosen = config.coefficients if config.coefficients is not None else default_set
        name = chosen if isinstance(chosen, str) else None
        thresh = config.rel_l1_thresh
        if thresh is None:
            if name is None:
                raise ValueError(
                    "rel_l1_thresh is required with explicit coefficients (only published sets carry a default)"
                )
            thresh = _coefficients.PUBLISHED[name].default_thresh
        return cls(
            rel_l1_thresh=float(thresh),
            coefficients=_coefficients.resolve(chosen),
            num_inference_steps=config.num_inference_steps,
            warmup_steps=config.warmup_steps,
            cooldown_steps=config.cooldown_steps,
            coefficient_set=name,
        )
