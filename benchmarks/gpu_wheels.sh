#!/usr/bin/env bash
# The Python 3.12 wheels that a GPU machine with only torch, pandas, numpy, rich and matplotlib lacks
# to run `python -m study launch`, downloaded here (where PyPI is reachable) into one folder that
# travels with the working tree. mlflow-skinny instead of mlflow: the same client and SQLite store
# (with sqlalchemy and alembic) without the UI server's dependencies, about a fifth of the size.
#
#   bash benchmarks/gpu_wheels.sh [DIR]        default: wheels/ (git-ignored); prints the total size
#
# On the GPU machine:  python -m pip install --no-index --find-links wheels optuna mlflow-skinny plotly sqlalchemy alembic
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-wheels}
python=${PYTHON:-python3}
packages=("optuna>=5,<6" "mlflow-skinny>=3,<4" "plotly>=5" "sqlalchemy>=2" "alembic")
# What the GPU machine already has, and whatever comes with it there: not downloaded.
present='^(torch|numpy|pandas|rich|matplotlib|pillow|contourpy|cycler|fonttools|kiwisolver|pyparsing|python_dateutil|pytz|tzdata|six|markdown_it_py|mdurl|pygments|nvidia_.*|triton)-'
mkdir -p "$dir"
"$python" -m pip download -q --dest "$dir" --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "${packages[@]}"
for wheel in "$dir"/*.whl; do
  if [[ "$(basename "$wheel" | tr 'A-Z' 'a-z')" =~ $present ]]; then rm "$wheel"; fi
done
ls "$dir" | wc -l | xargs echo "wheels:"
du -sh "$dir"
size=$(du -sm "$dir" | cut -f1)
if [ "$size" -gt 64 ]; then echo "error: $dir holds $size MiB, more than the 64 MiB a device run carries" >&2; exit 1; fi
