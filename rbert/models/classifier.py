"""Sequence classification / regression on any backbone (:class:`~rbert.models.encoder.Encoder`)."""

from __future__ import annotations

import torch
from torch import nn

from rbert.models.encoder import Encoder

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

    def __init__(self, bert: Encoder, num_labels: int, pooling: str = "cls", dropout: float | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.bert = bert
        self.pooling = pooling
        # Families without a pooler (RoBERTa, DistilBERT, ELECTRA) get one of ours: dense + tanh.
        self.pooler = None
        if bert.pooler_dense is None:
            from rbert.models.bert import BertPooler

            self.pooler = BertPooler(bert.config)
            bert.init_weights(self.pooler.dense)
        self.dropout = nn.Dropout(bert.hidden_dropout if dropout is None else dropout)
        self.classifier = nn.Linear(bert.hidden_size, num_labels)
        bert.init_weights(self.classifier)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        dense = self.pooler.dense if self.pooler is not None else self.bert.pooler_dense
        pooled = torch.tanh(dense(pool(hidden, attention_mask, self.pooling)))
        return self.classifier(self.dropout(pooled))
