"""BERT with a masked-language-model head, with Hugging Face parameter names.

``bert.*`` is a :class:`~rbert.models.bert.BertModel` without pooler and ``cls.predictions.*``
is BERT's MLM head (dense + activation + LayerNorm, then a decoder tied to the word
embeddings, plus an output bias), exactly as in ``transformers.BertForMaskedLM``: its
checkpoints load by name, and :meth:`BertForMaskedLM.save_pretrained` writes a folder that
``transformers.AutoModelForMaskedLM`` reads.

Given ``labels``, :meth:`BertForMaskedLM.forward` decodes only the masked positions (labels
other than -100): about 15% of the tokens. The decoder is a (hidden x vocabulary) matrix
product; on a small BERT it costs more than the whole encoder when run on every token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.activations import ACT2FN

from rbert.models.bert import BertModel, load_by_name, write_hf_folder

IGNORE_INDEX = -100  # label of the positions that are not predicted (as in transformers)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden)))


class BertLMPredictionHead(nn.Module):
    """transform, then the decoder (weights tied to the word embeddings) plus an output bias."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Tied, as in transformers: one tensor under both names (state_dict lists both).
        self.decoder.weight = word_embeddings.weight
        self.decoder.bias = self.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden)


@dataclass
class MaskedLMOutput:
    loss: torch.Tensor | None
    # (masked positions, vocab) when labels were given, else (batch, seq, vocab).
    logits: torch.Tensor
    # The labels of the rows of ``logits`` (masked positions only), when labels were given.
    labels: torch.Tensor | None = None


class BertForMaskedLM(nn.Module):
    """BERT encoder + MLM head; ``attention`` / ``feed_forward`` as in :class:`BertModel`."""

    def __init__(self, config: BertConfig, attention: str = "softmax", feed_forward: str = "dense"):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, attention=attention, feed_forward=feed_forward, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config, self.bert.embeddings.word_embeddings)
        self.cls.apply(self.bert.init_weights)
        nn.init.zeros_(self.cls.predictions.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> MaskedLMOutput:
        hidden = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        if labels is None:
            return MaskedLMOutput(None, self.cls(hidden))
        selected = labels != IGNORE_INDEX
        logits = self.cls(hidden[selected])  # only the masked positions reach the decoder
        targets = labels[selected]
        return MaskedLMOutput(F.cross_entropy(logits.float(), targets), logits, targets)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, attention: str = "softmax", feed_forward: str = "dense",
                        **hf_kwargs) -> BertForMaskedLM:
        """Load a Hugging Face BERT (hub id or folder) by name; a checkpoint without an MLM
        head (a plain ``BertModel``) gets a freshly initialised one, as in ``transformers``."""
        import transformers

        return load_by_name(transformers.BertForMaskedLM, name_or_path,
                            lambda config: cls(config, attention=attention, feed_forward=feed_forward), ("bert",),
                            **hf_kwargs)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """A folder that ``transformers.AutoModelForMaskedLM.from_pretrained`` reads (safetensors)."""
        self.bert.check_standard()
        # The tied copies are left out (safetensors stores no shared tensors); transformers re-ties them.
        tensors = {k: v for k, v in self.state_dict().items() if not k.startswith("cls.predictions.decoder.")}
        self.config.tie_word_embeddings = True
        write_hf_folder(folder, self.config, "BertForMaskedLM", tensors)
