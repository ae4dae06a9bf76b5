"""ELECTRA (the discriminator): BERT's layers on embeddings that may be narrower than them.

Parameter names are those of ``transformers.ElectraModel``: ``embeddings.*`` at
``embedding_size``, then ``embeddings_project`` (embedding size -> hidden size) when the two
differ (ELECTRA-small: 128 -> 256), then ``encoder.layer.*`` named as in BERT. No pooler:
heads on top make their own.
"""

from __future__ import annotations

import torch
from torch import nn

from rbert.models.bert import BertEmbeddings, BertModel


class ElectraModel(BertModel):
    hf_class = "ElectraModel"
    model_types = ("electra",)

    def __init__(self, config, attention: str = "softmax", feed_forward: str = "dense",
                 add_pooling_layer: bool = False):
        super().__init__(config, attention=attention, feed_forward=feed_forward, add_pooling_layer=False)
        if config.embedding_size != config.hidden_size:
            self.embeddings = BertEmbeddings(config, width=config.embedding_size)
            self.embeddings_project = nn.Linear(config.embedding_size, config.hidden_size)
            self.embeddings.apply(self.init_weights)
            self.init_weights(self.embeddings_project)
        else:
            self.embeddings_project = None

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embeddings(input_ids, token_type_ids)
        return hidden if self.embeddings_project is None else self.embeddings_project(hidden)
