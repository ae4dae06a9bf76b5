"""Token classification heads: one tag distribution per word piece, at one exit or at every exit.

The plain head is ``transformers``' ``*ForTokenClassification`` (dropout, then a linear layer
on every hidden state; no pooler) with the same parameter names (``bert.*``,
``classifier.*``), so the same weights give the same logits. The multi-exit model puts such
a head after every layer (or the layers chosen); the final exit's head is the plain one.
The multi-exit *objectives* are the sentence ones (:mod:`rbert.systems.multi_exit`): their
losses see the labelled positions as a batch of samples, so nothing of them is copied here.
"""

from __future__ import annotations

import torch
from torch import nn

from rbert.models.encoder import Encoder
from rbert.models.multi_exit import as_final_exit


class TokenHead(nn.Module):
    """dropout -> linear, on every position."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))


class BertForTokenClassification(nn.Module):
    """``transformers``' ``BertForTokenClassification`` on any backbone: logits ``[B, T, num_labels]``."""

    def __init__(self, bert: Encoder, num_labels: int, dropout: float | None = None):
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(bert.hidden_dropout if dropout is None else dropout)
        self.classifier = nn.Linear(bert.hidden_size, num_labels)
        bert.init_weights(self.classifier)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        return self.classifier(self.dropout(hidden))


class MultiExitTokenBert(nn.Module):
    """A backbone with a token head after the layers ``exit_layers`` (1-based; default: every
    layer; the last layer always has one). Same interface as
    :class:`~rbert.models.multi_exit.MultiExitBert`: ``forward`` gives every exit's logits,
    ``exit_logits`` one exit's on a layer's output."""

    def __init__(self, bert: Encoder, num_labels: int, exit_layers: list[int] | None = None,
                 dropout: float | None = None):
        super().__init__()
        n = bert.num_layers
        layers = sorted(set(exit_layers or range(1, n + 1)) | {n})
        if layers[0] < 1 or layers[-1] > n:
            raise ValueError(f"exit_layers must lie in 1..{n} (the backbone's layers), got {exit_layers}")
        self.bert = bert
        self.exit_layers = layers
        p = bert.hidden_dropout if dropout is None else dropout
        self.exits = nn.ModuleList(TokenHead(bert.hidden_size, num_labels, p) for _ in layers)
        for head in self.exits:
            bert.init_weights(head.classifier)

    @classmethod
    def from_classifier(cls, classifier: BertForTokenClassification) -> MultiExitTokenBert:
        """The plain token classifier as a multi-exit model with its final exit only (same weights)."""
        net = cls(classifier.bert, classifier.classifier.out_features, [classifier.bert.num_layers],
                  dropout=classifier.dropout.p)
        net.load_state_dict(as_final_exit(classifier))
        return net

    @property
    def num_layers(self) -> int:
        return self.bert.num_layers

    def exit_logits(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Logits ``[B, T, C]`` of exit number ``index`` (0-based) on that layer's output."""
        return self.exits[index](hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, halt_after: torch.Tensor | None = None
                ) -> list[torch.Tensor]:
        """Logits of every exit (all layers run), final exit last.

        ``halt_after`` ``(batch, tokens)``: token-level early exit's halt and copy, as training
        sees it: a token runs through layers ``1..halt_after`` and keeps its state after (later
        layers still read it as a key and a value); every exit's logits come from those states.
        """
        if halt_after is None:
            states = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=True).hidden_states
            return [self.exit_logits(i, states[layer]) for i, layer in enumerate(self.exit_layers)]
        hidden = self.bert.embed(input_ids, token_type_ids)
        bias = self.bert.attention_bias(attention_mask)
        out = []
        for n, layer in enumerate(self.bert.layers, start=1):
            hidden = torch.where((halt_after >= n)[..., None], layer(hidden, bias), hidden)
            if n in self.exit_layers:
                out.append(self.exit_logits(self.exit_layers.index(n), hidden))
        return out
