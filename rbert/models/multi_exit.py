"""Multi-exit BERT: an internal classifier ("exit") after every layer (or a chosen subset).

Two exit styles, as in the papers' reference code:

* ``highway`` (DeeBERT, RomeBERT): every internal exit has its own pooler (dense + tanh,
  initialised from the backbone's pooler), then dropout and a linear classifier; the last
  exit is the backbone's own pooler + classifier.
* ``pabee`` (PABEE): one shared pooler (the backbone's) and a linear classifier per exit.

What the pooler sees is a setting: ``cls`` (the first token, as the references do) or
``mean`` (masked mean over the tokens). ``cls`` is a poor choice where the checkpoint's
early layers carry little in the first token (see docs/design.md).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from rbert.errors import ConfigError
from rbert.models.bert import BertModel, BertPooler
from rbert.models.classifier import POOLINGS, pool

EXIT_STYLES = ("highway", "pabee")


def exit_head(pooled: torch.Tensor, pooler_weight: torch.Tensor, pooler_bias: torch.Tensor,
              weight: torch.Tensor, bias: torch.Tensor, dropout: nn.Module | None = None) -> torch.Tensor:
    """An exit's arithmetic: dense + tanh (a BertPooler), dropout when training, linear."""
    hidden = torch.tanh(F.linear(pooled, pooler_weight, pooler_bias))
    if dropout is not None:
        hidden = dropout(hidden)
    return F.linear(hidden, weight, bias)


class ExitHead(nn.Module):
    """pooler (own, or the backbone's when ``pooler`` is None) -> dropout -> linear."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float, pooler: BertPooler | None):
        super().__init__()
        self.pooler = pooler
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def weights(self, shared_pooler: BertPooler) -> tuple[torch.Tensor, ...]:
        """The tensors :func:`exit_head` takes after ``pooled``."""
        pooler = self.pooler if self.pooler is not None else shared_pooler
        return pooler.dense.weight, pooler.dense.bias, self.classifier.weight, self.classifier.bias

    def forward(self, pooled: torch.Tensor, shared_pooler: BertPooler) -> torch.Tensor:
        return exit_head(pooled, *self.weights(shared_pooler), dropout=self.dropout if self.training else None)


class MultiExitBert(nn.Module):
    """A BERT with exits after the layers ``exit_layers`` (1-based; default: every layer).

    The last layer always has an exit: it is the model's final classifier.
    """

    def __init__(self, bert: BertModel, num_labels: int, exit_layers: list[int] | None = None,
                 style: str = "highway", pooling: str = "cls", dropout: float | None = None):
        super().__init__()
        if style not in EXIT_STYLES:
            raise ConfigError(f"model.net.style: unknown exit style {style!r}; choose one of {EXIT_STYLES}")
        if pooling not in POOLINGS:
            raise ConfigError(f"model.net.pooling: unknown pooling {pooling!r}; choose one of {POOLINGS}")
        n = bert.num_layers
        layers = sorted(set(exit_layers or range(1, n + 1)) | {n})
        if layers[0] < 1 or layers[-1] > n:
            raise ConfigError(f"model.net.exit_layers must lie in 1..{n} (the backbone's layers), got {exit_layers}")
        self.bert = bert
        self.exit_layers = layers
        self.style = style
        self.pooling = pooling
        p = bert.config.hidden_dropout_prob if dropout is None else dropout
        self.exits = nn.ModuleList(
            ExitHead(bert.hidden_size, num_labels, p,
                     copy.deepcopy(bert.pooler) if style == "highway" and layer != n else None)
            for layer in layers
        )
        for head in self.exits:
            bert._init_weights(head.classifier)

    @property
    def num_layers(self) -> int:
        return self.bert.num_layers

    def exit_logits(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits of exit number ``index`` (0-based, in ``exit_layers`` order) on that layer's output."""
        return self.exits[index](pool(hidden, attention_mask, self.pooling), self.bert.pooler)

    def exit_weights(self, index: int) -> tuple[torch.Tensor, ...]:
        """Exit ``index``'s tensors for :func:`exit_head`, for loops that look them up once."""
        return self.exits[index].weights(self.bert.pooler)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Logits of every exit (all layers run), final exit last."""
        states = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=True).hidden_states
        return [self.exit_logits(i, states[layer], attention_mask) for i, layer in enumerate(self.exit_layers)]
