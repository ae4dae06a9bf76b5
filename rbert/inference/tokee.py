"""Token-level early exit (TOKEE) that skips the work: each word leaves at its own layer.

After each consulted exit, the rule (:mod:`rbert.inference.token_policies`) says which words
of the running rows leave; a word's pieces leave with it, its tag is that exit's, and its
hidden states are frozen (halt and copy). Later layers run through
:func:`rbert.models.halting.halted_step`: keys and values for every token of the running
rows, everything else for the running tokens only, gathered across the batch. ``[CLS]``,
``[SEP]`` and the like run while any word of their row runs (they are two tokens, and the
words attend to them). A row whose words have all left is dropped from the batch, and
trailing padding no running row needs is cut, as in the sentence-level engine.

One sentence at a time (batch size 1, no padding inside) takes a lean path with the same
answers: word bookkeeping in NumPy, active columns instead of masks, no row dropping; at
this size each layer is a few milliseconds and every small op of the batched path shows.

``masked=True`` computes the same thing the expensive way (every layer on every token, then
the halted tokens' states put back): the reference the tests hold the engine to.

The result also counts the token-layers computed: with a share ``f`` of a full pass's
token-layers skipped, the layer-count speed-up is ``1 / (1 - f)``, and since halted tokens
are still projected into keys and values at every later layer (2 of a BERT layer's 12
hidden x hidden products: ~1/6 of its work), the attainable wall-clock speed-up is about
``1 / ((1 - f) + f / 6)``: :func:`ceiling`. A sentence whose words have all left stops
computing keys and values too, which :func:`row_ceiling` counts (``kv_token_layers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F

from rbert.inference.token_policies import WindowEntropyExit
from rbert.inference.word_exits import WordExits
from rbert.models.halting import ActiveTokens, halted_step
from rbert.models.token_heads import MultiExitTokenBert


@dataclass
class TokenExitResult:
    logits: torch.Tensor      # (batch, tokens, tags): at each word's first piece, the logits it left with
    exit_layer: torch.Tensor  # (batch, tokens): the layer each token left at (its word's); 0 on padding
    token_layers: int         # token-layer applications computed
    full_token_layers: int    # what running every real token through every layer costs
    kv_token_layers: int = 0  # token-layers whose keys and values were computed (every token of a running row)


def ceiling(skipped: float, kv_share: float = 1 / 6) -> float:
    """The wall-clock speed-up a share ``skipped`` of token-layers can buy when the halted
    tokens' keys and values (``kv_share`` of a layer's work) are still computed."""
    return 1.0 / ((1.0 - skipped) + skipped * kv_share)


def row_ceiling(computed: int, kv: int, full: int, kv_share: float = 1 / 6) -> float:
    """:func:`ceiling` with the rows that finished counted: once every word of a sentence has
    left, its tokens' keys and values are not computed either (the row is dropped), so the
    halted tokens cost ``kv_share`` only while their sentence still runs. Above
    :func:`ceiling` when whole sentences leave early."""
    return full / (computed + (kv - computed) * kv_share)


def word_entropy(z: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of each row of logits ``z``, in float32: both engine paths decide on
    this one computation, so a word at a threshold's edge leaves alike on either."""
    logp = torch.log_softmax(z.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1) / np.log(z.shape[-1])


def first_piece_owner(words: torch.Tensor, pieces: torch.Tensor) -> torch.Tensor:
    """For each token, the column of its word's first piece (-1 for special tokens and padding),
    from the mask of first pieces and the mask of all word pieces."""
    cols = torch.arange(words.shape[1], device=words.device).expand_as(words)
    marks = torch.where(words, cols, torch.full_like(cols, -1))
    owner = torch.cummax(marks, dim=1).values
    return torch.where(pieces, owner, torch.full_like(owner, -1))


