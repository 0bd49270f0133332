#!/usr/bin/env bash
# Create the virtual environment of the kfac-jax peer
# (experiments/peers/kfac_jax_autoencoder.py).
#
#   bash experiments/peers/setup_kfac_peer.sh            # create (or reuse) the environment
#   PYTHON=python3.11 bash experiments/peers/setup_kfac_peer.sh
#
# The environment lives at experiments/results/peer_envs/kfac (ignored by git). It holds
# DeepMind's kfac-jax 0.0.8 from PyPI (module kfac_jax) on a CPU build of jax.
#
# kfac-jax 0.0.8's automatic layer registration (its jaxpr tag graph matcher) breaks on jax
# 0.10, the release the main project is tested on, so this environment uses jax/jaxlib 0.9.0.
# kfac-jax declares absl-py, immutabledict, numpy, distrax, jax, jaxlib, dm-tree, optax and
# typing-extensions; distrax brings chex and tfp-nightly (TensorFlow Probability's JAX
# substrate, published only as daily builds, so its exact build is pinned here). The peer
# script also imports optax (through experiments/digits_autoencoder.py).
#
# None of the latest releases of those dependencies needs a jax newer than 0.9.0 (optax 0.2.8
# asks for jax>=0.5.3, chex 0.1.92 and distrax 0.1.9 for jax>=0.7.0), so none is held back.
# Every version is pinned to the set that was checked, and all are installed by one pip
# command so that the resolver cannot move jax to satisfy a newer dependency. Set
# JAX_VERSION to try another jax/jaxlib release (at your own risk: 0.10 breaks kfac-jax).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
env_dir="$root/experiments/results/peer_envs/kfac"
python_bin="${PYTHON:-python3}"
jax_version="${JAX_VERSION:-0.9.0}"

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
  "kfac-jax==0.0.8" "optax==0.2.8" "chex==0.1.92" "distrax==0.1.9" "dm-tree==0.1.10" \
  "tfp-nightly==0.26.0.dev20261027" numpy

# Import check: build a kfac_jax.Optimizer the way the peer does (adaptive learning rate,
# momentum and damping, registered sigmoid cross-entropy loss, dense layers found by the
# automatic tag matcher), take one step on a tiny two-layer model (catches API and
# tag-matcher breakage that a bare import would not), and print the versions.
XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_enable_concurrency_optimized_scheduler=false" "$py" - <<'EOF'
import importlib.metadata as md
import warnings

# kfac_jax sets jax_pmap_shmap_merge, which jax 0.9 flags as deprecated on import.
warnings.filterwarnings("ignore", message=".*jax_pmap_shmap_merge.*")

import jax
import jax.numpy as jnp
import kfac_jax
import optax


def loss(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    kfac_jax.register_sigmoid_cross_entropy_loss(logits, x)
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=-1))


keys = jax.random.split(jax.random.PRNGKey(0), 3)
params = {
    "w1": 0.3 * jax.random.normal(keys[0], (4, 3)), "b1": jnp.zeros(3),
    "w2": 0.3 * jax.random.normal(keys[1], (3, 4)), "b2": jnp.zeros(4),
}
x = jax.random.uniform(keys[2], (8, 4))
opt = kfac_jax.Optimizer(
    value_and_grad_func=jax.value_and_grad(loss),
    l2_reg=0.0,
    use_adaptive_learning_rate=True,
    use_adaptive_momentum=True,
    use_adaptive_damping=True,
    initial_damping=1.0,
    num_burnin_steps=0,
)
rng = jax.random.PRNGKey(1)
state = opt.init(params, rng, x)
new_params, state, stats = opt.step(params, state, rng, batch=x, global_step_int=0)
blocks = [type(b).__name__ for b in opt._estimator.blocks]
assert blocks == ["DenseTwoKroneckerFactored"] * 2, f"unexpected curvature blocks {blocks}"
assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(new_params)), \
    "kfac_jax step is not finite"
assert float(loss(new_params, x)) < float(stats["loss"]), "kfac_jax step did not lower the loss"

packages = ("jax", "jaxlib", "kfac-jax", "optax", "chex", "distrax", "dm-tree",
            "tfp-nightly", "numpy")
print("peer environment ok: " + ", ".join(f"{p} {md.version(p)}" for p in packages))
print(f"devices: {jax.devices()}")
EOF
