"""ALBERT: factorised embeddings and one layer group shared by all L layer applications.

Parameter names are those of ``transformers.AlbertModel``: ``embeddings.*`` at
``embedding_size``, ``encoder.embedding_hidden_mapping_in`` (embedding size -> hidden size),
``encoder.albert_layer_groups.G.albert_layers.I`` (``attention.query/key/value/dense/LayerNorm``,
``ffn``, ``ffn_output``, ``full_layer_layer_norm``) and ``pooler`` (a Linear, then tanh).

Application i of L runs layer group ``int(i / (L / num_hidden_groups))`` (all its inner
layers), as in ``transformers``; :attr:`AlbertModel.layers` lists the L applications, so an
exit after "layer" i is an exit after application i, and early exit stops the loop there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from rbert.models.bert import BertEmbeddings
from rbert.models.encoder import Encoder


class AlbertAttention(nn.Module):
    """Self-attention with its output projection and residual LayerNorm in one module (ALBERT's layout)."""

    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        batch, seq_len, dim = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, seq_len, self.num_heads, dim // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query(hidden)), heads(self.key(hidden)),
                                             heads(self.value(hidden)), attn_mask=attention_bias,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        out = self.dense(out.transpose(1, 2).reshape(batch, seq_len, dim))
        return self.LayerNorm(hidden + self.output_dropout(out))


class AlbertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = AlbertAttention(config)
        self.ffn = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]
        self.full_layer_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        hidden = self.attention(hidden, attention_bias)
        return self.full_layer_layer_norm(self.ffn_output(self.activation(self.ffn(hidden))) + hidden)


class AlbertLayerGroup(nn.Module):
    """One application: the group's inner layers in turn."""

    def __init__(self, config):
        super().__init__()
        self.albert_layers = nn.ModuleList(AlbertLayer(config) for _ in range(config.inner_group_num))

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        for layer in self.albert_layers:
            hidden = layer(hidden, attention_bias)
        return hidden


class AlbertTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embedding_hidden_mapping_in = nn.Linear(config.embedding_size, config.hidden_size)
        self.albert_layer_groups = nn.ModuleList(AlbertLayerGroup(config) for _ in range(config.num_hidden_groups))


class AlbertModel(Encoder):
    hf_class = "AlbertModel"
    model_types = ("albert",)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config, width=config.embedding_size)
        self.encoder = AlbertTransformer(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.pooler_activation = nn.Tanh()
        self.apply(self.init_weights)
        groups, total = config.num_hidden_groups, config.num_hidden_layers
        # The L applications, as a plain list (the same module may appear many times).
        self._applications = [self.encoder.albert_layer_groups[int(i / (total / groups))] for i in range(total)]

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder.embedding_hidden_mapping_in(self.embeddings(input_ids, token_type_ids))

    @property
    def layers(self) -> list[nn.Module]:
        return self._applications

    def keep_layers(self, k: int) -> None:
        """k applications of the shared layer. With several layer groups, the first k
        applications of L are not what a k-application config maps to its groups (which
        spreads the groups over k): refused rather than saved as a different model."""
        groups, total = self.config.num_hidden_groups, self.config.num_hidden_layers
        if groups > 1 and k < total and [int(i / (total / groups)) for i in range(k)] != \
                [int(i / (k / groups)) for i in range(k)]:
            raise ValueError(f"an ALBERT with {groups} layer groups cannot keep {k} of its {total} "
                             "applications (a k-layer config would map them to other groups)")
        super().keep_layers(k)

    @property
    def pooler_dense(self) -> nn.Linear:
        return self.pooler