class TokenEarlyExit:
    """TOKEE with one model, rule and set of exits: build once, call per batch."""

    def __init__(self, model: MultiExitTokenBert, rule: WindowEntropyExit, exit_layers: list[int] | None = None,
                 masked: bool = False):
        exit_layers = exit_layers or model.exit_layers
        self.bert, self.rule, self.masked = model.bert, rule, masked
        self.last = exit_layers[-1]
        self.layers = list(islice(model.bert.layers, self.last))
        self.heads = {layer: (model.exits[i].classifier.weight, model.exits[i].classifier.bias)
                      for i, layer in enumerate(model.exit_layers) if layer in exit_layers}
        self.order = {layer: i for i, layer in enumerate(sorted(self.heads))}

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                 owner: torch.Tensor) -> TokenExitResult:
        """``owner``: per token, the column of its word's first piece (-1: a special token or
        padding), e.g. :func:`first_piece_owner`."""
        with torch.inference_mode():
            if len(input_ids) == 1 and not self.masked:
                length = int(attention_mask.sum())
                if bool(attention_mask[0, :length].all()):  # padding, if any, only at the end
                    return self._run_one(input_ids, attention_mask, token_type_ids, owner, length)
            return self._run(input_ids, attention_mask, token_type_ids, owner)

    def _run_one(self, input_ids, attention_mask, token_type_ids, owner, length: int) -> TokenExitResult:
        """One row whose first ``length`` tokens are real: :meth:`_run`'s answers, leaner."""
        width = input_ids.shape[1]
        walk = WordExits(owner[0, :length].cpu().numpy(), self.rule)
        exit_layer = np.zeros(width, dtype=np.int64)
        logits_out = None
        types = token_type_ids[:, :length] if token_type_ids is not None else None
        hidden = self.bert.embed(input_ids[:, :length], types)
        where, computed, kv = None, 0, 0  # where: None while every token runs (no padding: no attention mask)
        for n, layer in enumerate(self.layers, start=1):
            hidden = layer(hidden, None) if where is None else halted_step(layer, hidden, where, None)
            computed, kv = computed + int(walk.running.sum()), kv + length
            exit_layer[:length][walk.running] = n
            if n not in self.heads:
                continue
            live = walk.live()
            if not len(live):  # a row without words leaves at the first exit, as in _run
                break
            z = F.linear(hidden[0, torch.from_numpy(walk.first_col[live])], *self.heads[n])
            if logits_out is None:
                logits_out = z.new_zeros(1, width, z.shape[-1])
            leave = walk.leave(live, word_entropy(z).numpy(), self.order[n], n == self.last)
            gone = torch.from_numpy(walk.first_col[live[leave]])
            logits_out[0, gone] = z[torch.from_numpy(leave)].to(logits_out.dtype)
            if walk.finished:
                break
            where = ActiveTokens.of_row(torch.from_numpy(np.flatnonzero(walk.running)).to(hidden.device))
        if logits_out is None:  # a row without words
            logits_out = hidden.new_zeros(1, width, self.heads[self.last][0].shape[0])
        return TokenExitResult(logits_out, torch.from_numpy(exit_layer[None]).to(input_ids.device), computed,
                               length * len(self.layers), kv)

    def _run(self, input_ids, attention_mask, token_type_ids, owner) -> TokenExitResult:
        batch, width = input_ids.shape
        device = input_ids.device
        cols = torch.arange(width, device=device)
        valid = attention_mask.bool()
        first = (owner == cols) & valid
        # Word-level bookkeeping in the rows' original coordinates: word w of row r sits at
        # column first_col[r, w]; entropy is each word's latest (or final) normalised entropy.
        counts = first.sum(dim=1)
        n_words = int(counts.max()) if batch else 0
        wr, wc = first.nonzero(as_tuple=True)
        slot = torch.arange(len(wr), device=device) - (torch.cumsum(counts, 0) - counts)[wr]
        first_col = torch.zeros(batch, max(n_words, 1), dtype=torch.long, device=device)
        first_col[wr, slot] = wc
        present = torch.zeros(batch, max(n_words, 1), dtype=torch.bool, device=device)
        present[wr, slot] = True
        word_of = torch.full((batch, width), -1, dtype=torch.long, device=device)  # token -> word slot
        word_of[wr, wc] = slot
        pieces = owner >= 0
        word_of = torch.where(pieces, word_of.gather(1, owner.clamp_min(0)), word_of)
        entropy = np.full(present.shape, np.nan)
        done = torch.zeros_like(present)
        logits_out, exit_layer = None, torch.zeros(batch, width, dtype=torch.long, device=device)

        hidden = self.bert.embed(input_ids, token_type_ids)
        rows = torch.arange(batch, device=device)  # original row of each running row
        mask = attention_mask
        active = valid.clone()  # running tokens, in running-row coordinates
        computed, kv, full = 0, 0, int(valid.sum()) * len(self.layers)
        for n, layer in enumerate(self.layers, start=1):
            bias = self.bert.attention_bias(mask)
            if self.masked:
                hidden = torch.where(active[..., None], layer(hidden, bias), hidden)
            else:
                hidden = halted_step(layer, hidden, active, bias)
            computed, kv = computed + int(active.sum()), kv + int(mask.sum())
            exit_layer[rows[:, None].expand_as(active)[active], cols[:active.shape[1]].expand_as(active)[active]] = n
            if n not in self.heads:
                continue
            running = present[rows] & ~done[rows]  # (running rows, words)
            r, w = running.nonzero(as_tuple=True)
            c = first_col[rows[r], w]
            z = F.linear(hidden[r, c], *self.heads[n])
            if logits_out is None:
                logits_out = z.new_zeros(batch, width, z.shape[-1])
            ent = word_entropy(z)
            entropy[rows[r].cpu().numpy(), w.cpu().numpy()] = ent.cpu().numpy()
            if n == self.last:
                leave = running
            else:
                decided = self.rule.decide(entropy[rows.cpu().numpy()], present[rows].cpu().numpy(), self.order[n])
                leave = torch.from_numpy(decided).to(device) & running
            lr = leave[r, w]
            gone_r, gone_w = rows[r[lr]], w[lr]
            logits_out[gone_r, first_col[gone_r, gone_w]] = z[lr].to(logits_out.dtype)
            done[gone_r, gone_w] = True
            # Tokens of words that left stop; a row's special tokens stop with its last word.
            local_word = word_of[rows]
            word_done = done[rows].gather(1, local_word.clamp_min(0))
            row_running = (present[rows] & ~done[rows]).any(dim=1)
            active = valid[rows] & row_running[:, None] & ~(word_done & (local_word >= 0))
            active = active[:, :hidden.shape[1]]
            if not row_running.all():  # drop finished rows; cut padding no running row needs
                keep = row_running
                if not keep.any():
                    break
                hidden, rows, mask, active = hidden[keep], rows[keep], mask[keep], active[keep]
                length = int(mask.sum(dim=1).max())
                hidden, mask, active = hidden[:, :length], mask[:, :length], active[:, :length]
        exit_layer = torch.where(valid, exit_layer, torch.zeros_like(exit_layer))
        return TokenExitResult(logits_out, exit_layer, computed, full, kv)
