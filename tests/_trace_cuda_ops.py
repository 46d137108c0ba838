"""Helper for test_cuda_trace.py, run in its own process (Triton's codegen needs TRITON_INTERPRET unset).

Traces one TeaCache step (decide, then apply_residual) on fake CUDA tensors through AOTAutograd, the
path Inductor takes on a GPU, and prints what Inductor would be handed: each Triton kernel call's grid
and the arguments Triton's mutation analysis found written. A stub driver supplies the only thing that
analysis asks of a GPU: the target (sm_90).
"""

import json
import sys

import torch
import triton
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget

from teacache_kernels import state as S
from teacache_kernels.config import ResolvedConfig, TeaCacheConfig
from teacache_kernels.ops.apply_residual import apply_residual_
from teacache_kernels.ops.decide import decide


class StubDriver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0


def step(signal, prev, scalars, config, log, partials, ticket, x, residual):
    reuse = decide(signal, prev, scalars, config, log, partials, ticket)
    out = torch.empty_like(x)
    apply_residual_(reuse, x, out, residual)
    return out, reuse


def main(shape):
    triton.runtime.driver.set_active(StubDriver())
    config = ResolvedConfig.resolve(TeaCacheConfig(rel_l1_thresh=0.4, num_inference_steps=28), "flux")
    calls = []

    def capture(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                kw = node.kwargs
                calls.append({"args": sorted(k for k, v in kw["kwargs"].items() if isinstance(v, torch.fx.Node)),
                              "grid": list(kw["grid"][0]), "mutated": sorted(kw["tensors_to_clone"])})  # fmt: skip
        print(json.dumps(calls))
        sys.exit(0)  # the graph is what we wanted; running it would need a GPU

    with FakeTensorMode(), torch.no_grad():
        signal = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
        st = S.ContextState("trace")
        st.allocate(signal, signal, config)
        args = (signal, st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket, torch.empty_like(signal), st.residual)
        aot_function(step, fw_compiler=capture)(*args)


if __name__ == "__main__":
    main(tuple(int(d) for d in sys.argv[1:]))
