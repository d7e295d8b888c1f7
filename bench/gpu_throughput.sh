#!/usr/bin/env bash
# One command on a GPU machine: our SNN simulator against SpikingJelly's ann2snn on the same
# GPU (VGG-16 at CIFAR-10 size and an MNIST-size CNN, random weights, T=32 plus sweeps over T
# and batch size), whether float16 / bfloat16 / tf32 synaptic ops change the predicted class,
# the compiled IF scan on the small CNN, and the CUDA tests of the torch target.
# Writes bench/results/throughput_cuda.{json,md} and a log beside them.
#
#   bash bench/gpu_throughput.sh [extra bench/throughput.py flags, e.g. --quick]
#
# Needs python with torch (CUDA), onnx, onnxruntime, numpy; no network, no Lava. SpikingJelly
# (a benchmark-only dependency) and tqdm (which its converter imports; torchvision and scipy it
# does not need here) are used if installed, else installed from the wheels in .whl/, which
# you fetch beforehand on a machine with network (both are pure Python):
#
#   python3 -m pip download --no-deps -d .whl spikingjelly==0.0.0.0.14 tqdm
#
# Environment: PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
SJ_VERSION=0.0.0.0.14
mkdir -p bench/results
LOG="bench/results/gpu_throughput_$(date +%Y%m%d-%H%M%S).log"
exec > >(tee -a "$LOG") 2>&1
stamp() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*"; }

# shellcheck source=bench/wheels.sh
source bench/wheels.sh
install_missing "$PYTHON" spikingjelly=".whl/spikingjelly-${SJ_VERSION}-*.whl" tqdm=".whl/tqdm-*.whl"

"$PYTHON" - <<'PY'
import importlib.util, sys
import torch
missing = [m for m in ("onnx", "onnxruntime", "numpy", "tqdm", "spikingjelly") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"error: missing Python packages: {', '.join(missing)}")
if not torch.cuda.is_available():
    sys.exit("error: torch sees no CUDA device")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PY
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.max.sm --format=csv,noheader || true

stamp "CUDA tests of the torch target (fast path on the GPU vs the step-by-step reference)"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_torch_target.py -k cuda || stamp "CUDA tests FAILED (continuing with the benchmark)"

stamp "throughput: ours vs SpikingJelly on the GPU"
PYTHONUNBUFFERED=1 "$PYTHON" bench/throughput.py --device cuda --compile small_cnn "$@"
stamp "done: bench/results/throughput_cuda.md"
