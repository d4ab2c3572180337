"""Registers the pipeline's typed config schemas when Hydra scans its plugins.

conf/config.yaml starts from `pipeline_schema`, a ConfigStore entry that `python -m pipeline`
registers itself. Other programs that compose conf/ with Hydra (DVC's Hydra integration behind
`dvc exp run -S key=value`, which dumps the composition into params.yaml) only load Hydra
plugins, so this module does the registration there. Registering at import is how Hydra
plugins publish configs (the joblib and submitit launchers do the same); nothing else happens.
"""

from pipeline.app import register_configs

register_configs()
