"""teacache::decide -- the whole per-step TeaCache decision in one kernel launch.

One pass over memory: every program reads its share of the signal and of the previous signal once,
accumulates |m - m_prev| and |m_prev| in fp32, and writes m into m_prev. The last program to finish
(an atomic ticket) sums the per-program partials in float64, and runs the state machine of
`reference.TeaCacheOracle` on the device: x, poly(x), the accumulator, the forced steps from the device
step counter, the 0-d bool "reuse" flag, the per-step log and the wrap to a new generation. No value
ever goes to the host, so there is no sync and nothing for torch.compile to break a graph on.

Bytes moved per call: 2 reads + 1 write of the signal (plus a few hundred bytes of state).
"""

from typing import Callable

import torch
from torch.library import triton_op, wrap_triton

from .. import state as S
from ..coefficients import MAX_COEFFICIENTS
from . import cpp  # the optional C++ ops (ops/cpp.py): eager calls only, when built (cpp.implementation says)
from ._backend import FLOATS, HAS_TRITON, check_buffer, check_numel, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # a torch without Triton (Windows): the torch path and the C++ ops serve (_no_triton.py)
    from ._no_triton import tl, triton

# Triton reads module globals only when they are constexpr: mirror the layout of state.py.
_ACC = tl.constexpr(S.ACC)
_STEP = tl.constexpr(S.STEP)
_HAS_PREV = tl.constexpr(S.HAS_PREV)
_CALLS = tl.constexpr(S.CALLS)
_REUSED = tl.constexpr(S.REUSED)
_LOGGED = tl.constexpr(S.LOGGED)
_THRESH = tl.constexpr(S.THRESH)
_NUM_STEPS = tl.constexpr(S.NUM_STEPS)
_WARMUP = tl.constexpr(S.WARMUP)
_COOLDOWN = tl.constexpr(S.COOLDOWN)
_MAX_CONSECUTIVE = tl.constexpr(S.MAX_CONSECUTIVE)
_MIN_SKIP_STEP = tl.constexpr(S.MIN_SKIP_STEP)
_MAX_SKIP_STEP = tl.constexpr(S.MAX_SKIP_STEP)
_X_LO = tl.constexpr(S.X_LO)
_X_HI = tl.constexpr(S.X_HI)
_ABS_RESCALED = tl.constexpr(S.ABS_RESCALED)
_DENOMINATOR_EPS = tl.constexpr(S.DENOMINATOR_EPS)
_CONSECUTIVE = tl.constexpr(S.CONSECUTIVE)
_COEFFS = tl.constexpr(S.COEFFS)
_LOG_WIDTH = tl.constexpr(S.LOG_WIDTH)
_LOG_X = tl.constexpr(S.LOG_X)
_LOG_Y = tl.constexpr(S.LOG_Y)
_LOG_ACC = tl.constexpr(S.LOG_ACC)
_LOG_REUSED = tl.constexpr(S.LOG_REUSED)

BLOCK = 2048  # elements per program per loop iteration: 8 per thread at 8 warps, one 16-byte load of bf16
NUM_WARPS = 8


