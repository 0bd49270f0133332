"""The experiment runner behind ``jaxopt2 run | compare | list``.

Submodules (none imported here, so ``import jaxopt2.experiment`` stays cheap and starts no
jax backend):

* :mod:`~jaxopt2.experiment.config` — YAML configs validated into typed dataclasses.
* :mod:`~jaxopt2.experiment.tasks` and :mod:`~jaxopt2.experiment.models` — small registries
  of offline tasks (synthetic problems and scikit-learn's bundled data sets) and equinox models.
* :mod:`~jaxopt2.experiment.optim` — optimizers built from configs through the registry.
* :mod:`~jaxopt2.experiment.trainer` — the training loop, checkpoints and exact resume.
* :mod:`~jaxopt2.experiment.compare` — several optimizers on the same task, overlaid.
"""
