"""Every exit's logits on a dev set, and what a policy's thresholds answer from them.

One full forward pass gives every exit's logits; :func:`sweep` simulates each threshold
on them (exactly what the engine answers, :func:`rbert.inference.engine.simulate`), so
choosing a threshold costs no further model calls.

For a tagging task the targets are a :class:`TagTargets`: the labels of every row (a
sentence, or one window of a long one) padded to one width, and each row's sentence and
window numbers, so that entity F1 scores whole sentences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rbert.data.tasks import TaskSpec
from rbert.inference.engine import simulate
from rbert.inference.policies import ExitPolicy
from rbert.inference.words import IGNORE
from rbert.metrics import build_metrics, predictions
from rbert.systems.base import TaskSystem


@dataclass
class TagTargets:
    """A tagging set's targets: ``labels`` ``(rows, tokens)`` (``IGNORE`` off the scored words) and
    each row's ``sentence`` and ``window`` number."""

    labels: torch.Tensor
    sentence: torch.Tensor
    window: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def words(self) -> torch.Tensor:
        """Where the scored words' first pieces are: what a sentence-level exit policy looks at."""
        return self.labels != IGNORE

    def __getitem__(self, rows) -> TagTargets:
        return TagTargets(self.labels[rows], self.sentence[rows], self.window[rows])


def task_metric(task: TaskSpec, logits: torch.Tensor, labels, per_type: bool = False) -> dict[str, float]:
    metrics = build_metrics(task, sync=False, per_type=per_type)  # the samples in hand are the whole set
    if isinstance(labels, TagTargets):
        metrics.update(predictions(logits, task, labels.labels), labels.labels, sentence=labels.sentence,
                       window=labels.window)
    else:
        metrics.update(predictions(logits, task), labels)
    return {k: float(v) for k, v in metrics.compute().items()}


def words_of(labels) -> torch.Tensor | None:
    """The word mask a tagging set's policies decide on (None for sentence tasks)."""
    return labels.words if isinstance(labels, TagTargets) else None


@torch.no_grad()
def at_chance(task: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, margin: float = 0.02) -> bool:
    """Whether ``logits`` score what a constant answer would: the majority class's accuracy (within
    ``margin``), or an MCC / F1 / correlation within ``margin`` of 0 (a one-class answer's). An
    early-exit report on such a model would call leaving at the first exit free."""
    value = task_metric(task, logits, labels)[task.monitor]
    if task.monitor == "accuracy":
        gold = labels.labels[labels.words] if isinstance(labels, TagTargets) else labels
        majority = torch.bincount(gold.long()).max().item() / len(gold)
        return value <= majority + margin
    return abs(value) < margin + 0.03


def exit_logits(system: TaskSystem, loader, device: torch.device, autocast) -> tuple[list[torch.Tensor], object]:
    """Every exit's logits on every sample (one full pass), and the labels (a :class:`TagTargets`
    for tagging, whose rows and logits are padded to the longest row of the set)."""
    outs, labels, rows = [], [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            outs.append([z.float().cpu() for z in system(batch)])
        labels.append(batch["labels"].cpu())
        if "sentence" in batch:
            rows.append((batch["sentence"].cpu(), batch["window"].cpu()))
    if system.task.kind != "tagging":
        return [torch.cat(per_exit) for per_exit in zip(*outs)], torch.cat(labels)
    width = max(y.shape[1] for y in labels)
    logits = [torch.cat([F.pad(z, (0, 0, 0, width - z.shape[1])) for z in per_exit]) for per_exit in zip(*outs)]
    targets = TagTargets(torch.cat([F.pad(y, (0, width - y.shape[1]), value=IGNORE) for y in labels]),
                         torch.cat([s for s, _ in rows]), torch.cat([w for _, w in rows]))
    return logits, targets


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
        result = simulate(p, logits, layers, words_of(labels))
        mean_layer = result.exit_layer.float().mean().item()
        metrics = task_metric(task, result.logits, labels)
        rows.append({"policy": p.describe(), "threshold": value, **metrics,
                     "drop": 100 * (full - metrics[task.monitor]), "mean_exit_layer": mean_layer,
                     "layer_speedup": num_layers / mean_layer, "expected_saving": 1 - mean_layer / num_layers})
    return rows

