"""Per-context device state: pre-allocated buffers that the fused ops mutate in place.

CUDA-graph replay needs fixed addresses, so nothing here is reallocated between steps: a context's
buffers are allocated on its first call (or when the signal's shape, dtype or device changes) and a
new generation resets them in place. They are plain tensors on a plain object, not module buffers:
they never enter a `state_dict`, and `module.to(torch.bfloat16)` cannot downcast the float64 scalars.

All scalars are float64 (integers up to 2**53 are exact), so one pointer carries them to the kernel.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .coefficients import MAX_COEFFICIENTS
from .config import ResolvedConfig

# `scalars`: what the state machine carries from call to call.
ACC = 0  # accumulated rescaled distance
STEP = 1  # index of the next call within its generation
HAS_PREV = 2  # 1.0 once prev_signal holds this generation's previous signal
LOGGED = 3  # rows of `log` that belong to the current (or last finished) generation
CONSECUTIVE = 4  # reuses in a row just before the next call
GENERATION = slice(ACC, CONSECUTIVE + 1)  # what a new generation clears: adjacent, so one fill does it
CALLS = 5  # calls since the state was allocated
REUSED = 6  # of those, calls that reused the residual
NUM_SCALARS = 8

# `config`: what the user chose, on the device so changing it never recompiles a graph.
THRESH = 0
NUM_STEPS = 1  # 0: unknown (no cooldown, no wrap)
WARMUP = 2
COOLDOWN = 3
MAX_CONSECUTIVE = 4  # inf: no limit
MIN_SKIP_STEP = 5  # 0: from the first call
MAX_SKIP_STEP = 6  # inf: to the last call
X_LO = 7  # clamp range of x before the polynomial; -inf, inf: no clamp
X_HI = 8
ABS_RESCALED = 9  # 1.0: accumulate |poly(x)|
DENOMINATOR_EPS = 10  # x = mean|m - m_prev| / (mean|m_prev| + eps)
COEFFS = 11  # MAX_COEFFICIENTS values, highest power first, left-padded with zeros
NUM_CONFIG = COEFFS + MAX_COEFFICIENTS

# `log` rows, one per call of the generation: what `summary()` shows.
LOG_X, LOG_Y, LOG_ACC, LOG_REUSED = 0, 1, 2, 3
LOG_WIDTH = 4
LOG_MIN_CAPACITY = 1024

# The fused decision reduces in at most this many programs (a power of two: the last program sums the
# partials with one tl.arange). 1024 is about one resident wave of 256-thread programs on an H100.
MAX_PROGRAMS = 1024


def config_values(config: ResolvedConfig) -> list[float]:
    """`config` as the kernel reads it (a calibrated config must be resolved `for_sequence` first)."""
    inf = float("inf")
    values = [0.0] * NUM_CONFIG
    values[THRESH] = config.rel_l1_thresh
    values[NUM_STEPS] = float(config.num_inference_steps or 0)
    values[WARMUP] = float(config.forced_first())
    values[COOLDOWN] = float(config.cooldown_steps)
    values[MAX_CONSECUTIVE] = inf if config.max_consecutive_skips is None else float(config.max_consecutive_skips)
    values[MIN_SKIP_STEP] = float(config.min_skip_step or 0)
    values[MAX_SKIP_STEP] = inf if config.max_skip_step is None else float(config.max_skip_step)
    values[X_LO], values[X_HI] = config.x_range if config.x_range is not None else (-inf, inf)
    values[ABS_RESCALED] = 1.0 if config.abs_rescaled else 0.0
    values[DENOMINATOR_EPS] = config.denominator_eps
    coeffs = config.coefficients
    values[COEFFS + MAX_COEFFICIENTS - len(coeffs) : COEFFS + MAX_COEFFICIENTS] = coeffs
    return values


def sequence_length(stream: torch.Tensor | torch.Size | tuple) -> int:
    """Tokens of a [batch, tokens, channels] stream (or its shape): what calibrated coefficients are keyed by."""
    shape = stream.shape if isinstance(stream, torch.Tensor) else stream
    return int(shape[-2]) if len(shape) >= 2 else 1


def log_capacity(config: ResolvedConfig) -> int:
    return max(LOG_MIN_CAPACITY, config.num_inference_steps or 0)


def layout_of(signal: torch.Tensor, streams: Sequence[torch.Tensor]) -> tuple:
    """What a context's buffers are shaped by: (signal shape, signal dtype, stream shapes, stream dtypes, device).

    A plain tuple of ints, dtypes and a device: a constant under torch.compile with static shapes.
    """
    return (
        tuple(signal.shape), signal.dtype, tuple(tuple(s.shape) for s in streams), tuple(s.dtype for s in streams),
        signal.device,
    )  # fmt: skip


def layout_key(layout: tuple) -> tuple | None:
    """What tells a layout's state apart (`layout_of`): its shapes, a tuple of tuples of ints. None when a size is
    symbolic (torch.compile with dynamic shapes: one state serves every size). Plain ints: a constant under
    static-shape compile, so selecting a layout's state adds no graph input."""
    signal_shape, _, stream_shapes, _, _ = layout
    shapes = (tuple(signal_shape), *(tuple(shape) for shape in stream_shapes))
    if not all(isinstance(d, int) for shape in shapes for d in shape):
        return None
    return shapes


