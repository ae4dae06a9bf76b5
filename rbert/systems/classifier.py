"""``model=bert``: plain fine-tuning of a BERT sequence (or, for a tagging task, token) classifier: one exit."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rbert.data.tasks import TaskSpec
from rbert.models.classifier import BertForSequenceClassification
from rbert.systems.base import TaskSystem
from rbert.systems.distill import Teacher, check_kd, kd_term


class SequenceClassifier(TaskSystem):
    """Cross-entropy (MSE for regression); with ``teacher`` (a fine-tuned checkpoint),
    (1 - gamma) CE + gamma T^2 KL to the teacher's logits: the distillation a multi-exit
    model may get (:mod:`rbert.systems.distill`), offered to the static-depth baselines too."""

    def __init__(self, task: TaskSpec, net: BertForSequenceClassification,
                 optimizer: Callable[..., torch.optim.Optimizer], warmup_ratio: float = 0.1,
                 teacher: str | None = None, temperature: float = 3.0, gamma: float = 0.9,
                 kd_reduction: str = "mean"):
        super().__init__(task, optimizer, warmup_ratio, exit_layers=[net.bert.num_layers])
        check_kd(temperature, gamma, kd_reduction)
        self.net = net
        self.teacher = Teacher(teacher, task) if teacher else None
        self.temperature, self.gamma, self.kd_reduction = temperature, gamma, kd_reduction

    def forward(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [self.net(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))]

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (logits,), labels = self.scored(batch)
        if self.teacher is None:
            return self.loss(logits, labels), {}
        distill = kd_term(logits, self.rows(self.teacher.logits(batch), batch), self.temperature, self.kd_reduction,
                          self.task.is_regression)
        return (1 - self.gamma) * self.loss(logits, labels) + self.gamma * distill, {"loss_kd": distill.detach()}
