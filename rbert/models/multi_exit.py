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

import torch
import torch.nn.functional as F
from torch import nn

from rbert.models.bert import BertPooler
from rbert.models.classifier import POOLINGS, pool
from rbert.models.encoder import Encoder

EXIT_STYLES = ("highway", "pabee")


def exit_head(pooled: torch.Tensor, pooler_weight: torch.Tensor, pooler_bias: torch.Tensor,
              weight: torch.Tensor, bias: torch.Tensor, dropout: nn.Module | None = None) -> torch.Tensor:
    """An exit's arithmetic: dense + tanh (a BertPooler), dropout when training, linear."""
    hidden = torch.tanh(F.linear(pooled, pooler_weight, pooler_bias))
    if dropout is not None:
        hidden = dropout(hidden)
    return F.linear(hidden, weight, bias)


class ExitHead(nn.Module):
    """pooler (own, or the shared one when ``pooler`` is None) -> dropout -> linear."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float, pooler: BertPooler | None):
        super().__init__()
        self.pooler = pooler
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def weights(self, shared_dense: nn.Linear) -> tuple[torch.Tensor, ...]:
        """The tensors :func:`exit_head` takes after ``pooled``."""
        dense = self.pooler.dense if self.pooler is not None else shared_dense
        return dense.weight, dense.bias, self.classifier.weight, self.classifier.bias

    def forward(self, pooled: torch.Tensor, shared_dense: nn.Linear) -> torch.Tensor:
        return exit_head(pooled, *self.weights(shared_dense), dropout=self.dropout if self.training else None)


def own_pooler(bert: Encoder) -> BertPooler:
    """A pooler for a head on ``bert``: a copy of the backbone's pooler projection, or a fresh one
    (initialised as the backbone's weights were) for families without a pooler."""
    pooler = BertPooler(bert.config)
    if bert.pooler_dense is not None:
        pooler.dense.load_state_dict(bert.pooler_dense.state_dict())
    else:
        bert.init_weights(pooler.dense)
    return pooler


def as_final_exit(classifier: nn.Module, index: int = 0) -> dict[str, torch.Tensor]:
    """A single-exit classifier's weights named as a multi-exit model's whose final exit is
    number ``index`` (its ``classifier.*`` becomes that exit's)."""
    return {(f"exits.{index}." + k if k.startswith("classifier.") else k): v
            for k, v in classifier.state_dict().items()}


class MultiExitBert(nn.Module):
    """A BERT with exits after the layers ``exit_layers`` (1-based; default: every layer).

    The last layer always has an exit: it is the model's final classifier.
    """

    def __init__(self, bert: Encoder, num_labels: int, exit_layers: list[int] | None = None,
                 style: str = "highway", pooling: str = "cls", dropout: float | None = None):
        super().__init__()
        if style not in EXIT_STYLES:
            raise ValueError(f"style: unknown exit style {style!r}; choose one of {EXIT_STYLES}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: unknown pooling {pooling!r}; choose one of {POOLINGS}")
        n = bert.num_layers
        layers = sorted(set(exit_layers or range(1, n + 1)) | {n})
        if layers[0] < 1 or layers[-1] > n:
            raise ValueError(f"exit_layers must lie in 1..{n} (the backbone's layers), got {exit_layers}")
        self.bert = bert
        self.exit_layers = layers
        self.style = style
        self.pooling = pooling
        # The final exit's (and PABEE's shared) pooler: the backbone's, or one of ours if it has none.
        self.pooler = own_pooler(bert) if bert.pooler_dense is None else None
        p = bert.hidden_dropout if dropout is None else dropout
        self.exits = nn.ModuleList(
            ExitHead(bert.hidden_size, num_labels, p, own_pooler(bert) if style == "highway" and layer != n else None)
            for layer in layers
        )
        for head in self.exits:
            bert.init_weights(head.classifier)

    @classmethod
    def from_classifier(cls, classifier) -> MultiExitBert:
        """A single-exit model (:class:`~rbert.models.classifier.BertForSequenceClassification`)
        as a multi-exit one with its final exit only: the same arithmetic (pool, dense + tanh,
        linear) and the same weights, so deployment has one model type."""
        num_labels = classifier.classifier.out_features
        net = cls(classifier.bert, num_labels, [classifier.bert.num_layers], pooling=classifier.pooling,
                  dropout=classifier.dropout.p)
        net.load_state_dict(as_final_exit(classifier))
        return net

    @property
    def shared_dense(self) -> nn.Linear:
        return self.pooler.dense if self.pooler is not None else self.bert.pooler_dense

    @property
    def num_layers(self) -> int:
        return self.bert.num_layers

    def exit_logits(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits of exit number ``index`` (0-based, in ``exit_layers`` order) on that layer's output."""
        return self.exits[index](pool(hidden, attention_mask, self.pooling), self.shared_dense)

    def exit_weights(self, index: int) -> tuple[torch.Tensor, ...]:
        """Exit ``index``'s tensors for :func:`exit_head`, for loops that look them up once."""
        return self.exits[index].weights(self.shared_dense)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Logits of every exit (all layers run), final exit last."""
        states = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=True).hidden_states
        return [self.exit_logits(i, states[layer], attention_mask) for i, layer in enumerate(self.exit_layers)]