def layout_name(key: tuple) -> str:
    """A layout key as summaries show it, e.g. "1x4096x3072|1x4096x3072"."""
    return "|".join("x".join(str(d) for d in shape) for shape in key)


class ContextState:
    """One CFG context's buffers, allocated by `allocate()` for a signal and its cached streams."""

    def __init__(self, name: str):
        self.name = name
        self.layout: tuple | None = None  # what the buffers are allocated for (`layout_of`)
        self.prev_signal: torch.Tensor | None = None  # signal shape and dtype
        self.residuals: tuple[torch.Tensor, ...] = ()  # one per cached stream, its shape and dtype
        self.scalars: torch.Tensor | None = None  # float64 [NUM_SCALARS]
        self.config: torch.Tensor | None = None  # float64 [NUM_CONFIG]
        self.log: torch.Tensor | None = None  # float64 [capacity, LOG_WIDTH]
        self.partials: torch.Tensor | None = None  # float32 [2 * MAX_PROGRAMS], the reduction's workspace
        self.ticket: torch.Tensor | None = None  # int32 [1], counts finished programs; reset by the last
        self.steps: int | None = None  # num_inference_steps of the config last written (host copy)
        self.seq_len: int | None = None  # the first stream's tokens: picks a calibrated config's set (if any)
        # States of this context keyed by a family's `state_key` (Lumina2: the joint sequence length, as its
        # original keys them), each a full ContextState of its own.
        self.keyed: dict[str, ContextState] = {}
        # States of this context for the other layouts it has been called with (a batch size or resolution seen
        # before its current one), by `layout_key`: switching back and forth reuses their buffers, so a compiled
        # graph of each layout keeps reading buffers that exist (no recompile), and each layout keeps its own count.
        self.layout_key: tuple | None = None  # the key of `layout`, set when allocated
        self.layouts: dict[tuple, ContextState] = {}

    def state_for(self, key: str | None) -> "ContextState":
        """This state (key None) or its sub-state for `key`, created empty on first use."""
        if key is None:
            return self
        if key not in self.keyed:
            self.keyed[key] = ContextState(key if self.name == "default" else f"{self.name}/{key}")
        return self.keyed[key]

    def for_layout(self, key: tuple | None) -> "ContextState":
        """The state for calls of layout `key` (`layout_key`): this one for its own (or first) layout, else a
        sub-state of its own, created empty on first use. None (dynamic shapes): this one."""
        if key is None or self.layout_key is None or self.layout_key == key:
            return self
        if key not in self.layouts:
            self.layouts[key] = ContextState(f"{self.name}@{layout_name(key)}")
        return self.layouts[key]

    def all_states(self) -> list["ContextState"]:
        return [s for st in (self, *self.keyed.values()) for s in (st, *st.layouts.values())]

    @property
    def residual(self) -> torch.Tensor | None:
        """The first cached stream's residual (the only one for single-stream families)."""
        return self.residuals[0] if self.residuals else None

    def allocate(self, signal: torch.Tensor, streams: torch.Tensor | Sequence[torch.Tensor], config: ResolvedConfig) -> None:
        streams = (streams,) if isinstance(streams, torch.Tensor) else tuple(streams)
        self.allocate_layout(layout_of(signal, streams), config)

    def allocate_layout(self, layout: tuple, config: ResolvedConfig) -> None:
        """Fresh buffers for `layout` (see `layout_of`), state at the start of a generation, lifetime counts at 0."""
        signal_shape, signal_dtype, stream_shapes, stream_dtypes, device = layout
        self.layout = layout
        self.layout_key = layout_key(layout)
        # int() of a symbolic size would specialize it: read the length only where calibrated sets need it.
        self.seq_len = sequence_length(stream_shapes[0]) if config.calibrated else None
        config = config.for_sequence(self.seq_len)
        f64 = dict(dtype=torch.float64, device=device)
        self.prev_signal = torch.zeros(signal_shape, dtype=signal_dtype, device=device)
        self.residuals = tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in zip(stream_shapes, stream_dtypes))
        self.scalars = torch.zeros(NUM_SCALARS, **f64)
        self.config = torch.tensor(config_values(config), **f64)
        self.steps = config.num_inference_steps
        self.log = torch.full((log_capacity(config), LOG_WIDTH), float("nan"), **f64)
        self.partials = torch.zeros(2 * MAX_PROGRAMS, dtype=torch.float32, device=device)
        self.ticket = torch.zeros(1, dtype=torch.int32, device=device)
        # Fixed addresses, mutated in place by the graphs that read them: static inputs to torch.compile (as
        # parameters are), which CUDA-graph trees require of a mutated input. Unguarded: another context's
        # buffers of the same layout do not recompile.
        for t in (self.prev_signal, *self.residuals, self.scalars, self.config, self.log, self.partials, self.ticket):
            torch._dynamo.mark_static_address(t, guard=False)

    def never_called(self) -> bool:
        """No call has run on this state's buffers yet. Reads the device: only when a new layout shows up."""
        return self.scalars[CALLS].item() == 0  # host-ok: once per new layout, off the per-step path

    @property
    def memory_bytes(self) -> int:
        """Device memory of this state's buffers: the previous signal, one residual per cached stream, the scalars."""
        buffers = (self.prev_signal, *self.residuals, self.scalars, self.config, self.log, self.partials, self.ticket)
        return sum(b.numel() * b.element_size() for b in buffers if b is not None)

    @property
    def allocated(self) -> bool:
        return self.scalars is not None

    def write_config(self, config: ResolvedConfig) -> None:
        """In place, so compiled graphs keep reading the same buffer."""
        if not self.allocated:
            return
        config = config.for_sequence(self.seq_len)
        if self.log.shape[0] < log_capacity(config):
            self.log = torch.full((log_capacity(config), LOG_WIDTH), float("nan"), dtype=torch.float64, device=self.log.device)
            torch._dynamo.mark_static_address(self.log, guard=False)
            self.scalars[LOGGED] = 0.0
        self.config.copy_(torch.tensor(config_values(config), dtype=torch.float64))
        self.steps = config.num_inference_steps

    def reset(self) -> None:
        """Start a new generation in place: clears the accumulator, counter and log view; keeps lifetime counts."""
        if self.allocated:
            self.scalars[GENERATION].zero_()
