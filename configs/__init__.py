"""The run configs shipped with jaxopt2 (``jaxopt2 run <name>``, listed by ``jaxopt2 list``).

This folder is the one copy of the configs: pyproject.toml installs it as the package
``jaxopt2.configs`` (in a wheel and in an editable install alike), and
:func:`jaxopt2.experiment.config.locate_config` reads its ``*.yaml`` files with
:mod:`importlib.resources`. A new config is a new YAML file here; nothing is generated.
"""
