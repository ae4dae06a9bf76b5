"""Every exit's logits on a dev set, and what a policy's thresholds answer from them.

One full forward pass gives every exit's logits; :func:`sweep` simulates each threshold
on them (exactly what the engine answers, :func:`rbert.inference.engine.simulate`), so
choosing a threshold costs no further model calls.
"""

from __future__ import annotations

import torch

from rbert.data.tasks import TaskSpec
from rbert.inference.engine import simulate
from rbert.inference.policies import ExitPolicy
from rbert.metrics import build_metrics, predictions
from rbert.systems.base import TaskSystem


def task_metric(task: TaskSpec, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    metrics = build_metrics(task, sync=False)  # the samples in hand are the whole set
    metrics.update(predictions(logits, task), labels)
    return {k: float(v) for k, v in metrics.compute().items()}


@torch.no_grad()
def at_chance(task: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, margin: float = 0.02) -> bool:
    """Whether ``logits`` score what a constant answer would: the majority class's accuracy (within
    ``margin``), or an MCC / F1 / correlation within ``margin`` of 0 (a one-class answer's). An
    early-exit report on such a model would call leaving at the first exit free."""
    value = task_metric(task, logits, labels)[task.monitor]
    if task.monitor == "accuracy":
        majority = torch.bincount(labels.long()).max().item() / len(labels)
        return value <= majority + margin
    return abs(value) < margin + 0.03


def exit_logits(system: TaskSystem, loader, device: torch.device, autocast) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every exit's logits on every sample (one full pass), and the labels."""
    outs, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            outs.append([z.float().cpu() for z in system(batch)])
        labels.append(batch["labels"].cpu())
    return [torch.cat(per_exit) for per_exit in zip(*outs)], torch.cat(labels)


def only(logits: list[torch.Tensor], exit_layers: list[int], keep: list[int]) -> list[torch.Tensor]:
    """The logits of the exits at the layers ``keep``, from those of all exits."""
    return [logits[exit_layers.index(layer)] for layer in keep]


def sweep(policy: ExitPolicy, logits: list[torch.Tensor], labels: torch.Tensor, layers: list[int],
          task: TaskSpec) -> list[dict]:
    """Simulated metric and layer-count speed-up for each threshold of ``policy.sweep``."""
    num_layers = layers[-1]
    full = task_metric(task, logits[-1], labels)[task.monitor]
    rows = []
    for value in policy.sweep or [None]:
        p = policy if value is None else policy.with_threshold(value)
        result = simulate(p, logits, layers)
        mean_layer = result.exit_layer.float().mean().item()
        metrics = task_metric(task, result.logits, labels)
        rows.append({"policy": p.describe(), "threshold": value, **metrics,
                     "drop": 100 * (full - metrics[task.monitor]), "mean_exit_layer": mean_layer,
                     "layer_speedup": num_layers / mean_layer, "expected_saving": 1 - mean_layer / num_layers})
    return rows

