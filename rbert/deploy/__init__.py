"""Deployment: an exported early-exit folder, its runtimes and an HTTP endpoint.

Nothing here imports Lightning or Hydra: an exported folder runs with torch (the PyTorch
engine, :class:`EarlyExitModel`) or onnxruntime (:class:`OnnxEarlyExitModel`), and
``rbert.deploy.server`` serves either.
"""

from rbert.deploy.folder import DeploySpec, FolderError, read_spec
from rbert.deploy.model import EarlyExitModel, save
from rbert.deploy.onnx_runtime import OnnxEarlyExitModel

__all__ = ["DeploySpec", "EarlyExitModel", "FolderError", "OnnxEarlyExitModel", "read_spec", "save"]