@triton.jit
def _state_machine(
    sum_diff,  # fp64: sum |m - m_prev| over the whole signal (every rank's share, under context parallelism)
    sum_base,  # fp64: sum |m_prev|
    numel,  # fp64: the whole signal's element count
    scalars_ptr,
    config_ptr,
    log_ptr,
    log_capacity,
    reuse_ptr,
    NUM_COEFFS: tl.constexpr,
):
    """`reference.TeaCacheOracle.decide` from the two sums on: run by one program (the last one to finish)."""
    acc = tl.load(scalars_ptr + _ACC)
    step = tl.load(scalars_ptr + _STEP)
    has_prev = tl.load(scalars_ptr + _HAS_PREV) > 0.0
    consecutive = tl.load(scalars_ptr + _CONSECUTIVE)
    thresh = tl.load(config_ptr + _THRESH)
    num_steps = tl.load(config_ptr + _NUM_STEPS)
    warmup = tl.load(config_ptr + _WARMUP)
    cooldown = tl.load(config_ptr + _COOLDOWN)
    x_lo = tl.load(config_ptr + _X_LO)
    x_hi = tl.load(config_ptr + _X_HI)

    # mean|d| / (mean|p| + eps) = sum|d| / (sum|p| + eps * numel)
    den = sum_base + tl.load(config_ptr + _DENOMINATOR_EPS) * numel
    x = sum_diff / den
    # (v - v) == 0 holds exactly for finite v: it is NaN for NaN and for +-Inf.
    finite = ((sum_diff - sum_diff) == 0.0) & ((den - den) == 0.0) & (den > 0.0)
    x_poly = tl.where(x < x_lo, x_lo, tl.where(x > x_hi, x_hi, x))  # compares: NaN passes through
    y = tl.load(config_ptr + _COEFFS)
    for i in tl.static_range(1, NUM_COEFFS):
        y = y * x_poly + tl.load(config_ptr + _COEFFS + i)
    y = tl.where(tl.load(config_ptr + _ABS_RESCALED) > 0.0, tl.abs(y), y)
    candidate = acc + y
    forced = (has_prev == 0) | (step < warmup) | ((num_steps > 0.0) & (step >= num_steps - cooldown))
    forced = forced | (thresh == 0.0)  # the off switch, whatever sign the polynomial takes
    forced = forced | (consecutive >= tl.load(config_ptr + _MAX_CONSECUTIVE))
    forced = forced | (step < tl.load(config_ptr + _MIN_SKIP_STEP)) | (step > tl.load(config_ptr + _MAX_SKIP_STEP))
    reuse = (forced == 0) & finite & ((candidate - candidate) == 0.0) & (candidate < thresh)
    acc = tl.where(reuse, candidate, 0.0)
    consecutive = tl.where(reuse, consecutive + 1.0, 0.0)

    known = has_prev & finite
    row = log_ptr + step.to(tl.int64) * _LOG_WIDTH
    in_log = step < log_capacity
    tl.store(row + _LOG_X, tl.where(known, x, float("nan")), mask=in_log)
    tl.store(row + _LOG_Y, tl.where(known, y, float("nan")), mask=in_log)
    tl.store(row + _LOG_ACC, acc, mask=in_log)
    tl.store(row + _LOG_REUSED, tl.where(reuse, 1.0, 0.0), mask=in_log)

    step = step + 1.0
    wrap = (num_steps > 0.0) & (step >= num_steps)  # generation over: forget m_prev and acc
    tl.store(scalars_ptr + _ACC, tl.where(wrap, 0.0, acc))
    tl.store(scalars_ptr + _STEP, tl.where(wrap, 0.0, step))
    tl.store(scalars_ptr + _HAS_PREV, tl.where(wrap, 0.0, 1.0))
    tl.store(scalars_ptr + _CONSECUTIVE, tl.where(wrap, 0.0, consecutive))
    tl.store(scalars_ptr + _CALLS, tl.load(scalars_ptr + _CALLS) + 1.0)
    tl.store(scalars_ptr + _REUSED, tl.load(scalars_ptr + _REUSED) + tl.where(reuse, 1.0, 0.0))
    tl.store(scalars_ptr + _LOGGED, tl.minimum(step, log_capacity * 1.0))
    tl.store(reuse_ptr, reuse)


