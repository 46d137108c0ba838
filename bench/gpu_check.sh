#!/usr/bin/env bash
# The GPU check, on one GPU, in two parts of at most 8 minutes each (every step has a timeout), so that each fits
# one lent device session. Results land in bench/results/ (CSV rows stamped with the hardware), logs in
# bench/results/gpu_check/. Run from the repository root with the venv active:
#   bash bench/gpu_check.sh        # core: the GPU tests but the per-family ones (240 s), the kernel
#                                  # micro-benchmark (90 s), the CUDA-graph paths benchmark (90 + 60 s)
#   bash bench/gpu_check.sh more   # the per-family GPU tests, both CUDA-graph paths (360 s); the CUDA C++ ops (120 s)
set -uo pipefail
cd "$(dirname "$0")/.."
out=bench/results/gpu_check
mkdir -p "$out"
python - <<'PY' | tee "$out/hardware.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}")
PY
status=0
if [ "${1:-core}" = "more" ]; then
  timeout 360 python -m pytest -q -m gpu tests/test_gpu.py -k "family" -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu_families.log" || status=1
  timeout 120 python -m pytest -q -m gpu tests/test_cpp_ops.py -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu_cpp.log" || status=1
else
  timeout 240 python -m pytest -q -m gpu tests/test_gpu.py -k "not family" -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log" || status=1
  timeout 90 python bench/bench_decide.py 2>&1 | tee "$out/bench_decide.log" || status=1
  timeout 90 python bench/bench_cudagraphs.py 2>&1 | tee "$out/bench_cudagraphs.log" || status=1
  timeout 60 python bench/bench_cudagraphs.py --small 2>&1 | tee "$out/bench_cudagraphs_small.log" || status=1
fi
echo "gpu_check ${1:-core}: exit status $status (logs in $out/)"
exit $status
