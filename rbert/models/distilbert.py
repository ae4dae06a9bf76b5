"""DistilBERT: a 6-layer BERT distilled from BERT-base, with its own parameter names.

Names are those of ``transformers.DistilBertModel`` (``embeddings.*``, ``transformer.layer.N``
with ``attention.q_lin/k_lin/v_lin/out_lin``, ``sa_layer_norm``, ``ffn.lin1/lin2``,
``output_layer_norm``), so its checkpoints load by name. What differs from BERT: no token
types, no pooler, config fields ``dim`` / ``n_layers`` / ``n_heads`` / ``hidden_dim`` /
``dropout`` / ``attention_dropout``, LayerNorm eps fixed at 1e-12.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import get_activation

from rbert.models.encoder import Encoder

LAYER_NORM_EPS = 1e-12  # fixed in DistilBERT (not a config field)


class Embeddings(nn.Module):
    """Word + absolute position embeddings (sinusoidal ones are stored as weights too), LayerNorm, dropout."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:input_ids.shape[1]]
        x = self.LayerNorm(x)
        return self.dropout(x) if self.training else x


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.dim % config.n_heads:
            raise ValueError(f"dim {config.dim} is not a multiple of n_heads {config.n_heads}")
        self.n_heads = config.n_heads
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)
        self.dropout_p = config.attention_dropout

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        batch, seq_len, dim = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, seq_len, self.n_heads, dim // self.n_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_lin(hidden)), heads(self.k_lin(hidden)),
                                             heads(self.v_lin(hidden)), attn_mask=attention_bias,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return self.out_lin(out.transpose(1, 2).reshape(batch, seq_len, dim))


class FFN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.activation = get_activation(config.activation)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.lin2(self.activation(self.lin1(x))))


class TransformerBlock(nn.Module):
    """Post-LayerNorm: attention + residual -> ``sa_layer_norm``; FFN + residual -> ``output_layer_norm``."""

    def __init__(self, config):
        super().__init__()
        self.attention = MultiHeadSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        hidden = self.sa_layer_norm(self.attention(hidden, attention_bias) + hidden)
        return self.output_layer_norm(self.ffn(hidden) + hidden)


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))


class DistilBertModel(Encoder):
    hf_class = "DistilBertModel"
    model_types = ("distilbert",)
    dropout_fields = ("dropout", "attention_dropout")
    depth_field = "n_layers"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.transformer = Transformer(config)
        self.apply(self.init_weights)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embeddings(input_ids)  # DistilBERT has no token types

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.layer
