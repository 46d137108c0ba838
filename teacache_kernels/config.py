"""TeaCacheConfig: what the user chooses, validated once, with errors that name the bad value."""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import os
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
    warmup_steps: the first calls of a generation always compute. None: what the coefficient set's original
        forces (1 for most; 5 for Wan's `*-ret` sets; the first 10% of the steps for hidream-full), else 1.
    cooldown_steps: the last calls of a generation always compute. None: the set's original (1 for most;
        0 for Wan's `*-ret` sets and hidream-full), else 1.

    Beyond the original (all off by default; the oracle in reference.py defines each):
    max_consecutive_skips: after this many reuses in a row the next call computes. None: no limit.
    min_skip_step, max_skip_step: only calls whose index in the generation lies in
        [min_skip_step, max_skip_step] (both inclusive) may reuse. None: no bound on that side.
    clamp_x: clamp the relative L1 distance to a range before the polynomial, which is only fitted
        there (a degree-4 fit can swing wildly outside it). A (lo, hi) pair, or True for the range a
        calibration recorded (needs `coefficients_file`).
    coefficients_file: a JSON file written by `teacache_kernels calibrate`: coefficients (and x range,
        recommended threshold, signal) per fitted sequence length; each call uses the nearest length's.
    calibrated_model: which model of that file; needed only when the file holds several.
    abs_rescaled: accumulate |poly(x)| instead of poly(x), so a polynomial that goes negative cannot lower
        the accumulator. None: the coefficient set's rule (True for "qwen-image", as vLLM-Omni does;
        False for the authors' sets and for explicit coefficients).
    """

    rel_l1_thresh: float | None = None
    coefficients: str | Sequence[float] | None = None
    num_inference_steps: int | None = None
    warmup_steps: int | None = None
    cooldown_steps: int | None = None
    max_consecutive_skips: int | None = None
    min_skip_step: int | None = None
    max_skip_step: int | None = None
    clamp_x: bool | tuple[float, float] = False
    coefficients_file: str | os.PathLike | None = None
    calibrated_model: str | None = None
    abs_rescaled: bool | None = None

    def __post_init__(self) -> None:
        if self.abs_rescaled is not None and not isinstance(self.abs_rescaled, bool):
            raise ValueError(f"abs_rescaled must be True, False or None, got {self.abs_rescaled!r}")
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
        optional = {"num_inference_steps", "warmup_steps", "cooldown_steps", "max_consecutive_skips", "min_skip_step", "max_skip_step"}
        for field, least in (
            ("num_inference_steps", 1),
            ("warmup_steps", 0),
            ("cooldown_steps", 0),
            ("max_consecutive_skips", 0),
            ("min_skip_step", 0),
            ("max_skip_step", 0),
        ):
            v = getattr(self, field)
            if v is None and field in optional:
                continue
            if not _is_int(v) or v < least:
                raise ValueError(f"{field} must be an integer >= {least}, got {v!r}")
            object.__setattr__(self, field, operator.index(v))
        lo, hi = self.min_skip_step, self.max_skip_step
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_skip_step ({lo}) must be <= max_skip_step ({hi})")
        object.__setattr__(self, "clamp_x", _clamp_range(self.clamp_x))
        if self.clamp_x is True and self.coefficients_file is None:
            raise ValueError("clamp_x=True clamps to a calibrated x range: give coefficients_file=..., or a (lo, hi) pair")
        if self.coefficients_file is not None:
            if self.coefficients is not None:
                raise ValueError("give coefficients or coefficients_file, not both")
            object.__setattr__(self, "coefficients_file", os.fspath(self.coefficients_file))
        elif self.calibrated_model is not None:
            raise ValueError("calibrated_model names a model of a coefficients_file; no coefficients_file was given")

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


def _clamp_range(v):
    """False, True, or a (lo, hi) pair of finite floats with lo < hi."""
    if isinstance(v, bool):
        return v
    try:
        lo, hi = (float(b) for b in v)
    except (TypeError, ValueError):
        raise ValueError(f"clamp_x must be False, True or a (lo, hi) pair of numbers, got {v!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"clamp_x must be a finite range with lo < hi, got {v!r}")
    return (lo, hi)


def _is_int(v) -> bool:
    """An integer (numpy's included), not a bool and not a float that happens to be whole."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class ResolvedConfig:
    """A TeaCacheConfig with every choice made: what the state machine and the kernels run on.

    With a coefficients file, `calibrated` holds a set per fitted sequence length, and the state of a
    context runs on `for_sequence(its length)`: that length's coefficients (and threshold, clamp range).
    """

    rel_l1_thresh: float
    coefficients: tuple[float, ...]
    num_inference_steps: int | None
    warmup_steps: int
    cooldown_steps: int
    coefficient_set: str | None  # the published set's name, when one was used
    max_consecutive_skips: int | None = None
    min_skip_step: int | None = None
    max_skip_step: int | None = None
    x_range: tuple[float, float] | None = None  # clamp x to this range before the polynomial
    signal: str = "modulated_input"  # which tensor the span compares (coefficients.RUNTIME_SIGNALS)
    calibrated: tuple[_coefficients.CalibratedSet, ...] = ()
    calibrated_model: str | None = None
    thresh_from_file: bool = False  # rel_l1_thresh comes from each length's recommended_thresh
    clamp_to_calibrated: bool = False  # x_range comes from each length's fitted range
    abs_rescaled: bool = False  # accumulate |poly(x)|
    denominator_eps: float = 0.0  # x = mean|m - m_prev| / (mean|m_prev| + eps)
    warmup_fraction: float | None = None  # the set's forced first calls as a fraction of num_inference_steps
    # Ranks that split the sequence (context parallelism, parallel.py): a rank's stream holds 1/ranks of the tokens,
    # and a calibrated file's set is chosen by the whole sequence's length.
    sequence_ranks: int = 1

    def forced_first(self) -> int:
        """How many calls at the start of a generation compute whatever the distance. A fraction of the steps
        forces the calls with index < fraction * steps (HiDream-Full's `cnt < num_steps * 0.1`): its ceiling."""
        if self.warmup_fraction is not None and self.num_inference_steps is not None:
            return math.ceil(self.warmup_fraction * self.num_inference_steps)
        return self.warmup_steps

    @classmethod
    def resolve(cls, config: TeaCacheConfig, default_set: str | None) -> "ResolvedConfig":
        options = dict(
            num_inference_steps=config.num_inference_steps,
            warmup_steps=1 if config.warmup_steps is None else config.warmup_steps,
            cooldown_steps=1 if config.cooldown_steps is None else config.cooldown_steps,
            max_consecutive_skips=config.max_consecutive_skips,
            min_skip_step=config.min_skip_step,
            max_skip_step=config.max_skip_step,
            x_range=config.clamp_x if isinstance(config.clamp_x, tuple) else None,
            abs_rescaled=bool(config.abs_rescaled),
        )
        if config.coefficients_file is not None:
            return cls._from_file(config, options)
        chosen = config.coefficients if config.coefficients is not None else default_set
        if chosen is None:
            raise ValueError(
                "this model has no published coefficients: give coefficients=[...] (highest power first) or "
                "coefficients_file= (python -m teacache_kernels calibrate writes one)"
            )
        name = chosen if isinstance(chosen, str) else None
        thresh = config.rel_l1_thresh
        if thresh is None:
            if name is None:
                raise ValueError(
                    "rel_l1_thresh is required with explicit coefficients (only published sets carry a default)"
                )
            thresh = _coefficients.PUBLISHED[name].default_thresh
        if name is not None:  # the signal, forced calls and accumulation rule of the implementation the set comes from
            published = _coefficients.PUBLISHED[name]
            options["denominator_eps"] = published.denominator_eps
            if config.abs_rescaled is None:
                options["abs_rescaled"] = published.abs_rescaled
            if published.runtime_signal is not None:
                options["signal"] = published.runtime_signal
            if config.warmup_steps is None:
                options["warmup_steps"] = published.warmup_steps
                options["warmup_fraction"] = published.warmup_fraction
            if config.cooldown_steps is None:
                options["cooldown_steps"] = published.cooldown_steps
        return cls(
            rel_l1_thresh=float(thresh), coefficients=_coefficients.resolve(chosen), coefficient_set=name, **options
        )

    @classmethod
    def _from_file(cls, config: TeaCacheConfig, options: dict) -> "ResolvedConfig":
        model, sets = _coefficients.load_calibrated(config.coefficients_file, config.calibrated_model)
        thresh = config.rel_l1_thresh
        if thresh is None:
            missing = [s.seq_len for s in sets if s.recommended_thresh is None]
            if missing:
                raise ValueError(
                    f"rel_l1_thresh is required: {config.coefficients_file!r} has no recommended_thresh for model "
                    f"{model!r} at sequence length(s) {missing} (run `teacache_kernels threshold ... --save`)"
                )
        if config.clamp_x is True:
            options["x_range"] = sets[-1].x_range
        longest = sets[-1]  # what the config reports until a call fixes the sequence length
        return cls(
            rel_l1_thresh=float(thresh if thresh is not None else longest.recommended_thresh),
            coefficients=longest.coefficients,
            coefficient_set=None,
            signal=longest.signal,
            calibrated=sets,
            calibrated_model=model,
            thresh_from_file=thresh is None,
            clamp_to_calibrated=config.clamp_x is True,
            **options,
        )

    def __post_init__(self) -> None:
        # Each fitted length's config, built now on the host: `for_sequence` runs where a context allocates
        # its state, which can be inside a torch.compile trace, so it only indexes.
        variants = tuple(
            dataclasses.replace(
                self,
                coefficients=s.coefficients,
                rel_l1_thresh=s.recommended_thresh if self.thresh_from_file else self.rel_l1_thresh,
                x_range=s.x_range if self.clamp_to_calibrated else self.x_range,
                calibrated=(),
            )
            for s in self.calibrated
        )
        object.__setattr__(self, "_variants", variants)

    def for_sequence(self, seq_len: int) -> "ResolvedConfig":
        """The config a context of `seq_len` tokens (on this rank) runs on: the nearest fitted length's set, if calibrated."""
        if not self.calibrated:
            return self
        whole = seq_len * self.sequence_ranks
        return self._variants[_coefficients.nearest_index([s.seq_len for s in self.calibrated], whole)]