@triton.jit
def _sum_pass(signal_ptr, prev_ptr, numel, partials_ptr, ticket_ptr, BLOCK: tl.constexpr, MAX_PROGRAMS: tl.constexpr):
    """Every program: its share of sum|m - m_prev| and sum|m_prev| (fp32) into `partials`, m written into m_prev.
    Returns whether this program finished last (it then reads every program's partials: `_totals`)."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)

    # Grid-stride loop, so the grid never exceeds MAX_PROGRAMS.
    diff = tl.zeros([BLOCK], dtype=tl.float32)
    base = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, numel, num_programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        m = tl.load(signal_ptr + offs, mask=mask, other=0.0)
        p = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(prev_ptr + offs, m, mask=mask)
        diff += tl.abs(m.to(tl.float32) - p)
        base += tl.abs(p)
    tl.store(partials_ptr + pid, tl.sum(diff, axis=0))
    tl.store(partials_ptr + MAX_PROGRAMS + pid, tl.sum(base, axis=0))

    # Ticket (CUDA's "threadFenceReduction" pattern). Triton stores the scalar partials from thread 0 and
    # takes the ticket from thread 0, in program order, so the atomic's release covers the partials, and
    # the last program's acquire makes every program's partials visible to it (tests/test_ptx.py checks
    # the shared predicate). The barrier keeps that true should the stores ever come from other threads.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == num_programs - 1


@triton.jit
def _totals(partials_ptr, MAX_PROGRAMS: tl.constexpr):
    """The last program: every program's partials, summed in fp64."""
    idx = tl.arange(0, MAX_PROGRAMS)
    live = idx < tl.num_programs(0)
    sum_diff = tl.sum(tl.load(partials_ptr + idx, mask=live, other=0.0, volatile=True).to(tl.float64), axis=0)
    sum_base = tl.sum(tl.load(partials_ptr + MAX_PROGRAMS + idx, mask=live, other=0.0, volatile=True).to(tl.float64), axis=0)
    return sum_diff, sum_base


@triton.jit
def _decide_kernel(
    signal_ptr,  # [numel] the signal m, any float dtype
    prev_ptr,  # [numel] m_prev, same dtype; overwritten with m
    numel,
    partials_ptr,  # fp32 [2 * MAX_PROGRAMS]: sum|m - m_prev| per program, then sum|m_prev| per program
    ticket_ptr,  # int32 [1]: programs finished; 0 between launches
    scalars_ptr,  # fp64 [NUM_SCALARS]
    config_ptr,  # fp64 [NUM_CONFIG]
    log_ptr,  # fp64 [log_capacity, LOG_WIDTH]
    log_capacity,
    reuse_ptr,  # bool []: out
    BLOCK: tl.constexpr,
    MAX_PROGRAMS: tl.constexpr,
    NUM_COEFFS: tl.constexpr,
):
    if _sum_pass(signal_ptr, prev_ptr, numel, partials_ptr, ticket_ptr, BLOCK, MAX_PROGRAMS):
        sum_diff, sum_base = _totals(partials_ptr, MAX_PROGRAMS)
        _state_machine(
            sum_diff, sum_base, numel.to(tl.float64), scalars_ptr, config_ptr, log_ptr, log_capacity, reuse_ptr, NUM_COEFFS
        )
        tl.store(ticket_ptr, 0)  # every other program has taken its ticket: ready for the next launch


@triton.jit
def _sums_kernel(
    signal_ptr, prev_ptr, numel, partials_ptr, ticket_ptr,
    sums_ptr,  # fp64 [3] out: sum|m - m_prev|, sum|m_prev|, numel (this rank's share: all-reduced next)
    BLOCK: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
):  # fmt: skip
    """The first half of `_decide_kernel`, for a signal split over ranks (context parallelism)."""
    if _sum_pass(signal_ptr, prev_ptr, numel, partials_ptr, ticket_ptr, BLOCK, MAX_PROGRAMS):
        sum_diff, sum_base = _totals(partials_ptr, MAX_PROGRAMS)
        tl.store(sums_ptr, sum_diff)
        tl.store(sums_ptr + 1, sum_base)
        tl.store(sums_ptr + 2, numel.to(tl.float64))
        tl.store(ticket_ptr, 0)


