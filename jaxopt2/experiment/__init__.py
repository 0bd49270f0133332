"""The experiment runner behind ``jaxopt2 run | compare | sweep | spectrum | list``.

Submodules (none imported here, so ``import jaxopt2.experiment`` stays cheap and starts no
jax backend):

* :mod:`~jaxopt2.experiment.config` — YAML configs validated into typed dataclasses; the
  bundled ones are the repository's ``configs/``, installed as the package ``jaxopt2.configs``.
* :mod:`~jaxopt2.experiment.tasks` (built on :mod:`~jaxopt2.experiment.task_base`; the user's
  own data files in :mod:`~jaxopt2.experiment.file_tasks` and
  :mod:`~jaxopt2.experiment.loaders`), :mod:`~jaxopt2.experiment.models` and
  :mod:`~jaxopt2.experiment.modular` and :mod:`~jaxopt2.experiment.lm` — small registries of
  offline tasks (synthetic problems, scikit-learn's bundled data sets, data files, grokking, a
  byte-level LM on the standard library's source) and equinox models.
* :mod:`~jaxopt2.experiment.optim` — optimizers built from configs through the registry.
* :mod:`~jaxopt2.experiment.engine` — THE training engine: one compiled chunk function over a
  leading member axis and one host loop (metrics, evaluation, diagnostics, checkpoints in
  :mod:`~jaxopt2.experiment.checkpoint`, signals, exact resume, the non-finite policy);
  :mod:`~jaxopt2.experiment.setup` — the pure setup it starts from (task, model, initial
  parameters, keys, loss, batches); :mod:`~jaxopt2.experiment.step` — the pieces of one step.
* :mod:`~jaxopt2.experiment.trainer` — ``jaxopt2 run``: the engine with one member, its
  summary and plots; :mod:`~jaxopt2.experiment.rundir` — run directories and the metrics file.
* :mod:`~jaxopt2.experiment.compare` — several optimizers on the same task, overlaid.
* :mod:`~jaxopt2.experiment.sweep` — a grid in one vmapped program
  (:mod:`~jaxopt2.experiment.sweep_grid` parses it, :mod:`~jaxopt2.experiment.sweep_report`
  writes the results).
* :mod:`~jaxopt2.experiment.spectrum` and :mod:`~jaxopt2.experiment.diagnostics` — Hessian
  spectra of checkpoints and curvature metrics during training; plots in
  :mod:`~jaxopt2.experiment.plots`.
"""
