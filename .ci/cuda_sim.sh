#!/usr/bin/env bash
# CI for the CUDA backend without a GPU (docs/cuda.md). Expects the package
# installed as .ci/run does it; adds numba-cuda.
#  1. Every test parametrised over backends, for "cuda" (-k cuda), and
#     tests/test_cuda.py and benchmarks/test_gpu_bench.py, under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1:
#     kernels run as Python threads, one block after another). 3-5 minutes
#     on 2 cores.
#  2. Every kernel compiled for a real GPU (PTX for sm_90 through NVVM, then
#     ptxas for the registers per block), with NVVM/NVRTC from NVIDIA's
#     wheels; about a minute. CUDA_PTX_CHECK=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --quiet "numba-cuda>=0.30"

# fail loudly rather than skip every test if the backend does not come up
NUMBA_ENABLE_CUDASIM=1 $PY - <<'PYEOF'
import fastrnn as fr
ok, why = fr.available_backends()["cuda"]
print("cuda backend:", ok, why)
assert ok, f"the cuda backend should run under the simulator: {why}"
PYEOF
NUMBA_ENABLE_CUDASIM=1 $PY -m pytest tests/ -k cuda -q
# benchmarks/gpu_bench.py end to end on tiny shapes (its own test, beside it)
NUMBA_ENABLE_CUDASIM=1 $PY -m pytest benchmarks/test_gpu_bench.py -q

if [ "${CUDA_PTX_CHECK:-1}" != "0" ]; then
    $PY -m pip install --quiet "nvidia-cuda-nvcc-cu12>=12.4,<13" \
        "nvidia-cuda-nvrtc-cu12>=12.4,<13"
    FASTRNN_REQUIRE_PTX=1 $PY -m pytest tests/test_cuda.py -k compile_for_a_gpu -q -rs
fi
