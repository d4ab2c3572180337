"""Hydra entry point, stage DAG, artifact store and MLflow tracking of the quantization pipeline."""

__version__ = "0.1.0"
