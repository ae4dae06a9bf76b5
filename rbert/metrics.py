"""Task metrics (torchmetrics): GLUE's per task; for tagging, word accuracy and entity F1.

Entity-level F1 is ``seqeval``'s (default CoNLL mode, micro average over entities, and per
entity type): torchmetrics has none. :class:`EntityF1` keeps every scored word's predicted
and gold tag id with its sentence number (tensors, so DDP gathers them), puts each
sentence back together (a long one arrives as several windows) and asks seqeval.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import BinaryF1Score, BinaryMatthewsCorrCoef, MulticlassAccuracy

from rbert.data.tasks import TaskSpec
from rbert.inference.words import IGNORE, bio_transitions, decode_rows


class EntityF1(Metric):
    """seqeval's entity-level micro F1 (``entity_type`` None) or one type's F1, in [0, 1].

    ``update(preds, labels, sentence, window)``: tag ids ``[B, T]`` (``IGNORE`` where not
    scored), and each row's sentence number and window number within its sentence (without
    them each row is a sentence of its own).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, task, entity_type: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.task = task  # its tags may be read from the training file after this is built
        self.entity_type = entity_type
        for name in ("preds", "target", "sentence", "order"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("rows", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, sentence: torch.Tensor | None = None,
               window: torch.Tensor | None = None) -> None:
        rows, width = target.shape
        if sentence is None:
            sentence, window = self.rows + torch.arange(rows, device=target.device), None
        if window is None:
            window = torch.zeros(rows, dtype=torch.long, device=target.device)
        mask = target != IGNORE
        row = torch.arange(rows, device=target.device)[:, None].expand(rows, width)[mask]
        position = torch.arange(width, device=target.device)[None, :].expand(rows, width)[mask]
        self.preds.append(preds[mask])
        self.target.append(target[mask])
        self.sentence.append(sentence.to(target.device)[row])
        self.order.append(window.to(target.device)[row] * (1 << 20) + position)  # windows left to right
        self.rows += rows

    def sequences(self) -> tuple[list[list[str]], list[list[str]]]:
        """(predicted, gold) tag sequences, one per sentence."""
        if isinstance(self.preds, list) and not self.preds:
            return [], []
        preds, target, sentence, order = (
            (torch.cat(x) if isinstance(x, list) else x).cpu().numpy()
            for x in (self.preds, self.target, self.sentence, self.order))
        index = np.lexsort((order, sentence))
        preds, target, sentence = preds[index], target[index], sentence[index]
        cuts = np.flatnonzero(np.diff(sentence)) + 1
        tags = self.task.labels
        return ([[tags[i] for i in part] for part in np.split(preds, cuts)],
                [[tags[i] for i in part] for part in np.split(target, cuts)])

    def compute(self) -> torch.Tensor:
        from seqeval.metrics import classification_report, f1_score

        preds, target = self.sequences()
        if not target:
            return torch.tensor(0.0)
        if self.entity_type is None:
            return torch.tensor(float(f1_score(target, preds, zero_division=0)))
        report = classification_report(target, preds, output_dict=True, zero_division=0)
        # A type neither in the gold tags nor predicted has no F1 (seqeval leaves it out): NaN, not 0.
        return torch.tensor(float(report.get(self.entity_type, {}).get("f1-score", float("nan"))))


def tagging_metrics(task, per_type: bool, sync: bool) -> dict[str, Metric]:
    """Word accuracy (first pieces only) and, for BIO tasks, entity F1 (and one per type)."""
    metrics = {}
    for name in task.metrics:
        if name == "accuracy":
            metrics[name] = MulticlassAccuracy(num_classes=task.num_labels, average="micro", ignore_index=IGNORE,
                                               sync_on_compute=sync)
        else:
            metrics[name] = EntityF1(task, sync_on_compute=sync)
            if per_type:
                for kind in task.entity_types:
                    metrics[f"f1_{kind}"] = EntityF1(task, kind, sync_on_compute=sync)
    return metrics


def build_metrics(task: TaskSpec, prefix: str = "", sync: bool = True, per_type: bool = False) -> MetricCollection:
    """The task's metrics, logged as ``{prefix}{name}``. ``sync=False``: computed on this process's
    samples alone, also under DDP (one rank's own evaluation, e.g. after training). ``per_type``:
    a tagging task's F1 per entity type too (``f1_<type>``)."""
    if task.kind == "tagging":
        return MetricCollection(tagging_metrics(task, per_type, sync), prefix=prefix)
    factories = {
        "accuracy": lambda **kw: MulticlassAccuracy(num_classes=task.num_labels, average="micro", **kw),
        "f1": BinaryF1Score,
        "mcc": BinaryMatthewsCorrCoef,
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    return MetricCollection({name: factories[name](sync_on_compute=sync) for name in task.metrics}, prefix=prefix)


def predictions(logits: torch.Tensor, task: TaskSpec, labels: torch.Tensor | None = None) -> torch.Tensor:
    """What metrics compare with the labels: class ids, or the score for regression (fp32).

    Tagging: tag ids at the scored words (where ``labels`` is not ``IGNORE``), the best valid
    sequence for BIO tags (:func:`rbert.inference.words.decode_rows`).
    """
    if task.is_regression:
        return logits.squeeze(-1).float()
    if task.kind == "tagging" and labels is not None:
        transitions = bio_transitions(task.labels) if task.scheme == "bio" else None
        words = (labels != IGNORE).cpu().numpy()
        return torch.from_numpy(decode_rows(logits.detach().float().cpu().numpy(), words, transitions)
                                ).to(labels.device)
    return logits.argmax(dim=-1)
