"""Task metrics (torchmetrics), per GLUE convention."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import BinaryF1Score, BinaryMatthewsCorrCoef, MulticlassAccuracy

from rbert.data.tasks import TaskSpec


def build_metrics(task: TaskSpec, prefix: str = "") -> MetricCollection:
    """The task's metrics, logged as ``{prefix}{name}``."""
    factories = {
        "accuracy": lambda: MulticlassAccuracy(num_classes=task.num_labels, average="micro"),
        "f1": BinaryF1Score,
        "mcc": BinaryMatthewsCorrCoef,
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    return MetricCollection({name: factories[name]() for name in task.metrics}, prefix=prefix)


def predictions(logits: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """What metrics compare with the labels: class ids, or the score for regression (fp32)."""
    if task.is_regression:
        return logits.squeeze(-1).float()
    return logits.argmax(dim=-1)
