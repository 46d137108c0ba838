// Argument checks of teacache_cpp::decide and teacache_cpp::apply_residual, inline in both libraries (the
// CPU one and the CUDA one are built and loaded separately). A wrong buffer would be read or written out
// of bounds by a kernel: better a clear error naming it. The Python wrappers check the same first.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "teacache_state.h"

namespace teacache {

inline void check_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t min_numel,
                         const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype, "teacache_cpp::decide: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() >= min_numel, "teacache_cpp::decide: ", name, " must hold at least ", min_numel,
              " elements, got shape ", t.sizes());
  TORCH_CHECK(t.device() == device, "teacache_cpp::decide: ", name, " is on ", t.device(), ", the signal on ", device);
  TORCH_CHECK(t.is_contiguous(), "teacache_cpp::decide: ", name, " must be contiguous");
}

inline void check_float(const at::Tensor& t, const char* op) {
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": expected a float32, float16 or bfloat16 tensor, got ", dtype);
}

inline void check_decide_args(const at::Tensor& signal, const at::Tensor& prev_signal, const at::Tensor& scalars,
                              const at::Tensor& config, const at::Tensor& log, const at::Tensor& partials,
                              const at::Tensor& ticket) {
  const at::Device device = signal.device();
  check_float(signal, "teacache_cpp::decide");
  TORCH_CHECK(prev_signal.scalar_type() == signal.scalar_type() && prev_signal.numel() == signal.numel() &&
                  prev_signal.device() == device && prev_signal.is_contiguous(),
              "teacache_cpp::decide: prev_signal must be contiguous, with the signal's dtype, size and device");
  check_buffer(scalars, "scalars", at::kDouble, NUM_SCALARS, device);
  check_buffer(config, "config", at::kDouble, NUM_CONFIG, device);
  check_buffer(log, "log", at::kDouble, LOG_WIDTH, device);
  TORCH_CHECK(log.dim() == 2 && log.size(1) == LOG_WIDTH, "teacache_cpp::decide: log must be [capacity, ", LOG_WIDTH,
              "], got shape ", log.sizes());
  check_buffer(partials, "partials", at::kFloat, 2 * MAX_PROGRAMS, device);
  check_buffer(ticket, "ticket", at::kInt, 1, device);
  // The Triton kernel's limit (int32 offsets), kept so that every implementation accepts the same inputs.
  TORCH_CHECK(signal.numel() < (int64_t{1} << 31) - (int64_t{1} << 24),
              "teacache_cpp::decide: the signal has ", signal.numel(), " elements (limit 2**31 - 2**24)");
}

inline void check_apply_residual_args(const at::Tensor& reuse, const at::Tensor& x, const at::Tensor& out,
                                      const at::Tensor& residual) {
  TORCH_CHECK(reuse.scalar_type() == at::kBool && reuse.dim() == 0 && reuse.device() == x.device(),
              "teacache_cpp::apply_residual: reuse must be a 0-d bool tensor on the stream's device");
  check_float(x, "teacache_cpp::apply_residual");
  for (const at::Tensor* t : {&out, &residual}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->numel() == x.numel() && t->device() == x.device() &&
                    t->is_contiguous(),
                "teacache_cpp::apply_residual: out and residual must be contiguous, with x's dtype, size and device");
  }
}

}  // namespace teacache
