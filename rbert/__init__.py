"""rbert: efficient BERT (multi-exit fine-tuning, CoRe pre-training) as Lightning modules composed by Hydra.

Importing a subpackage imports only what it needs: ``rbert.models`` and ``rbert.deploy`` are
plain PyTorch (and onnxruntime), free of Lightning and Hydra.
"""