@triton.jit
def _finish_kernel(sums_ptr, scalars_ptr, config_ptr, log_ptr, log_capacity, reuse_ptr, NUM_COEFFS: tl.constexpr):
    """The second half: the state machine from the all-reduced sums (one program)."""
    _state_machine(
        tl.load(sums_ptr), tl.load(sums_ptr + 1), tl.load(sums_ptr + 2),
        scalars_ptr, config_ptr, log_ptr, log_capacity, reuse_ptr, NUM_COEFFS,
    )  # fmt: skip


def _grid(numel: int, block: int, max_programs: int = S.MAX_PROGRAMS) -> tuple[int]:
    """A grid-stride launch over `numel` signal elements: at most `max_programs` programs (the partials workspace)."""
    check_numel(numel, "signal")
    if not 1 <= max_programs <= S.MAX_PROGRAMS:  # the partials workspace holds S.MAX_PROGRAMS programs
        raise ValueError(f"max_programs must be in [1, {S.MAX_PROGRAMS}], got {max_programs}")
    return (max(1, min(triton.cdiv(numel, block), max_programs)),)


def launch_decide(
    signal: torch.Tensor,
    prev_signal: torch.Tensor,
    scalars: torch.Tensor,
    config: torch.Tensor,
    log: torch.Tensor,
    partials: torch.Tensor,
    ticket: torch.Tensor,
    reuse: torch.Tensor,
    *,
    kernel=_decide_kernel,
    block: int = BLOCK,
    max_programs: int = S.MAX_PROGRAMS,
) -> None:
    """Launch the kernel (eagerly, or with `kernel=wrap_triton(_decide_kernel)` for tracing)."""
    kernel[_grid(signal.numel(), block, max_programs)](
        signal,
        prev_signal,
        signal.numel(),
        partials,
        ticket,
        scalars,
        config,
        log,
        log.shape[0],
        reuse,
        BLOCK=block,
        MAX_PROGRAMS=S.MAX_PROGRAMS,
        NUM_COEFFS=MAX_COEFFICIENTS,
        num_warps=NUM_WARPS,
    )


def launch_sums(
    signal: torch.Tensor,
    prev_signal: torch.Tensor,
    partials: torch.Tensor,
    ticket: torch.Tensor,
    sums: torch.Tensor,
    *,
    kernel=_sums_kernel,
    block: int = BLOCK,
) -> None:
    """Launch the first half (this rank's sums into `sums`, fp64 [3]); the same grid as `launch_decide`."""
    kernel[_grid(signal.numel(), block)](
        signal, prev_signal, signal.numel(), partials, ticket, sums, BLOCK=block, MAX_PROGRAMS=S.MAX_PROGRAMS, num_warps=NUM_WARPS
    )


def launch_finish(sums, scalars, config, log, reuse, *, kernel=_finish_kernel) -> None:
    """Launch the second half: one program, the state machine from the (all-reduced) sums."""
    kernel[(1,)](sums, scalars, config, log, log.shape[0], reuse, NUM_COEFFS=MAX_COEFFICIENTS, num_warps=1)


def decide_torch(
    signal: torch.Tensor,
    prev_signal: torch.Tensor,
    scalars: torch.Tensor,
    config: torch.Tensor,
    log: torch.Tensor,
) -> torch.Tensor:
    """The same step in torch ops, branch-free (Inductor compiles it; tensors never reach the host)."""
    return finish_torch(sums_torch(signal, prev_signal), scalars, config, log)


def sums_torch(signal: torch.Tensor, prev_signal: torch.Tensor) -> torch.Tensor:
    """fp64 [sum|m - m_prev|, sum|m_prev|, numel]; m written into m_prev."""
    # fp32 elements and sums, as the kernel; float64 from the sums on. Measured at 1 x 4096 x 3072 bf16 on
    # CPU: relative error 1e-10 eager (cascade summation), 4e-8 compiled, and faster than summing in
    # float64. (torch.linalg.vector_norm(ord=1) in fp32 was off by 1e-3: it accumulates naively.)
    sum_diff = (signal.float() - prev_signal).abs().sum().double()
    sum_base = prev_signal.float().abs().sum().double()
    numel = torch.full((), signal.numel(), dtype=torch.float64, device=signal.device)
    sums = torch.stack([sum_diff, sum_base, numel])
    prev_signal.copy_(signal)
    return sums


