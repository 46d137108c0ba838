// teacache_cpp::decide and teacache_cpp::apply_residual: the schemas of teacache::decide and
// teacache::apply_residual (teacache_kernels/ops/), and their CPU kernels. The CUDA kernels are in
// teacache_ops_cuda.cu; teacache_kernels/ops/cpp.py builds and loads this library and registers the fakes.
//
// CPU decide is one pass over memory: blocks of kBlock elements are reduced in fp32 lanes (vectorized
// with AVX2 where the CPU has it, chosen at run time), each block's fp32 partial is added in float64,
// and the block's signal is copied into prev_signal while it is still in L1. Chunks of kChunk elements run
// in parallel (at::parallel_for); their float64 partials are summed in chunk order, so the result does not
// depend on the number of threads. Then the state machine of teacache_state.h, in float64.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "teacache_checks.h"
#include "teacache_state.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define TEACACHE_X86_SIMD 1
// The vectorized loops are compiled for AVX2 + F16C whatever the build flags say; they run only where the
// CPU has both (checked once). Everything else is built for the baseline ISA.
#define TEACACHE_AVX2 __attribute__((target("avx2,f16c")))
#else
#define TEACACHE_X86_SIMD 0
#endif

namespace {

// fp32 partial sums cover one block: 16 fp32 lanes in the AVX2 loop (8 in the scalar one), so a lane adds
// 64 values (128) before float64 takes over, as few as the Triton kernel's lanes at large shapes; the
// error of x stays far inside the 1e-6 budget of tests/test_decide.py.
constexpr int64_t kBlock = 1024;
// Work unit of a thread: large enough to amortize waking the pool, small enough to split 10M elements.
constexpr int64_t kChunk = 64 * kBlock;

struct Sums {
  double diff = 0.0;  // sum|m - m_prev|
  double base = 0.0;  // sum|m_prev|
};

// ---- scalar loops: any CPU, any compiler ---------------------------------------------------------------

template <typename T>
void block_sums_scalar(const T* sig, const T* prev, int64_t n, float& diff, float& base) {
  constexpr int kLanes = 8;  // independent accumulators: what lets the compiler vectorize, and accuracy
  float d[kLanes] = {}, b[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float m = static_cast<float>(sig[i + j]);
      const float p = static_cast<float>(prev[i + j]);
      d[j] += std::fabs(m - p);
      b[j] += std::fabs(p);
    }
  }
  for (; i < n; ++i) {
    const float m = static_cast<float>(sig[i]);
    const float p = static_cast<float>(prev[i]);
    d[0] += std::fabs(m - p);
    b[0] += std::fabs(p);
  }
  diff = base = 0.0f;
  for (int j = 0; j < kLanes; ++j) {
    diff += d[j];
    base += b[j];
  }
}

template <typename T>
void apply_scalar(bool reuse, const T* x, T* out, T* residual, int64_t n) {
  // fp32 arithmetic, one rounding to T (round to nearest even): what torch does for `x + r`, `out - x`.
  if (reuse) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(residual[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) residual[i] = static_cast<T>(static_cast<float>(out[i]) - static_cast<float>(x[i]));
  }
}

// ---- AVX2 + F16C loops -----------------------------------------------------------------------------------

#if TEACACHE_X86_SIMD
TEACACHE_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TEACACHE_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  // bf16 is the high half of an fp32: widen to 32 bits and shift.
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
TEACACHE_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

TEACACHE_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
TEACACHE_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  // Round to nearest even, NaN -> 0x7FC0: c10::BFloat16(float), and torch's own vectorized conversion.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), is_nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
TEACACHE_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

TEACACHE_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename T>
TEACACHE_AVX2 void block_sums_avx2(const T* sig, const T* prev, int64_t n, float& diff, float& base) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // Two accumulators per sum: enough to hide the add latency at memory speed.
  __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 p0 = load8(prev + i), p1 = load8(prev + i + 8);
    d0 = _mm256_add_ps(d0, _mm256_and_ps(_mm256_sub_ps(load8(sig + i), p0), abs_mask));
    d1 = _mm256_add_ps(d1, _mm256_and_ps(_mm256_sub_ps(load8(sig + i + 8), p1), abs_mask));
    b0 = _mm256_add_ps(b0, _mm256_and_ps(p0, abs_mask));
    b1 = _mm256_add_ps(b1, _mm256_and_ps(p1, abs_mask));
  }
  float d = hsum8(_mm256_add_ps(d0, d1)), b = hsum8(_mm256_add_ps(b0, b1));
  for (; i < n; ++i) {
    const float m = static_cast<float>(sig[i]);
    const float p = static_cast<float>(prev[i]);
    d += std::fabs(m - p);
    b += std::fabs(p);
  }
  diff = d;
  base = b;
}

