// The TeaCache state machine of one call, shared by the CPU op (teacache_ops.cpp) and the CUDA op's last
// block (teacache_ops_cuda.cu): one definition, so the two cannot drift apart. It is the C++ twin of the
// last program of `_decide_kernel` and of `decide_torch` (teacache_kernels/ops/decide.py), which follow
// `reference.TeaCacheOracle`: float64 from the sums on, NaN/Inf force a compute and never reach the
// accumulator, forced steps come from the counters in `scalars`, the polynomial is Horner over the
// zero-padded coefficients, one log row per call, the counter wraps at the end of a generation.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TEACACHE_HD __host__ __device__
#else
#define TEACACHE_HD
#endif

namespace teacache {

// The buffer layout of teacache_kernels/state.py. The loader compares these with state.py through the
// `teacache_cpp::layout` op and refuses a library built against another layout.
constexpr int64_t ACC = 0, STEP = 1, HAS_PREV = 2, LOGGED = 3, CONSECUTIVE = 4, CALLS = 5, REUSED = 6;
constexpr int64_t NUM_SCALARS = 8;
constexpr int64_t THRESH = 0, NUM_STEPS = 1, WARMUP = 2, COOLDOWN = 3, MAX_CONSECUTIVE = 4, MIN_SKIP_STEP = 5,
                  MAX_SKIP_STEP = 6, X_LO = 7, X_HI = 8, ABS_RESCALED = 9, DENOMINATOR_EPS = 10, COEFFS = 11;
constexpr int64_t MAX_COEFFICIENTS = 8;
constexpr int64_t NUM_CONFIG = COEFFS + MAX_COEFFICIENTS;
constexpr int64_t LOG_X = 0, LOG_Y = 1, LOG_ACC = 2, LOG_REUSED = 3, LOG_WIDTH = 4;
// The CUDA op reduces in at most this many blocks; `partials` holds one fp32 pair per block.
constexpr int64_t MAX_PROGRAMS = 1024;

// (v - v) == 0 holds exactly for finite v, and is false for NaN and +-Inf; unlike std::isfinite it means
// the same in host and device code and is what the Triton kernel uses.
TEACACHE_HD inline bool finite(double v) { return (v - v) == 0.0; }

// a * b + c rounded twice, never fused into an fma: the rounding of decide_torch and the oracle's polyval.
// nvcc fuses a * b + c by default (--fmad=true), so device code spells the roundings out; host code is
// built with -ffp-contract=off (and without -mfma), where the plain expression rounds twice already.
TEACACHE_HD inline double mul_add_rn(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(__dmul_rn(a, b), c);
#else
  return a * b + c;
#endif
}

// One decision from the step's sums: sum|m - m_prev| and sum|m_prev| over `numel` elements. Updates
// `scalars` and the log row of this step in place; returns true to reuse the cached residual.
// `log` is [log_capacity, LOG_WIDTH] with row stride `log_row_stride` (in elements).
TEACACHE_HD inline bool finish_step(double sum_diff, double sum_base, int64_t numel, double* scalars,
                                    const double* config, double* log, int64_t log_capacity,
                                    int64_t log_row_stride) {
  const double nan = static_cast<double>(NAN);
  double acc = scalars[ACC];
  double step = scalars[STEP];
  const bool has_prev = scalars[HAS_PREV] > 0.0;
  double consecutive = scalars[CONSECUTIVE];
  const double thresh = config[THRESH];
  const double num_steps = config[NUM_STEPS];
  const double x_lo = config[X_LO], x_hi = config[X_HI];

  // mean|d| / (mean|p| + eps) = sum|d| / (sum|p| + eps * numel)
  const double den = mul_add_rn(config[DENOMINATOR_EPS], static_cast<double>(numel), sum_base);
  const double x = sum_diff / den;
  const bool is_finite = finite(sum_diff) && finite(den) && den > 0.0;
  const double x_poly = x < x_lo ? x_lo : (x > x_hi ? x_hi : x);  // compares: NaN passes through
  double y = config[COEFFS];
  for (int64_t i = 1; i < MAX_COEFFICIENTS; ++i) y = mul_add_rn(y, x_poly, config[COEFFS + i]);
  if (config[ABS_RESCALED] > 0.0) y = fabs(y);
  const double candidate = acc + y;
  bool forced = !has_prev || step < config[WARMUP] ||
                (num_steps > 0.0 && step >= num_steps - config[COOLDOWN]);
  forced = forced || thresh == 0.0;  // the off switch, whatever sign the polynomial takes
  forced = forced || consecutive >= config[MAX_CONSECUTIVE];
  forced = forced || step < config[MIN_SKIP_STEP] || step > config[MAX_SKIP_STEP];
  const bool reuse = !forced && is_finite && finite(candidate) && candidate < thresh;
  acc = reuse ? candidate : 0.0;
  consecutive = reuse ? consecutive + 1.0 : 0.0;

  const bool known = has_prev && is_finite;
  if (step < static_cast<double>(log_capacity)) {
    double* row = log + static_cast<int64_t>(step) * log_row_stride;
    row[LOG_X] = known ? x : nan;
    row[LOG_Y] = known ? y : nan;
    row[LOG_ACC] = acc;
    row[LOG_REUSED] = reuse ? 1.0 : 0.0;
  }

  step = step + 1.0;
  const bool wrap = num_steps > 0.0 && step >= num_steps;  // generation over: forget m_prev and acc
  const double capacity = static_cast<double>(log_capacity);
  scalars[ACC] = wrap ? 0.0 : acc;
  scalars[STEP] = wrap ? 0.0 : step;
  scalars[HAS_PREV] = wrap ? 0.0 : 1.0;
  scalars[CONSECUTIVE] = wrap ? 0.0 : consecutive;
  scalars[CALLS] = scalars[CALLS] + 1.0;
  scalars[REUSED] = scalars[REUSED] + (reuse ? 1.0 : 0.0);
  scalars[LOGGED] = step < capacity ? step : capacity;
  return reuse;
}

}  // namespace teacache
