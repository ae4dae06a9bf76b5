"""One layer for the tokens still running: token-level early exit's "halt and copy".

In token-level early exit (TOKEE) a token that left keeps its hidden state; later layers
still read it as a key and a value for the tokens still running, but compute nothing *for*
it. :func:`halted_step` is one layer application in that regime: keys and values are
projected for every token of the batch (the halted ones' copied states included); the
query projection, the attention output, its projection and norm, and the feed-forward block
run on the active tokens only, gathered across the batch into one ``(active, hidden)``
matrix. The answer equals the full layer's output at the active positions, with every
other position left as it was (``torch.where(active, layer(hidden), hidden)``), which the
tests check for every family; the saving is the skipped rows of the projections and the
feed-forward block, about 5/6 of a BERT layer's multiply-adds per halted token.

Queries are padded per row to the row's number of active tokens (one batched attention
call); the three layer types (BERT's, shared by RoBERTa, XLM-R and ELECTRA; ALBERT's group;
DistilBERT's block) differ only in their modules' names and the order of norms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rbert.models.albert import AlbertLayer, AlbertLayerGroup
from rbert.models.bert import BertLayer, SoftmaxSelfAttention
from rbert.models.distilbert import TransformerBlock


class ActiveTokens:
    """Where the active tokens of a ``(batch, seq)`` mask are, and each one's slot in its row's
    padded query block. Built once per layer and shared by its sub-layers."""

    def __init__(self, active: torch.Tensor):
        self.rows, self.cols = active.nonzero(as_tuple=True)
        counts = active.sum(dim=1)
        self.width = int(counts.max()) if len(counts) else 0
        # slot of each active token among its row's active tokens (they come row by row, in order)
        starts = torch.cumsum(counts, 0) - counts
        self.slots = torch.arange(len(self.rows), device=active.device) - starts[self.rows]
        self.batch = active.shape[0]

    @classmethod
    def of_row(cls, cols: torch.Tensor) -> ActiveTokens:
        """The active columns ``cols`` (ascending) of a batch of one row, without building a mask:
        batch size 1's engine calls this at every layer, where each small op shows."""
        where = cls.__new__(cls)
        count = cols.shape[0]  # not len(): torch.export keeps a shape symbolic, an int it would fix
        where.rows, where.cols = torch.zeros_like(cols), cols
        where.slots = torch.arange(count, device=cols.device)
        where.width, where.batch = count, 1
        return where

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
               heads: int) -> torch.Tensor:
        """Attention of the active tokens' queries ``q`` ``(active, hidden)`` over every token's keys
        and values ``(batch, seq, hidden)``; returns ``(active, hidden)``."""
        batch, seq, dim = k.shape
        d = dim // heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, seq, heads, d).transpose(1, 2)

        if batch == 1:  # one row: its active tokens are the whole query block, in order
            out = F.scaled_dot_product_attention(q.view(1, -1, heads, d).transpose(1, 2), split(k), split(v),
                                                 attn_mask=bias)
            return out.transpose(1, 2).reshape(-1, dim)
        block = q.new_zeros(batch, self.width, heads, d)
        block[self.rows, self.slots] = q.view(-1, heads, d)
        out = F.scaled_dot_product_attention(block.transpose(1, 2), split(k), split(v), attn_mask=bias)
        return out.transpose(1, 2)[self.rows, self.slots].reshape(-1, dim)


def _bert(layer: BertLayer, hidden: torch.Tensor, where: ActiveTokens, bias) -> torch.Tensor:
    attn = layer.attention.self
    if not isinstance(attn, SoftmaxSelfAttention):
        raise ValueError(f"halted layers need softmax attention, not {type(attn).__name__}")
    x = hidden[where.rows, where.cols]
    ctx = where.attend(attn.query(x), attn.key(hidden), attn.value(hidden), bias, attn.num_heads)
    a = layer.attention.output(ctx, x)
    return layer.output(layer.intermediate(a), a)


def _albert_layer(layer: AlbertLayer, hidden: torch.Tensor, where: ActiveTokens, bias) -> torch.Tensor:
    attn = layer.attention
    x = hidden[where.rows, where.cols]
    ctx = where.attend(attn.query(x), attn.key(hidden), attn.value(hidden), bias, attn.num_heads)
    a = attn.LayerNorm(x + attn.output_dropout(attn.dense(ctx)))
    return layer.full_layer_layer_norm(layer.ffn_output(layer.activation(layer.ffn(a))) + a)


def _distilbert(block: TransformerBlock, hidden: torch.Tensor, where: ActiveTokens, bias) -> torch.Tensor:
    attn = block.attention
    x = hidden[where.rows, where.cols]
    ctx = where.attend(attn.q_lin(x), attn.k_lin(hidden), attn.v_lin(hidden), bias, attn.n_heads)
    a = block.sa_layer_norm(attn.out_lin(ctx) + x)
    return block.output_layer_norm(block.ffn(a) + a)


def halted_step(layer: nn.Module, hidden: torch.Tensor, active: torch.Tensor | ActiveTokens,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``layer`` applied to the ``active`` tokens (a ``(batch, seq)`` bool mask, or their
    :class:`ActiveTokens`) of ``hidden``; the others keep their state. Returns a new tensor.
    For inference (no dropout)."""
    where = active if isinstance(active, ActiveTokens) else ActiveTokens(active)
    out = hidden.clone()
    if where.rows.shape[0] == 0:
        return out
    if isinstance(layer, AlbertLayerGroup):  # its inner layers in turn, the halted tokens copied through
        for inner in layer.albert_layers:
            out[where.rows, where.cols] = _albert_layer(inner, out, where, bias)
        return out
    step = {BertLayer: _bert, TransformerBlock: _distilbert}.get(type(layer))
    if step is None:
        raise ValueError(f"no halted form of {type(layer).__name__}")
    out[where.rows, where.cols] = step(layer, hidden, where, bias)
    return out
