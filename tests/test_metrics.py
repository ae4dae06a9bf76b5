"""Task metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from rbert.metrics import build_metrics, predictions
from tests.conftest import task_spec


def test_classification_metrics_mrpc_cola():
    preds = torch.tensor([1, 1, 0, 0, 1, 0])
    labels = torch.tensor([1, 0, 0, 1, 1, 0])
    tp, fp, fn, tn = 2, 1, 1, 2
    mrpc = build_metrics(task_spec("mrpc"), prefix="val/")
    mrpc.update(preds, labels)
    values = {k: v.item() for k, v in mrpc.compute().items()}
    assert values["val/accuracy"] == pytest.approx(4 / 6)
    assert values["val/f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    cola = build_metrics(task_spec("cola"))
    cola.update(preds, labels)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert cola.compute()["mcc"].item() == pytest.approx(mcc)


def test_regression_metrics_stsb():
    logits = torch.tensor([[0.1], [2.0], [1.5], [4.0], [3.3]])
    labels = torch.tensor([0.0, 2.5, 1.0, 5.0, 2.0])
    task = task_spec("stsb")
    metrics = build_metrics(task)
    metrics.update(predictions(logits, task), labels)
    values = {k: v.item() for k, v in metrics.compute().items()}
    assert values["pearson"] == pytest.approx(stats.pearsonr(logits.squeeze(), labels)[0], abs=1e-5)
    assert values["spearman"] == pytest.approx(stats.spearmanr(logits.squeeze(), labels)[0], abs=1e-5)


def test_mnli_accuracy_three_classes():
    task = task_spec("mnli")
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]])
    metrics = build_metrics(task)
    metrics.update(predictions(logits, task), torch.tensor([0, 1, 1, 0]))
    assert metrics.compute()["accuracy"].item() == pytest.approx(0.75)


def test_task_spec_rejects_inconsistent_settings():
    from rbert.errors import ConfigError

    with pytest.raises(ConfigError, match="f1 and mcc are binary"):
        task_spec("mnli", metrics=["f1"], monitor="f1")
    with pytest.raises(ConfigError, match="monitor"):
        task_spec("sst2", monitor="f1")
    with pytest.raises(ConfigError, match="labels"):
        task_spec("sst2", num_labels=3)
    with pytest.raises(ConfigError, match="not one of"):
        task_spec("stsb", metrics=["accuracy"], monitor="accuracy")