def finish_torch(sums: torch.Tensor, scalars: torch.Tensor, config: torch.Tensor, log: torch.Tensor) -> torch.Tensor:
    """The state machine of `reference.TeaCacheOracle` from the sums on, branch-free."""
    sum_diff, sum_base, numel = sums[0], sums[1], sums[2]
    acc, step, has_prev = scalars[S.ACC], scalars[S.STEP], scalars[S.HAS_PREV] > 0
    consecutive = scalars[S.CONSECUTIVE]
    thresh, num_steps = config[S.THRESH], config[S.NUM_STEPS]
    warmup, cooldown = config[S.WARMUP], config[S.COOLDOWN]
    x_lo, x_hi = config[S.X_LO], config[S.X_HI]

    den = sum_base + config[S.DENOMINATOR_EPS] * numel  # mean|d| / (mean|p| + eps), as sums
    x = sum_diff / den
    finite = torch.isfinite(sum_diff) & torch.isfinite(den) & (den > 0)
    x_poly = torch.where(x < x_lo, x_lo, torch.where(x > x_hi, x_hi, x))  # compares: NaN passes through
    y = config[S.COEFFS]
    for i in range(1, MAX_COEFFICIENTS):
        y = y * x_poly + config[S.COEFFS + i]
    y = torch.where(config[S.ABS_RESCALED] > 0, y.abs(), y)
    candidate = acc + y
    forced = ~has_prev | (step < warmup) | ((num_steps > 0) & (step >= num_steps - cooldown)) | (thresh == 0)
    forced = forced | (consecutive >= config[S.MAX_CONSECUTIVE])
    forced = forced | (step < config[S.MIN_SKIP_STEP]) | (step > config[S.MAX_SKIP_STEP])
    reuse = ~forced & finite & torch.isfinite(candidate) & (candidate < thresh)
    acc = torch.where(reuse, candidate, 0.0)
    consecutive = torch.where(reuse, consecutive + 1, 0.0)

    known = has_prev & finite
    nan = torch.full_like(x, float("nan"))
    row = torch.stack([torch.where(known, x, nan), torch.where(known, y, nan), acc, reuse.double()])
    capacity = log.shape[0]
    in_log = step < capacity
    index = step.long().clamp(max=capacity - 1).view(1)  # a tensor index: no host read, no graph break
    log.index_copy_(0, index, torch.where(in_log, row.view(1, -1), log.index_select(0, index)))

    step = step + 1
    wrap = (num_steps > 0) & (step >= num_steps)
    zero, one = torch.zeros_like(step), torch.ones_like(step)
    updated = scalars.clone()
    updated[S.ACC] = torch.where(wrap, zero, acc)
    updated[S.STEP] = torch.where(wrap, zero, step)
    updated[S.HAS_PREV] = torch.where(wrap, zero, one)
    updated[S.CONSECUTIVE] = torch.where(wrap, zero, consecutive)
    updated[S.CALLS] = scalars[S.CALLS] + 1
    updated[S.REUSED] = scalars[S.REUSED] + reuse.double()
    updated[S.LOGGED] = step.clamp(max=capacity)
    scalars.copy_(updated)
    return reuse


@triton_op("teacache::decide", mutates_args={"prev_signal", "scalars", "log", "partials", "ticket"})
def _decide(
    signal: torch.Tensor,
    prev_signal: torch.Tensor,
    scalars: torch.Tensor,
    config: torch.Tensor,
    log: torch.Tensor,
    partials: torch.Tensor,
    ticket: torch.Tensor,
) -> torch.Tensor:

    if cpp.serves(signal):
        return cpp.decide(signal, prev_signal, scalars, config, log, partials, ticket)
    if not use_triton(signal):
        return decide_torch(signal, prev_signal, scalars, config, log)
    reuse = torch.empty((), dtype=torch.bool, device=signal.device)
    launch_decide(
        signal.contiguous(), prev_signal, scalars, config, log, partials, ticket, reuse, kernel=wrap_triton(_decide_kernel)
    )
    return reuse


