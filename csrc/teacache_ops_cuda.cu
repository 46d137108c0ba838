// CUDA kernels of teacache_cpp::decide and teacache_cpp::apply_residual (schemas in teacache_ops.cpp):
// the Triton kernels of teacache_kernels/ops/ in CUDA C++, for machines whose torch has no Triton.
//
// decide, one launch per step: every block streams its share of signal and prev_signal with 16-byte
// loads (grid-stride, at most MAX_PROGRAMS blocks), accumulates |m - m_prev| and |m_prev| in fp32, writes
// m into prev_signal, and stores its two block sums in `partials`. The last block to take a ticket (CUDA's
// threadFenceReduction pattern: fence, then atomicAdd) sums the partials in float64 and runs the state
// machine of teacache_state.h; it resets the ticket for the next launch. Nothing goes to the host.
// apply_residual, one launch: reads the flag on the device; reuse: out = x + residual, compute:
// residual = out - x; fp32 arithmetic, one rounding to the buffer dtype.
//
// Only c10/cuda headers (stream, guard, launch check): they need the CUDA runtime's headers and nothing
// else from the toolkit, so this file compiles against the ATen headers that the CPU torch wheel ships.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "teacache_checks.h"
#include "teacache_state.h"


namespace {

using teacache::MAX_PROGRAMS;

constexpr int kThreads = 256;  // 8 warps, as the Triton kernels

// Elements per 16-byte vector: 8 bf16/fp16, 4 fp32.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename V>
__device__ V block_sum(V v, V* shared) {  // shared: kThreads / 32 values
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : V(0);
  if (warp == 0) {
    for (int offset = kThreads / 64; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  __syncthreads();  // `shared` may be reused by the next call
  return v;          // the sum, in thread 0
}

template <typename T>
__device__ __forceinline__ void accumulate(T m, T p, float& diff, float& base) {
  const float pf = static_cast<float>(p);
  diff += fabsf(static_cast<float>(m) - pf);
  base += fabsf(pf);
}

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    decide_kernel(const T* __restrict__ signal, T* __restrict__ prev, int64_t numel, float* partials,
                  int* ticket, double* scalars, const double* config, double* log, int64_t log_capacity,
                  int64_t log_row_stride, bool* reuse_out) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  float diff = 0.0f, base = 0.0f;
  int64_t tail = 0;  // first element the vector loop leaves
  if (kVectorized) {  // both pointers 16-byte aligned (checked by the launcher)
    constexpr int N = kVec<T>;
    const int64_t vectors = numel / N;
    const uint4* s4 = reinterpret_cast<const uint4*>(signal);
    uint4* p4 = reinterpret_cast<uint4*>(prev);
    for (int64_t v = tid; v < vectors; v += stride) {
      const uint4 sv = s4[v];
      const uint4 pv = p4[v];
      p4[v] = sv;  // m_prev = m, bit for bit
      const T* sm = reinterpret_cast<const T*>(&sv);
      const T* pm = reinterpret_cast<const T*>(&pv);
#pragma unroll
      for (int j = 0; j < N; ++j) accumulate(sm[j], pm[j], diff, base);
    }
    tail = vectors * N;
  }
  for (int64_t i = tail + tid; i < numel; i += stride) {
    const T m = signal[i], p = prev[i];
    prev[i] = m;
    accumulate(m, p, diff, base);
  }

  __shared__ float shared_f[kThreads / 32];
  __shared__ double shared_d[kThreads / 32];
  __shared__ bool is_last;
  diff = block_sum(diff, shared_f);
  base = block_sum(base, shared_f);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = diff;
    partials[MAX_PROGRAMS + blockIdx.x] = base;
    __threadfence();  // the partials are visible to every block before the ticket says so
    is_last = atomicAdd(ticket, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();  // acquire side: read the other blocks' partials after their tickets

  // Float64 from here: each thread sums a strided subset of the partials, then the block tree.
  const volatile float* vp = partials;
  double sum_diff = 0.0, sum_base = 0.0;
  for (int i = threadIdx.x; i < static_cast<int>(gridDim.x); i += kThreads) {
    sum_diff += static_cast<double>(vp[i]);
    sum_base += static_cast<double>(vp[MAX_PROGRAMS + i]);
  }
  sum_diff = block_sum(sum_diff, shared_d);
  sum_base = block_sum(sum_base, shared_d);
  if (threadIdx.x == 0) {
    *reuse_out = teacache::finish_step(sum_diff, sum_base, numel, scalars, config, log, log_capacity, log_row_stride);
    *ticket = 0;  // every block has taken its ticket: ready for the next launch
  }
}

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    apply_residual_kernel(const bool* reuse_flag, const T* __restrict__ x, T* __restrict__ out,
                          T* __restrict__ residual, int64_t numel) {
  const bool reuse = *reuse_flag;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t tail = 0;
  if (kVectorized) {
    constexpr int N = kVec<T>;
    const int64_t vectors = numel / N;
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    // reuse: reads x and residual, writes out; compute: reads out and x, writes residual.
    const uint4* in4 = reinterpret_cast<const uint4*>(reuse ? residual : out);
    uint4* dst4 = reinterpret_cast<uint4*>(reuse ? out : residual);
    for (int64_t v = tid; v < vectors; v += stride) {
      const uint4 xv = x4[v], iv = in4[v];
      uint4 ov;
      const T* xm = reinterpret_cast<const T*>(&xv);
      const T* im = reinterpret_cast<const T*>(&iv);
      T* om = reinterpret_cast<T*>(&ov);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float a = static_cast<float>(xm[j]), b = static_cast<float>(im[j]);
        om[j] = static_cast<T>(reuse ? a + b : b - a);
      }
      dst4[v] = ov;
    }
    tail = vectors * N;
  }
  for (int64_t i = tail + tid; i < numel; i += stride) {
    const float a = static_cast<float>(x[i]);
    if (reuse) {
      out[i] = static_cast<T>(a + static_cast<float>(residual[i]));
    } else {
      residual[i] = static_cast<T>(static_cast<float>(out[i]) - a);
    }
  }
}

template <typename F>
void dispatch_float(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK(false, op, ": expected a float32, float16 or bfloat16 tensor, got ", dtype);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::Tensor decide_cuda(const at::Tensor& signal_in, at::Tensor& prev_signal, at::Tensor& scalars,
                       const at::Tensor& config, at::Tensor& log, at::Tensor& partials, at::Tensor& ticket) {
  teacache::check_decide_args(signal_in, prev_signal, scalars, config, log, partials, ticket);
  const c10::cuda::CUDAGuard guard(signal_in.device());
  const at::Tensor signal = signal_in.contiguous();
  at::Tensor reuse = at::empty({}, signal.options().dtype(at::kBool));
  const int64_t numel = signal.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(signal.scalar_type(), "teacache_cpp::decide", [&](auto tag) {
    using T = decltype(tag);
    const T* s = signal.const_data_ptr<T>();
    T* p = prev_signal.mutable_data_ptr<T>();
    // One block per kThreads vectors of work, at most MAX_PROGRAMS (the partials workspace): the grid-stride
    // loop covers the rest, as the Triton kernel's grid.
    const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(cdiv(numel, kThreads * kVec<T>), MAX_PROGRAMS)));
    auto launch = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(s, p, numel, partials.mutable_data_ptr<float>(),
                                              ticket.mutable_data_ptr<int>(), scalars.mutable_data_ptr<double>(),
                                              config.const_data_ptr<double>(), log.mutable_data_ptr<double>(),
                                              log.size(0), log.stride(0), reuse.mutable_data_ptr<bool>());
    };
    if (aligned16(s) && aligned16(p)) {
      launch(decide_kernel<T, true>);
    } else {
      launch(decide_kernel<T, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return reuse;
}

void apply_residual_cuda(const at::Tensor& reuse, const at::Tensor& x_in, at::Tensor& out, at::Tensor& residual) {
  teacache::check_apply_residual_args(reuse, x_in, out, residual);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t numel = x.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), "teacache_cpp::apply_residual", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    T* rp = residual.mutable_data_ptr<T>();
    const bool vectorized = aligned16(xp) && aligned16(op) && aligned16(rp);
    const int64_t work = vectorized ? cdiv(numel, kVec<T>) : numel;
    const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(cdiv(work, kThreads), 1 << 20)));
    const bool* flag = reuse.const_data_ptr<bool>();
    if (vectorized) {
      apply_residual_kernel<T, true><<<blocks, kThreads, 0, stream>>>(flag, xp, op, rp, numel);
    } else {
      apply_residual_kernel<T, false><<<blocks, kThreads, 0, stream>>>(flag, xp, op, rp, numel);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(teacache_cpp, CUDA, m) {
  m.impl("decide", &decide_cuda);
  m.impl("apply_residual", &apply_residual_cuda);
}

#if defined(TEACACHE_PYTHON_MODULE)
// Built by setup.py as teacache_kernels._C_cuda (see teacache_ops.cpp): importable, registers the CUDA kernels.
#include <Python.h>
static PyModuleDef teacache_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", "teacache_cpp CUDA kernels", -1, nullptr};
PyMODINIT_FUNC PyInit__C_cuda() { return PyModule_Create(&teacache_cuda_module); }
#endif
