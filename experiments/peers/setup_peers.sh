#!/usr/bin/env bash
# Create the virtual environment of the PyTorch peer used by experiments/bench_curvature.py.
#
#   bash experiments/peers/setup_peers.sh            # create (or reuse) the environment
#   PYTHON=python3.11 bash experiments/peers/setup_peers.sh
#
# The environment lives at experiments/results/peer_envs/torch (ignored by git). It holds a
# CPU build of torch 2.13.0 and PyHessian. PyHessian's wheel declares only numpy and torch as
# requirements; its modules import torch, numpy, math, argparse, importlib and os, so numpy is
# the only extra package it needs. scipy and matplotlib are not imported by PyHessian and are
# not installed.
#
# Only torch==2.13.0 is installed on purpose: other releases resolve to multi-gigabyte CUDA
# builds. Set TORCH_SPEC to override (at your own risk), e.g. TORCH_SPEC="torch==2.13.0+cpu".
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
env_dir="$root/experiments/results/peer_envs/torch"
python_bin="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [[ ! -x "$env_dir/bin/python" ]]; then
  echo "creating $env_dir with $($python_bin --version 2>&1)"
  mkdir -p "$(dirname "$env_dir")"
  "$python_bin" -m venv "$env_dir"
fi
py="$env_dir/bin/python"

"$py" -m pip install --upgrade --quiet pip
# numpy first, so torch's optional numpy bridge is available.
"$py" -m pip install --quiet numpy
"$py" -m pip install --quiet "$torch_spec"
# PyHessian 0.1 pins nothing; --no-deps keeps pip from touching the torch we just chose.
"$py" -m pip install --quiet --no-deps pyhessian

"$py" - <<'EOF'
import numpy
import torch
import pyhessian

print(f"peer environment ok: torch {torch.__version__}, numpy {numpy.__version__}, "
      f"pyhessian from {pyhessian.__file__}")
if torch.cuda.is_available():
    print("note: this torch build sees a CUDA device; the benchmark runs the peer on CPU.")
EOF
