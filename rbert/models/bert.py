"""BERT encoder in plain PyTorch.

One readable file, in the spirit of Hugging Face's ``modeling_bert.py``:

* parameter names are those of ``transformers.BertModel``, so any Hugging Face BERT
  checkpoint loads by name and :meth:`BertModel.save_pretrained` writes a folder that
  ``transformers.AutoModel.from_pretrained`` reads back;
* it provides the encoder interface of :mod:`rbert.models.encoder` (``embed``,
  ``attention_bias``, ``layers``, ...), run one layer at a time by multi-exit training and
  early-exit inference;
* self-attention and the feed-forward projections are pluggable through the
  :data:`ATTENTIONS` and :data:`FEED_FORWARDS` registries: softmax attention via
  ``scaled_dot_product_attention`` and dense feed-forward layers are the standard BERT;
  relaxed variants (linear attention, low-rank feed-forward) register themselves here.

Why not wrap ``transformers.BertModel``: its layer loop cannot be stopped after layer i
or continued on a sub-batch, and swapping attention/feed-forward modules means patching
its internals; see ``docs/design.md``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.activations import ACT2FN

from rbert.models.encoder import Encoder, EncoderOutput, key_groups, load_by_name, write_hf_folder

__all__ = ["ATTENTIONS", "FEED_FORWARDS", "BertConfig", "BertModel", "BertEncoderOutput", "key_groups",
           "load_by_name", "write_hf_folder"]


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig, width: int | None = None):
        super().__init__()
        width = width or config.hidden_size  # ALBERT and ELECTRA embed narrower, then project
        self.word_embeddings = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, width)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # Rows 0..seq_len-1 of the position table are a slice, not a lookup; and no dropout call
        # in eval. Both are the same numbers, ~15 us sooner at batch size 1 (early exit's case).
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings.weight[:seq_len]
            + self.token_type_embeddings(token_type_ids)
        )
        x = self.LayerNorm(x)
        return self.dropout(x) if self.training else x


class SoftmaxSelfAttention(nn.Module):
    """Standard multi-head scaled dot-product attention (``torch`` SDPA kernels)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of "
                f"num_attention_heads {config.num_attention_heads}"
            )
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        return x.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attention_bias: torch.Tensor | None) -> torch.Tensor:
        """(batch, heads, seq, head_dim) queries, keys, values -> per-head outputs, same shape."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_bias, dropout_p=self.dropout_p if self.training else 0.0
        )

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        out = self.attend(q, k, v, attention_bias)
        batch, _, seq_len, _ = out.shape
        return out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim)


# name -> self-attention class taking (config); forward(hidden, attention_bias) -> hidden.
ATTENTIONS: dict[str, type[nn.Module]] = {"softmax": SoftmaxSelfAttention}

# name -> linear layer class for the two feed-forward projections, called as cls(in, out, config).
FEED_FORWARDS: dict[str, type[nn.Module]] = {}


class DenseLinear(nn.Linear):
    """The standard feed-forward projection (an ``nn.Linear``; config is unused)."""

    def __init__(self, in_features: int, out_features: int, config: BertConfig | None = None):
        super().__init__(in_features, out_features)


FEED_FORWARDS["dense"] = DenseLinear


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, attention: str):
        super().__init__()
        self.self = ATTENTIONS[attention](config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden, attention_bias), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig, feed_forward: str):
        super().__init__()
        self.dense = FEED_FORWARDS[feed_forward](config.hidden_size, config.intermediate_size, config)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig, feed_forward: str):
        super().__init__()
        self.dense = FEED_FORWARDS[feed_forward](config.intermediate_size, config.hidden_size, config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertLayer(nn.Module):
    """Post-LayerNorm transformer layer: attention block, then feed-forward block."""

    def __init__(self, config: BertConfig, attention: str = "softmax", feed_forward: str = "dense"):
        super().__init__()
        self.attention = BertAttention(config, attention)
        self.intermediate = BertIntermediate(config, feed_forward)
        self.output = BertOutput(config, feed_forward)

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        hidden = self.attention(hidden, attention_bias)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig, attention: str, feed_forward: str):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, attention, feed_forward) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    """dense + tanh on one vector per sequence (BERT's next-sentence pooler)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(pooled))


BertEncoderOutput = EncoderOutput


class BertModel(Encoder):
    """BERT encoder with Hugging Face parameter names.

    ``attention`` and ``feed_forward`` pick entries of :data:`ATTENTIONS` and
    :data:`FEED_FORWARDS`; the defaults give the standard BERT.
    """

    hf_class = "BertModel"
    model_types = ("bert",)

    def __init__(self, config: BertConfig, attention: str = "softmax", feed_forward: str = "dense",
                 add_pooling_layer: bool = True):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; choose one of {sorted(ATTENTIONS)}")
        if feed_forward not in FEED_FORWARDS:
            raise ValueError(f"unknown feed_forward {feed_forward!r}; choose one of {sorted(FEED_FORWARDS)}")
        self.config = config
        self.attention_type = attention
        self.feed_forward_type = feed_forward
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, attention, feed_forward)
        # Masked-LM models have no pooler (as in transformers.BertForMaskedLM).
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(self.init_weights)

    # ------------------------------------------------------------------ the encoder interface
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embeddings(input_ids, token_type_ids)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    @property
    def pooler_dense(self) -> nn.Linear | None:
        return self.pooler.dense if self.pooler is not None else None

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, attention: str = "softmax", feed_forward: str = "dense",
                        **hf_kwargs) -> BertModel:
        """Load any Hugging Face BERT checkpoint (hub id or local folder) by parameter name.

        ``transformers`` does the reading (hub download, sharding, ``.bin``/``.safetensors``,
        ``bert.`` prefixes of task checkpoints); the weights are then copied by name.
        """
        import transformers

        return load_by_name(getattr(transformers, cls.hf_class), name_or_path,
                            lambda config: cls(config, attention=attention, feed_forward=feed_forward),
                            cls.model_types, cls.ignored_keys, **hf_kwargs)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` readable by ``AutoModel.from_pretrained``."""
        self.check_standard()
        super().save_pretrained(folder)

    def check_standard(self) -> None:
        """Only a standard BERT (softmax attention, dense feed-forward) has a Hugging Face format."""
        if (self.attention_type, self.feed_forward_type) != ("softmax", "dense"):
            raise ValueError(f"a BERT with {self.attention_type} attention and {self.feed_forward_type} feed-forward "
                             "has no Hugging Face format; expand it into a standard BERT first")
