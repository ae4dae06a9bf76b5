"""Deployment: an exported early-exit folder, its runtimes and an HTTP endpoint.

Nothing here imports Lightning or Hydra: an exported folder runs with torch (the PyTorch
engine, :class:`EarlyExitModel`) or onnxruntime (:class:`OnnxEarlyExitModel`), and
``rbert.deploy.server`` serves either. Names are imported on first use, so that
``from rbert.deploy import OnnxEarlyExitModel`` (and the server on it) loads neither torch
nor transformers: a serving image needs ``requirements-serve.txt`` only.
"""

from importlib import import_module

_WHERE = {"DeploySpec": "folder", "FolderError": "folder", "read_spec": "folder", "EarlyExitModel": "model",
          "save": "model", "OnnxEarlyExitModel": "onnx_runtime", "FolderTokenizer": "tokenizer"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"rbert.deploy.{_WHERE[name]}"), name)
