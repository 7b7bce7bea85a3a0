"""facexplain core: face-recognition models and explainability methods as plain functions over tensors.

This package imports neither gRPC nor the MLflow server: services and training pipelines adapt it.
"""

__version__ = "0.1.0"
