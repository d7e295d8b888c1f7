#!/usr/bin/env bash
# CIFAR-10 on one GPU: train VGG-16 with clipped ReLU (about 6 minutes of training),
# export it, then measure ANN vs SNN accuracy and latency with bench/accuracy_latency.py.
# Fits in 10 minutes on one H200. Needs python with torch (CUDA), onnx, onnxruntime and numpy;
# no network, no Lava. Pillow (to decode the JPEGs) is unpacked from .whl/ when missing: fetch it
# beforehand with `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 -d .whl pillow`.
#
#   bash bench/gpu_cifar10.sh [CIFAR10_PATH]      (default ../shared/data/cifar10)
#
# On the lent device machine only the repository travels: copy the data in first and carry it
# with the wheels (both git-ignored): cp -r ../shared/data/cifar10 .cifar10, then run
# `bash bench/gpu_cifar10.sh .cifar10` with carry [".whl", ".cifar10"] (about 27 MB).
#
# Environment: PYTHON (default python3), TRAIN_SECONDS (per model, default 330), EPOCHS (at most; default 60),
# ARCHS (default "vgg16"; e.g. "vgg16 resnet20 vgg_fast": ResNet-20 converts for the torch target only,
# its residual Add does not lower to fixed point; each extra model adds about TRAIN_SECONDS + 2 minutes).
# Everything printed goes to bench/results/gpu_cifar10_<time>.log as well.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${1:-../shared/data/cifar10}"
PYTHON="${PYTHON:-python3}"
TRAIN_SECONDS="${TRAIN_SECONDS:-330}"
EPOCHS="${EPOCHS:-60}"
ARCHS="${ARCHS:-vgg16}"
RUN=bench/results/cifar10_vgg16_train
mkdir -p bench/results
LOG="bench/results/gpu_cifar10_$(date +%Y%m%d-%H%M%S).log"
exec > >(tee -a "$LOG") 2>&1

stamp() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*"; }

stamp "gpu_cifar10: data=$DATA python=$PYTHON log=$LOG"
# shellcheck source=bench/wheels.sh
source bench/wheels.sh
install_missing "$PYTHON" PIL=".whl/pillow-*.whl"
if [ ! -e "$DATA" ]; then
    echo "error: $DATA: no CIFAR-10 folder or tarball (pass its path as the first argument)" >&2
    exit 2
fi
"$PYTHON" - <<'PY'
import sys
import torch
missing = [m for m in ("onnx", "onnxruntime", "PIL", "numpy") if __import__("importlib").util.find_spec(m) is None]
if missing:
    sys.exit(f"error: missing Python packages: {', '.join(missing)}")
if not torch.cuda.is_available():
    sys.exit("error: torch sees no CUDA device")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PY
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true

for arch in $ARCHS; do
    run="bench/results/cifar10_${arch}_train"
    [ "$arch" = vgg16 ] && run="$RUN"
    stamp "training $arch (clip) on CIFAR-10: at most $EPOCHS epochs within ${TRAIN_SECONDS}s"
    if [ "$arch" = vgg_fast ]; then  # the CPU recipe at GPU width (64: 64-128-256 blocks)
        "$PYTHON" -m models.train --arch vgg_fast --width 64 --recipe fast --dataset cifar10 --data "$DATA" --act clip \
            --epochs "$EPOCHS" --time-budget "$TRAIN_SECONDS" --device cuda --threads 8 --seed 0 --out "$run"
    else
        "$PYTHON" -m models.train --arch "$arch" --dataset cifar10 --data "$DATA" --act clip \
            --epochs "$EPOCHS" --time-budget "$TRAIN_SECONDS" --batch-size 256 --optimizer sgd --lr 0.1 \
            --weight-decay 5e-4 --device cuda --threads 8 --seed 0 --out "$run"
    fi
    stamp "training $arch done"
    cat "$run/result.json"

    stamp "accuracy vs latency of the converted SNN ($arch)"
    "$PYTHON" bench/accuracy_latency.py --model "$run/model.onnx" --data "$DATA" --out "bench/results/cifar10_$arch" \
        --other-limit 2000
done
stamp "gpu_cifar10 finished in ${SECONDS}s; log: $LOG"
