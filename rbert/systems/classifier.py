"""``model=bert``: plain fine-tuning of a BERT sequence classifier (one exit)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rbert.data.tasks import TaskSpec
from rbert.models.classifier import BertForSequenceClassification
from rbert.systems.base import TaskSystem


class SequenceClassifier(TaskSystem):
    def __init__(self, task: TaskSpec, net: BertForSequenceClassification,
                 optimizer: Callable[..., torch.optim.Optimizer], warmup_ratio: float = 0.1):
        super().__init__(task, optimizer, warmup_ratio, exit_layers=[net.bert.num_layers])
        self.net = net

    def forward(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [self.net(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))]

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(self(batch)[-1], batch["labels"]), {}
