#!/usr/bin/env bash
# The whole GPU benchmark in one go, all output in one file:
#   1. throughput of our trainer against the textbook pipeline (benchmarks/throughput.py), then the
#      small shapes of the full search spaces in training TFLOP/s and steps/s beside AlexNet-224's;
#   2. accuracy at the notes' settings with the fast path on (AlexNet, 224 px, 10 epochs: notes 0.883);
#   3. what running 1 or 4 vgg_ratio trials at once on the GPU buys (benchmarks/packing.py);
#   4. the main job, `python -m study launch vgg_ratio --trials 50 --preset full`, timed, in a scratch
#      STUDY_HOME under the results folder, with `show` (best validation/test accuracy) and its report;
#   5. torch.compile on and off for the two networks where its compile time may pay off.
# Steps 1-3 and 5 need only torch (Pillow comes with torchvision) and the Fashion-MNIST files: point
# FASHION_MNIST_DIR at them on a machine without the Debian package. Step 4 needs optuna, MLflow and
# plotly: when they are missing and wheels/ exists (made beforehand by `bash benchmarks/gpu_wheels.sh`
# on a machine with PyPI), they are installed from there with --no-index.
#
#   bash benchmarks/gpu.sh [RESULT_FILE]          default: benchmarks/gpu-YYYY-MM-DD.txt
#   GPU_SH_STEPS="4 1 2" bash benchmarks/gpu.sh   these steps, in this order (default: 1 2 3 4 5)
#   GPU_SH_LAUNCH_SECONDS=300 ...                 step 4 starts no new trial after this many seconds
#                                                 (launch --timeout; default: none, all 50 trials)
#   GPU_SH_TRIALS_PER_GPU=3 ...                   step 4 trains this many trials at once on the GPU (default: 1)
#   GPU_SH_STEP_SECONDS=200 ...                   each other step is stopped after this long (default: none)
#
# Copy the figures into benchmarks/RESULTS.md with the device, date and this command.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/gpu-$(date +%F).txt}
python=${PYTHON:-python3}
steps=${GPU_SH_STEPS:-1 2 3 4 5}
results=${out%.txt}
limit=()
[ -n "${GPU_SH_STEP_SECONDS:-}" ] && limit=(timeout "$GPU_SH_STEP_SECONDS")
launch_options=(--trials-per-gpu "${GPU_SH_TRIALS_PER_GPU:-1}")
[ -n "${GPU_SH_LAUNCH_SECONDS:-}" ] && launch_options+=(--timeout "$GPU_SH_LAUNCH_SECONDS")
mkdir -p "$(dirname "$out")"
{
  echo "# bash benchmarks/gpu.sh, $(date -u '+%F %T UTC'), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git'), steps: $steps"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  for step in $steps; do
    started=$(date +%s)
    case $step in
      1) echo "## 1. throughput"
         "${limit[@]}" "$python" -m benchmarks.throughput --device cuda --json "$results-throughput.json" ;;
      2) echo "## 2. accuracy at the notes' settings"
         "${limit[@]}" "$python" -m benchmarks.accuracy --arch alexnet --device cuda ;;
      3) echo "## 3. packing"
         "${limit[@]}" "$python" -m benchmarks.packing --device cuda --packing 1 --packing 4 ;;
      4) echo "## 4. python -m study launch vgg_ratio --trials 50 --preset full ${launch_options[*]}"
         if ! "$python" -c 'import optuna, mlflow, plotly' 2>/dev/null && [ -d wheels ]; then
           "$python" -m pip install -q --no-index --find-links wheels optuna mlflow-skinny plotly sqlalchemy alembic
         fi
         home="$results-vgg_ratio"
         rm -rf "$home" && mkdir -p "$home"
         STUDY_HOME="$home" "$python" -m study launch vgg_ratio --trials 50 --preset full "${launch_options[@]}" -o "$home/vgg_ratio.html"
         echo "launch exit status $?"
         STUDY_HOME="$home" "$python" -m study show vgg_ratio --top 5 ;;
      5) echo "## 5. torch.compile"
         "${limit[@]}" "$python" -m benchmarks.throughput --device cuda --compile --arch lenet --arch resnet18 --no-preset-shapes ;;
      *) echo "unknown step $step" ;;
    esac
    echo "step $step: exit status $?, $(( $(date +%s) - started )) s"
  done
} 2>&1 | tee "$out"
echo "results in $out"
