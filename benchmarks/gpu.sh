#!/usr/bin/env bash
# The whole GPU benchmark in one go, about 10 minutes on one H100, all output in one file:
#   1. throughput of our trainer against the textbook pipeline (benchmarks/throughput.py), with
#      torch.compile off and then on for the two networks where its compile time may pay off;
#   2. accuracy at the notes' settings with the fast path on (AlexNet, 224 px, 10 epochs: notes 0.883);
#   3. what running 1, 2 or 4 vgg_ratio trials at once on the GPU buys (benchmarks/packing.py);
#   4. the main job, `python -m study launch vgg_ratio --trials 50 --preset full`, timed, in a scratch
#      STUDY_HOME under the results folder, with its best validation/test accuracy and its report.
# Steps 1-3 need only torch (Pillow comes with torchvision) and the Fashion-MNIST files: point
# FASHION_MNIST_DIR at them on a machine without the Debian package. Step 4 needs optuna, MLflow and
# plotly: when they are missing and wheels/ exists (made beforehand by `bash benchmarks/gpu_wheels.sh`
# on a machine with PyPI), they are installed from there with --no-index.
#
#   bash benchmarks/gpu.sh [RESULT_FILE]      default: benchmarks/gpu-YYYY-MM-DD.txt
#   GPU_SH_STEPS="4" bash benchmarks/gpu.sh   only some steps (default: 1 2 3 4)
#
# Copy the figures into benchmarks/RESULTS.md with the device, date and this command.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/gpu-$(date +%F).txt}
python=${PYTHON:-python3}
steps=${GPU_SH_STEPS:-1 2 3 4}
results=${out%.txt}
step() { [[ " $steps " == *" $1 "* ]]; }
{
  echo "# bash benchmarks/gpu.sh, $(date -u '+%F %T UTC'), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  if step 1; then
    echo "## 1. throughput"
    "$python" -m benchmarks.throughput --device cuda --json "$results-throughput.json"
    "$python" -m benchmarks.throughput --device cuda --compile --arch lenet --arch resnet18
  fi
  if step 2; then
    echo "## 2. accuracy at the notes' settings"
    "$python" -m benchmarks.accuracy --arch alexnet --device cuda || echo "accuracy check failed"
  fi
  if step 3; then
    echo "## 3. packing"
    "$python" -m benchmarks.packing --device cuda
  fi
  if step 4; then
    echo "## 4. python -m study launch vgg_ratio --trials 50 --preset full"
    if ! "$python" -c 'import optuna, mlflow, plotly' 2>/dev/null && [ -d wheels ]; then
      "$python" -m pip install -q --no-index --find-links wheels optuna mlflow-skinny plotly sqlalchemy alembic
    fi
    home="$results-vgg_ratio"
    rm -rf "$home" && mkdir -p "$home"
    started=$(date +%s)
    STUDY_HOME="$home" "$python" -m study launch vgg_ratio --trials 50 --preset full -o "$home/vgg_ratio.html" || echo "launch failed"
    echo "launch wall time: $(( $(date +%s) - started )) s"
    STUDY_HOME="$home" "$python" -m study show vgg_ratio --top 5 || echo "show failed"
  fi
} 2>&1 | tee "$out"
echo "results in $out"
