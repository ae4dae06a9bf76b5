"""Sequence classification / regression on a :class:`~rbert.models.bert.BertModel`."""

from __future__ import annotations

import torch
from torch import nn

from rbert.errors import ConfigError
from rbert.models.bert import BertModel

POOLINGS = ("cls", "mean")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """One vector per sequence: the first token (``cls``) or the masked mean of all tokens."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    raise ValueError(f"unknown pooling {how!r}; choose one of {POOLINGS}")


class BertForSequenceClassification(nn.Module):
    """pool -> BERT pooler (dense + tanh) -> dropout -> linear, as in ``transformers``.

    Parameter names (``bert.*``, ``classifier.*``) match the ``transformers`` class, so its
    fine-tuned checkpoints load by name. ``num_labels=1`` is regression.
    """

    def __init__(self, bert: BertModel, num_labels: int, pooling: str = "cls", dropout: float | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"model.net.pooling: unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.bert = bert
        self.pooling = pooling
        self.dropout = nn.Dropout(bert.config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(bert.hidden_size, num_labels)
        bert._init_weights(self.classifier)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        pooled = self.bert.pooler(pool(hidden, attention_mask, self.pooling))
        return self.classifier(self.dropout(pooled))
