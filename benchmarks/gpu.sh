#!/usr/bin/env bash
# The whole GPU benchmark in one go, about 10 minutes on one H100, all output in one file:
#   1. throughput of our trainer against the textbook pipeline (benchmarks/throughput.py), with
#      torch.compile off and then on for the two networks where its compile time may pay off;
#   2. accuracy at the notes' settings with the fast path on (AlexNet, 224 px, 10 epochs: notes 0.883);
#   3. what running 1, 2 or 4 vgg_ratio trials at once on the GPU buys (benchmarks/packing.py).
# Needs only torch (Pillow comes with torchvision) and the Fashion-MNIST files: point
# FASHION_MNIST_DIR at them on a machine without the Debian package.
#
#   bash benchmarks/gpu.sh [RESULT_FILE]      default: benchmarks/gpu-YYYY-MM-DD.txt
#
# Copy the figures into benchmarks/RESULTS.md with the device, date and this command.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/gpu-$(date +%F).txt}
python=${PYTHON:-python3}
{
  echo "# bash benchmarks/gpu.sh, $(date -u '+%F %T UTC'), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  echo "## 1. throughput"
  "$python" -m benchmarks.throughput --device cuda --json "${out%.txt}-throughput.json"
  "$python" -m benchmarks.throughput --device cuda --compile --arch lenet --arch resnet18
  echo "## 2. accuracy at the notes' settings"
  "$python" -m benchmarks.accuracy --arch alexnet --device cuda || echo "accuracy check failed"
  echo "## 3. packing"
  "$python" -m benchmarks.packing --device cuda
} 2>&1 | tee "$out"
echo "results in $out"