template <typename T>
TEACACHE_AVX2 void apply_avx2(bool reuse, const T* x, T* out, T* residual, int64_t n) {
  int64_t i = 0;
  if (reuse) {
    for (; i + 8 <= n; i += 8) store8(out + i, _mm256_add_ps(load8(x + i), load8(residual + i)));
  } else {
    for (; i + 8 <= n; i += 8) store8(residual + i, _mm256_sub_ps(load8(out + i), load8(x + i)));
  }
  apply_scalar(reuse, x + i, out + i, residual + i, n - i);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

template <typename T>
void block_sums(const T* sig, const T* prev, int64_t n, float& diff, float& base) {
#if TEACACHE_X86_SIMD
  if (cpu_has_avx2()) return block_sums_avx2(sig, prev, n, diff, base);
#endif
  block_sums_scalar(sig, prev, n, diff, base);
}

template <typename T>
void apply_block(bool reuse, const T* x, T* out, T* residual, int64_t n) {
#if TEACACHE_X86_SIMD
  if (cpu_has_avx2()) return apply_avx2(reuse, x, out, residual, n);
#endif
  apply_scalar(reuse, x, out, residual, n);
}

// Reads signal and prev once, writes signal into prev: the sums of the step, in float64.
template <typename T>
Sums reduce_and_copy(const T* sig, T* prev, int64_t numel) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  std::vector<Sums> partial(static_cast<size_t>(std::max<int64_t>(chunks, 1)));
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      Sums s;
      const int64_t end = std::min(numel, (c + 1) * kChunk);
      for (int64_t start = c * kChunk; start < end; start += kBlock) {
        const int64_t n = std::min(kBlock, end - start);
        float d, b;
        block_sums(sig + start, prev + start, n, d, b);
        s.diff += d;
        s.base += b;
        // The block is in L1 now; memmove keeps the exact bits (NaN payloads too) and allows signal == prev.
        std::memmove(prev + start, sig + start, static_cast<size_t>(n) * sizeof(T));
      }
      partial[static_cast<size_t>(c)] = s;
    }
  });
  Sums total;
  for (const Sums& s : partial) {
    total.diff += s.diff;
    total.base += s.base;
  }
  return total;
}

template <typename F>
void dispatch_float(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK(false, op, ": expected a float32, float16 or bfloat16 tensor, got ", dtype);  // checked before
  }
}

at::Tensor decide_cpu(const at::Tensor& signal_in, at::Tensor& prev_signal, at::Tensor& scalars,
                      const at::Tensor& config, at::Tensor& log, at::Tensor& partials, at::Tensor& ticket) {
  teacache::check_decide_args(signal_in, prev_signal, scalars, config, log, partials, ticket);
  const at::Tensor signal = signal_in.contiguous();
  const int64_t numel = signal.numel();
  Sums sums;
  dispatch_float(signal.scalar_type(), "teacache_cpp::decide", [&](auto tag) {
    using T = decltype(tag);
    sums = reduce_and_copy(signal.const_data_ptr<T>(), prev_signal.mutable_data_ptr<T>(), numel);
  });
  const bool reuse = teacache::finish_step(sums.diff, sums.base, numel, scalars.mutable_data_ptr<double>(),
                                           config.const_data_ptr<double>(), log.mutable_data_ptr<double>(),
                                           log.size(0), log.stride(0));
  at::Tensor flag = at::empty({}, signal.options().dtype(at::kBool));
  *flag.mutable_data_ptr<bool>() = reuse;
  return flag;
}

void apply_residual_cpu(const at::Tensor& reuse_flag, const at::Tensor& x_in, at::Tensor& out, at::Tensor& residual) {
  teacache::check_apply_residual_args(reuse_flag, x_in, out, residual);
  const at::Tensor x = x_in.contiguous();
  const bool reuse = reuse_flag.item<bool>();  // a CPU read: free
  const int64_t numel = x.numel();
  dispatch_float(x.scalar_type(), "teacache_cpp::apply_residual", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    T* rp = residual.mutable_data_ptr<T>();
    at::parallel_for(0, numel, kChunk, [&](int64_t begin, int64_t end) {
      apply_block(reuse, xp + begin, op + begin, rp + begin, end - begin);
    });
  });
}

// The layout this library was built with, in the order teacache_kernels/ops/cpp.py compares it.
std::vector<int64_t> layout() {
  using namespace teacache;
  return {ACC, STEP, HAS_PREV, LOGGED, CONSECUTIVE, CALLS, REUSED, NUM_SCALARS,
          THRESH, NUM_STEPS, WARMUP, COOLDOWN, MAX_CONSECUTIVE, MIN_SKIP_STEP, MAX_SKIP_STEP, X_LO, X_HI,
          ABS_RESCALED, DENOMINATOR_EPS, COEFFS, MAX_COEFFICIENTS, NUM_CONFIG,
          LOG_X, LOG_Y, LOG_ACC, LOG_REUSED, LOG_WIDTH, MAX_PROGRAMS};
}

}  // namespace

TORCH_LIBRARY(teacache_cpp, m) {
  // The fakes (for torch.compile / opcheck) are registered in Python, by this module.
  m.set_python_module("teacache_kernels.ops.cpp");
  m.def(
      "decide(Tensor signal, Tensor(a1!) prev_signal, Tensor(a2!) scalars, Tensor config, Tensor(a4!) log, "
      "Tensor(a5!) partials, Tensor(a6!) ticket) -> Tensor");
  m.def("apply_residual(Tensor reuse, Tensor x, Tensor(a2!) out, Tensor(a3!) residual) -> ()");
  m.def("layout() -> int[]", &layout);
}

TORCH_LIBRARY_IMPL(teacache_cpp, CPU, m) {
  m.impl("decide", &decide_cpu);
  m.impl("apply_residual", &apply_residual_cpu);
}

#if defined(TEACACHE_PYTHON_MODULE)
// Built by setup.py as the extension module teacache_kernels._C: importing it loads the library (and so
// registers the ops). The JIT build loads the library with torch.ops.load_library and leaves this out.
#include <Python.h>
static PyModuleDef teacache_module = {PyModuleDef_HEAD_INIT, "_C", "teacache_cpp ops (C++/CUDA)", -1, nullptr};
PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&teacache_module); }
#endif
