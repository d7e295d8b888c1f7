#!/usr/bin/env bash
# The accuracy-latency tables in the README, one bench/accuracy_latency.py run per model
# (CPU; about 15 minutes each on one loaded core). Pass model names to run only those.
#
#   bash bench/accuracy_all.sh [mnist_cnn_default fmnist_cnn_clip fmnist_vgg_clip qcfs_fmnist_vgg_qcfs8 cifar10_vgg_clip
#                               cifar10_fast_clip cifar10_fast_qcfs4 cifar10_fast64_clip cifar10_air64_clip ...]
#
# Environment: PYTHON (default .venv/bin/python), DATA (default ../shared/data).
set -euo pipefail
shopt -s nullglob  # gaps(): a model family without results yet adds no file
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
DATA="${DATA:-../shared/data}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # busy cores: one thread each is much faster
bench() { "$PYTHON" bench/accuracy_latency.py "$@"; }
# the CIFAR-10 gaps beside the papers', from every fast-recipe model's table
gaps() { "$PYTHON" bench/paper_gaps.py bench/results/cifar10_fast*_*.json bench/results/cifar10_air*_*.json \
    --out bench/results/cifar10_paper_gaps; }

run() {
    case "$1" in
    mnist_cnn_default)
        bench --model models/mnist_cnn.onnx --data "$DATA/mnist" --out bench/results/mnist_cnn_default \
            --other-limit 2000 --methods ceiling/zero ceiling/half ceiling/optimal ;;
    fmnist_cnn_clip | fmnist_vgg_clip)
        bench --model "models/zoo/$1.onnx" --data "$DATA/fashion-mnist" --out "bench/results/$1" --other-limit 2000 ;;
    qcfs_fmnist_vgg_qcfs8)
        bench --model models/zoo/fmnist_vgg_qcfs8.onnx --data "$DATA/fashion-mnist" \
            --out bench/results/qcfs_fmnist_vgg_qcfs8 --other-limit 2000 \
            --methods ceiling/zero ceiling/half ceiling/optimal ;;
    cifar10_vgg_clip)
        bench --model models/zoo/cifar10_vgg_clip.onnx --data "$DATA/cifar10" --out bench/results/cifar10_vgg_clip \
            --other-limit 2000 -T 1,2,4,8,16,32,64 ;;
    cifar10_fast_clip | cifar10_fast_qcfs4)
        # the whole test set for every row: theta/2 to T=64, and v0 fitted anew at each T (one build per T)
        bench --model "models/zoo/$1.onnx" --data "$DATA/cifar10" --out "bench/results/$1" \
            -T 1,2,4,8,16,32,64 --methods ceiling/half ceiling/optimal --v0-T each
        gaps ;;
    cifar10_fast64_clip)
        # theta/2 on the whole test set to T=64; the fitted v0 and the latency calibration at each T
        # on the first 2000 images (one build per T; about 2 hours of the 2 cores in all)
        bench --model models/zoo/cifar10_fast64_clip.onnx --data "$DATA/cifar10" --out bench/results/cifar10_fast64_clip \
            -T 1,2,4,8,16,32,64 --methods ceiling/half ceiling/optimal ceiling/calibrated --v0-T each \
            --other-limit 2000 --full ceiling/half
        gaps ;;
    cifar10_air64_clip)
        # the latencies issue 15 judges (T=4 and 16) for every row, on the first 2000 test images
        bench --model models/zoo/cifar10_air64_clip.onnx --data "$DATA/cifar10" --out bench/results/cifar10_air64_clip \
            -T 4,16 --methods ceiling/half ceiling/optimal ceiling/calibrated --v0-T each --limit 2000
        gaps ;;
    thirdparty)
        bench --model models/zoo/thirdparty_lenet_relu_maxpool_fmnist.onnx --data "$DATA/fashion-mnist" \
            --out bench/results/thirdparty_lenet_relu_maxpool --other-limit 1000 ;;
    thirdparty_avgpool)
        bench --model models/zoo/thirdparty_lenet_relu_maxpool_fmnist.onnx --data "$DATA/fashion-mnist" \
            --out bench/results/thirdparty_lenet_avgpool_replaced --maxpool avg --methods p99.99/half ;;
    *) echo "unknown model $1" >&2; exit 2 ;;
    esac
}

models=("$@")
[ ${#models[@]} -gt 0 ] || models=(mnist_cnn_default fmnist_cnn_clip fmnist_vgg_clip qcfs_fmnist_vgg_qcfs8 cifar10_vgg_clip
    cifar10_fast_clip cifar10_fast_qcfs4 cifar10_fast64_clip cifar10_air64_clip
    thirdparty thirdparty_avgpool)
for model in "${models[@]}"; do
    run "$model"
done
"$PYTHON" bench/readme_tables.py
