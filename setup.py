# Metadata lives in pyproject.toml. This file adds the optional C++/CUDA ops of csrc/, opt-in and never
# required to import the package:
#
#     TEACACHE_BUILD_EXT=1 pip install --no-build-isolation -e .
#
# builds teacache_kernels/_C (CPU) and, where torch has CUDA and nvcc is found, teacache_kernels/_C_cuda;
# the package then loads them on the first eager call (teacache_kernels/ops/cpp.py says what runs).
# --no-build-isolation: the ops compile against the torch already installed; an isolated build would fetch
# a second torch to build against. TEACACHE_BUILD_CUDA=0 leaves the CUDA kernels out.
import os

from setuptools import setup


def extensions():
    if os.environ.get("TEACACHE_BUILD_EXT", "0") != "1":
        return {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # No fp contraction: the float64 decision rounds each multiply and add, as the torch path does.
    cxx = ["/O2", "/fp:precise"] if os.name == "nt" else ["-O3", "-ffp-contract=off"]
    common = dict(include_dirs=["csrc"], define_macros=[("TEACACHE_PYTHON_MODULE", None)])
    modules = [CppExtension("teacache_kernels._C", ["csrc/teacache_ops.cpp"], extra_compile_args={"cxx": cxx}, **common)]
    if torch.version.cuda and CUDA_HOME and os.environ.get("TEACACHE_BUILD_CUDA", "1") != "0":
        modules.append(CUDAExtension(
            "teacache_kernels._C_cuda", ["csrc/teacache_ops_cuda.cu"],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]}, **common,
        ))  # fmt: skip
    return {"ext_modules": modules, "cmdclass": {"build_ext": BuildExtension}}


setup(**extensions())
