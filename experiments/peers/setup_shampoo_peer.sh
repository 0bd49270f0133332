#!/usr/bin/env bash
# Create the virtual environment of the Distributed Shampoo peer
# (experiments/peers/distributed_shampoo_autoencoder.py).
#
#   bash experiments/peers/setup_shampoo_peer.sh            # create (or reuse) the environment
#   PYTHON=python3.11 bash experiments/peers/setup_shampoo_peer.sh
#
# The environment lives at experiments/results/peer_envs/shampoo (ignored by git). It holds
# Google's Distributed Shampoo from PyPI (package precondition-opt, module
# precondition.distributed_shampoo) on a CPU build of jax.
#
# precondition-opt 0.3.0 declares every dependency under its "dev" extra only, so a plain
# `pip install precondition-opt` brings nothing else. Its distributed_shampoo module imports
# chex, flax (flax.struct), jax, numpy and optax; those are installed here explicitly. The
# module still calls the aliases jax.tree_map, jax.tree_flatten, jax.tree_unflatten and
# jax.tree_leaves, which current jax has removed: the peer script points them at their
# jax.tree_util equivalents before importing it (the check below does the same).
#
# The latest jax (0.10.2, the release the main project is tested on) works with that alias
# patch, so no older jax is needed. Every version is pinned to the set that was checked, and
# all are installed by one pip command so that the resolver cannot move jax to satisfy a newer
# flax or optax. Set JAX_VERSION to try another jax/jaxlib release (at your own risk).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
env_dir="$root/experiments/results/peer_envs/shampoo"
python_bin="${PYTHON:-python3}"
jax_version="${JAX_VERSION:-0.10.2}"

if [[ ! -x "$env_dir/bin/python" ]]; then
  echo "creating $env_dir with $($python_bin --version 2>&1)"
  mkdir -p "$(dirname "$env_dir")"
  "$python_bin" -m venv "$env_dir"
fi
py="$env_dir/bin/python"

"$py" -m pip install --upgrade --quiet pip
# One resolver run for everything (see above). numpy is left to the resolver.
"$py" -m pip install --quiet \
  "jax==$jax_version" "jaxlib==$jax_version" \
  "precondition-opt==0.3.0" "flax==0.12.8" "optax==0.2.8" "chex==0.1.92" numpy

# Import check: patch the removed aliases, import the optimizer, take one update on a tiny
# parameter (catches API breakage that a bare import would not), and print the versions.
XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_enable_concurrency_optimized_scheduler=false" "$py" - <<'EOF'
import importlib.metadata as md
import warnings

import jax
import jax.tree_util

for name in ("tree_map", "tree_flatten", "tree_unflatten", "tree_leaves"):
    if not hasattr(jax, name):
        setattr(jax, name, getattr(jax.tree_util, name))

import jax.numpy as jnp
from precondition import distributed_shampoo as ds

# The module asks for float64 inverse roots; without jax_enable_x64 they run in float32.
warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
opt = ds.distributed_shampoo(learning_rate=1e-3, block_size=4)
params = {"w": jnp.ones((4, 4))}
updates, _ = opt.update({"w": jnp.full((4, 4), 0.1)}, opt.init(params), params)
assert bool(jnp.all(jnp.isfinite(updates["w"]))), "distributed_shampoo update is not finite"

packages = ("jax", "jaxlib", "precondition-opt", "flax", "optax", "chex", "numpy")
print("peer environment ok: " + ", ".join(f"{p} {md.version(p)}" for p in packages))
print(f"devices: {jax.devices()}")
EOF