@triton_op("teacache::partial_sums", mutates_args={"prev_signal", "partials", "ticket"})
def _partial_sums(
    signal: torch.Tensor, prev_signal: torch.Tensor, partials: torch.Tensor, ticket: torch.Tensor
) -> torch.Tensor:
    if not use_triton(signal):
        return sums_torch(signal, prev_signal)
    sums = torch.empty(3, dtype=torch.float64, device=signal.device)
    launch_sums(signal.contiguous(), prev_signal, partials, ticket, sums, kernel=wrap_triton(_sums_kernel))
    return sums


@triton_op("teacache::decide_finish", mutates_args={"scalars", "log"})
def _decide_finish(sums: torch.Tensor, scalars: torch.Tensor, config: torch.Tensor, log: torch.Tensor) -> torch.Tensor:
    if not use_triton(sums):
        return finish_torch(sums, scalars, config, log)
    reuse = torch.empty((), dtype=torch.bool, device=sums.device)
    launch_finish(sums, scalars, config, log, reuse, kernel=wrap_triton(_finish_kernel))
    return reuse


# Bound once: the per-step call skips the attribute lookups.
_decide_op = torch.ops.teacache.decide.default
_partial_sums_op = torch.ops.teacache.partial_sums.default
_decide_finish_op = torch.ops.teacache.decide_finish.default


def decide(
    signal: torch.Tensor,
    prev_signal: torch.Tensor,
    scalars: torch.Tensor,
    config: torch.Tensor,
    log: torch.Tensor,
    partials: torch.Tensor,
    ticket: torch.Tensor,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One TeaCache decision, on the device. Returns a 0-d bool tensor: True = reuse the residual.

    signal: the model's modulated input, any shape, fp32/fp16/bf16.
    prev_signal: contiguous, same shape and dtype as `signal`; overwritten with `signal`.
    scalars: float64 [state.NUM_SCALARS], config: float64 [state.NUM_CONFIG],
    log: float64 [capacity, state.LOG_WIDTH], partials: float32 [2 * state.MAX_PROGRAMS],
    ticket: int32 [1] (zero between calls). `state.ContextState` allocates all of them.
    sum_over_ranks: for a signal split over ranks (context parallelism; `parallel.SignalGroup`), a traceable
        function summing a fp64 [3] tensor over them. The decision is then two launches with the sum between:
        this rank's sums, then the state machine from the whole signal's, identical on every rank.
    """
    check_buffer("signal", signal, dtype=FLOATS, contiguous=False)
    check_buffer("prev_signal", prev_signal, dtype=signal.dtype, like=signal)
    for name, t, dtype, numel in (
        ("scalars", scalars, torch.float64, S.NUM_SCALARS),
        ("config", config, torch.float64, S.NUM_CONFIG),
        ("log", log, torch.float64, S.LOG_WIDTH),
        ("partials", partials, torch.float32, 2 * S.MAX_PROGRAMS),
        ("ticket", ticket, torch.int32, 1),
    ):
        check_buffer(name, t, dtype=dtype, numel=numel, device=signal.device)
    if log.dim() != 2 or log.shape[1] != S.LOG_WIDTH:
        raise ValueError(f"log must be [capacity, {S.LOG_WIDTH}], got shape {tuple(log.shape)}")
    if sum_over_ranks is None:
        if cpp.serves(signal):  # straight to the C++ op: the torch.library wrapper's dispatch costs ~35 us a call
            return cpp.decide(signal, prev_signal, scalars, config, log, partials, ticket)
        return _decide_op(signal, prev_signal, scalars, config, log, partials, ticket)
    sums = sum_over_ranks(_partial_sums_op(signal, prev_signal, partials, ticket))
    return _decide_finish_op(sums, scalars, config, log)
