"""Task metrics (torchmetrics), per GLUE convention."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import BinaryF1Score, BinaryMatthewsCorrCoef, MulticlassAccuracy

from rbert.data.tasks import TaskSpec


def build_metrics(task: TaskSpec, prefix: str = "", sync: bool = True) -> MetricCollection:
    """The task's metrics, logged as ``{prefix}{name}``. ``sync=False``: computed on this process's
    samples alone, also under DDP (one rank's own evaluation, e.g. after training)."""
    factories = {
        "accuracy": lambda **kw: MulticlassAccuracy(num_classes=task.num_labels, average="micro", **kw),
        "f1": BinaryF1Score,
        "mcc": BinaryMatthewsCorrCoef,
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    return MetricCollection({name: factories[name](sync_on_compute=sync) for name in task.metrics}, prefix=prefix)


def predictions(logits: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """What metrics compare with the labels: class ids, or the score for regression (fp32)."""
    if task.is_regression:
        return logits.squeeze(-1).float()
    return logits.argmax(dim=-1)
