"""RoBERTa and XLM-R: BERT's layers, with fairseq's position ids and no pooler.

Parameter names are those of ``transformers.RobertaModel`` (``embeddings.*``,
``encoder.layer.*``), so RoBERTa and XLM-R checkpoints load by name. What differs from BERT:

* position ids count the non-padding tokens from ``padding_idx + 1`` (padding keeps
  ``padding_idx``), as fairseq and ``transformers`` make them; hence 514 positions for 512 tokens;
* one token type; LayerNorm eps from the config (1e-5 in the released checkpoints);
* no pooler: the released checkpoints' pooler was never trained for a task, and
  ``RobertaForSequenceClassification`` leaves it out; heads on top make their own.
"""

from __future__ import annotations

import torch

from rbert.models.bert import BertEmbeddings, BertModel


class RobertaEmbeddings(BertEmbeddings):
    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        padding_idx = self.word_embeddings.padding_idx
        mask = input_ids.ne(padding_idx).int()
        positions = torch.cumsum(mask, dim=1).type_as(mask) * mask + padding_idx
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions.long())
             + self.token_type_embeddings(token_type_ids))
        x = self.LayerNorm(x)
        return self.dropout(x) if self.training else x


class RobertaModel(BertModel):
    hf_class = "RobertaModel"
    model_types = ("roberta",)
    ignored_keys = ("pooler.",)

    def __init__(self, config, attention: str = "softmax", feed_forward: str = "dense",
                 add_pooling_layer: bool = False):
        super().__init__(config, attention=attention, feed_forward=feed_forward, add_pooling_layer=False)
        self.embeddings = RobertaEmbeddings(config)
        self.embeddings.apply(self.init_weights)


class XLMRobertaModel(RobertaModel):
    hf_class = "XLMRobertaModel"
    model_types = ("xlm-roberta",)
