#!/usr/bin/env bash
# The GPU check, in one go, on one GPU: the GPU tests, the kernel micro-benchmark and the CUDA-graph paths benchmark.
# At most 8 minutes: each step has a timeout (240 + 90 + 90 + 60 s). Results land in bench/results/ (CSV rows stamped with the hardware) and the
# logs in bench/results/gpu_check/. Run from the repository root with the venv active: bash bench/gpu_check.sh
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
timeout 240 python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log" || status=1
timeout 90 python bench/bench_decide.py 2>&1 | tee "$out/bench_decide.log" || status=1
timeout 90 python bench/bench_cudagraphs.py 2>&1 | tee "$out/bench_cudagraphs.log" || status=1
timeout 60 python bench/bench_cudagraphs.py --small 2>&1 | tee "$out/bench_cudagraphs_small.log" || status=1
echo "gpu_check: exit status $status (logs in $out/)"
exit $status
