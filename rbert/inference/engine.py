"""Early-exit inference that really skips layers.

:class:`EarlyExit` (:func:`early_exit` for a single call) runs a
:class:`~rbert.models.MultiExitBert` layer by layer on a batch;
at every exit the policy decides which samples leave. Those are answered and dropped from
the batch (and trailing padding that no remaining sample needs is cut off), so later
layers run on fewer, shorter rows: compute shrinks for real.

:func:`simulate` gives the same answers from one full forward pass (every exit's logits),
which makes threshold sweeps cheap; tests check that both agree with each other and with
running each sample alone.

Tagging models (:class:`~rbert.models.token_heads.MultiExitTokenBert`) run through the same
engine at the sentence level (SENTEE): each exit gives every token's logits, the policy's
``decide_words`` says which *sentences* leave (all their words trusted), and those leave
whole, with the logits of every token at that exit. Callers pass ``words``, the mask of the
words' first pieces, which is what the policy looks at.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F

from rbert.inference.policies import ExitPolicy, take_rows
from rbert.models.classifier import pool
from rbert.models.multi_exit import MultiExitBert, exit_head
from rbert.models.token_heads import MultiExitTokenBert


@dataclass
class ExitResult:
    logits: torch.Tensor      # (batch, num_labels), tagging (batch, tokens, num_labels): the answering exit's
    exit_layer: torch.Tensor  # (batch,): layer number (1-based) each sample left at


def decide(policy: ExitPolicy, logits: torch.Tensor, layer: int, state, words: torch.Tensor | None = None
           ) -> tuple[np.ndarray, object]:
    """The policy's NumPy rule on a tensor of exit logits (a view on CPU); with ``words`` (tagging),
    its sentence-level rule on token logits."""
    values = logits.detach().float().cpu().numpy()
    if words is None:
        return policy.decide(values, layer, state)
    return policy.decide_words(values, words.cpu().numpy(), layer, state)


def unpadded(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """None when the mask has no padding (every row full length), else the mask.

    Without a mask, attention and mean pooling take their cheaper unmasked paths, which
    matters at batch size 1, where per-operation overhead is a large share of a layer.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask


class EarlyExit:
    """Early-exit inference with one model, policy and set of exits: build once, call per batch.

    ``exit_layers``: the exits that may answer (default: all of the model's), e.g. only the
    trained ones. Padding must be on the right (as BERT tokenizers pad), for ``trim_padding``.

    Building looks up the layers and every exit's weights once: at batch size 1 on a CPU an
    exit costs ~0.1 of a MiniLM layer, and a third of that was module-attribute lookups and
    module calls (Python on cold caches right after a layer). Build it after the model is
    final: a module replaced later (e.g. by quantisation) is not seen; in-place weight
    changes, loading a state dict and ``.to()`` are.
    """

    def __init__(self, model: MultiExitBert, policy: ExitPolicy, exit_layers: list[int] | None = None,
                 trim_padding: bool = True):
        exit_layers = exit_layers or model.exit_layers
        self.bert, self.policy, self.trim_padding = model.bert, policy, trim_padding
        self.tokens = isinstance(model, MultiExitTokenBert)
        self.pooling = None if self.tokens else model.pooling
        self.last = exit_layers[-1]
        self.layers = list(islice(model.bert.layers, self.last))
        # layer number -> its exit's (pooler weight, pooler bias, classifier weight, classifier bias),
        # or, for token heads, (classifier weight, classifier bias)
        if self.tokens:
            self.heads = {layer: (model.exits[i].classifier.weight, model.exits[i].classifier.bias)
                          for i, layer in enumerate(model.exit_layers) if layer in exit_layers}
        else:
            self.heads = {layer: model.exit_weights(model.exit_layers.index(layer)) for layer in exit_layers}

    def logits(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.tokens:
            return F.linear(hidden, *self.heads[layer])
        return exit_head(pool(hidden, mask, self.pooling), *self.heads[layer])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None, words: torch.Tensor | None = None) -> ExitResult:
        """Answer every sample at the first exit the policy trusts (the last exit answers the rest).
        ``words`` (tagging models only): the first pieces of the words, ``(batch, tokens)``."""
        if not torch.is_inference_mode_enabled():  # callers that time us have entered it already
            with torch.inference_mode():
                return self(input_ids, attention_mask, token_type_ids, words)
        if self.tokens and words is None:
            raise ValueError("words: a tagging model's early exit needs the mask of the words' first pieces")
        hidden = self.bert.embed(input_ids, token_type_ids)
        mask = unpadded(attention_mask)
        if self.tokens:
            return self._sentences(hidden, mask, words.bool())
        if input_ids.shape[0] == 1:
            return self._one(hidden, mask)
        return self._batch(hidden, mask)

    def _sentences(self, hidden: torch.Tensor, mask: torch.Tensor | None, words: torch.Tensor) -> ExitResult:
        """SENTEE: sentences leave whole; each answers with every token's logits at its exit. Rows
        that left are dropped (and trailing padding cut) as in :meth:`_batch`."""
        batch, width, device = hidden.shape[0], hidden.shape[1], hidden.device
        bias, state = self.bert.attention_bias(mask), self.policy.start(batch)
        rows = torch.arange(batch, device=device)
        logits_out = exit_layer = None
        for n, layer in enumerate(self.layers, start=1):
            hidden = layer(hidden, bias)
            if n not in self.heads:
                continue
            logits = self.logits(n, hidden, mask)
            if logits_out is None:
                logits_out = logits.new_zeros(batch, width, logits.shape[-1])
                exit_layer = torch.zeros(batch, dtype=torch.long, device=device)
            if n == self.last:
                leave = np.ones(len(rows), dtype=bool)
            else:
                leave, state = decide(self.policy, logits, n, state, words)
            if not leave.any():
                continue
            state = take_rows(state, ~leave)
            leave_t = torch.from_numpy(leave).to(device)
            gone = rows[leave_t]
            logits_out[gone, :logits.shape[1]], exit_layer[gone] = logits[leave_t], n
            if leave.all():
                break
            keep = ~leave_t
            hidden, rows, words = hidden[keep], rows[keep], words[keep]
            if mask is not None:
                mask = mask[keep]
                if self.trim_padding:
                    length = int(mask.sum(dim=1).max())
                    hidden, mask, words = hidden[:, :length], mask[:, :length], words[:, :length]
                mask = unpadded(mask)
                bias = self.bert.attention_bias(mask)
        return ExitResult(logits_out, exit_layer)

    def _one(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> ExitResult:
        """Batch size 1: the policy decides on host floats, and nothing tracks who left."""
        bias, state = self.bert.attention_bias(mask), self.policy.start_one()
        # Mean pooling as a (1, seq) @ (seq, hidden) product: right after a layer, the matmul
        # code is still in cache and a reduction's is not (measured ~10 us sooner per exit on a
        # CPU; the same mean up to float rounding). Autocast would run it in half precision.
        mean_row = None
        if mask is None and self.pooling == "mean" and not torch.is_autocast_enabled(hidden.device.type):
            mean_row = hidden.new_full((1, hidden.shape[1]), 1.0 / hidden.shape[1])
        for n, layer in enumerate(self.layers, start=1):
            hidden = layer(hidden, bias)
            if n in self.heads:
                if mean_row is None:
                    logits = self.logits(n, hidden, mask)
                else:
                    logits = exit_head(torch.mm(mean_row, hidden[0]), *self.heads[n])
                if n == self.last:
                    break
                leave, state = self.policy.decide_one(logits.tolist()[0], n, state)
                if leave:
                    break
        return ExitResult(logits, torch.tensor([n], device=logits.device))

    def _batch(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> ExitResult:
        batch, device = hidden.shape[0], hidden.device
        bias, state = self.bert.attention_bias(mask), self.policy.start(batch)
        # Where the running samples sit in the batch, and the answers of those that left: made
        # only once some sample leaves before the others.
        rows = logits_out = exit_layer = None
        for n, layer in enumerate(self.layers, start=1):
            hidden = layer(hidden, bias)
            if n not in self.heads:
                continue
            logits = self.logits(n, hidden, mask)
            leave, state = decide(self.policy, logits, n, state) if n < self.last else (None, state)
            if leave is None or leave.all():  # every running sample leaves here
                if rows is None:
                    return ExitResult(logits, torch.full((batch,), n, dtype=torch.long, device=device))
                logits_out[rows], exit_layer[rows] = logits, n
                break
            if not leave.any():
                continue
            if rows is None:
                rows = torch.arange(batch, device=device)
                logits_out = logits.new_empty(batch, logits.shape[-1])
                exit_layer = torch.zeros(batch, dtype=torch.long, device=device)
            state, leave = take_rows(state, ~leave), torch.from_numpy(leave).to(device)
            gone = rows[leave]
            logits_out[gone], exit_layer[gone] = logits[leave], n
            keep = ~leave
            hidden, rows = hidden[keep], rows[keep]
            if mask is not None:
                mask = mask[keep]
                if self.trim_padding:
                    length = int(mask.sum(dim=1).max())
                    hidden, mask = hidden[:, :length], mask[:, :length]
                mask = unpadded(mask)
                bias = self.bert.attention_bias(mask)
        return ExitResult(logits_out, exit_layer)


def early_exit(model: MultiExitBert, policy: ExitPolicy, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
               trim_padding: bool = True, exit_layers: list[int] | None = None,
               words: torch.Tensor | None = None) -> ExitResult:
    """One call of :class:`EarlyExit` (build that once to answer many batches)."""
    return EarlyExit(model, policy, exit_layers, trim_padding)(input_ids, attention_mask, token_type_ids, words)


def simulate(policy: ExitPolicy, exit_logits: list[torch.Tensor], exit_layers: list[int],
             words: torch.Tensor | None = None) -> ExitResult:
    """What :func:`early_exit` answers, from every exit's logits of a full forward pass
    (``words``: for a tagging model's token logits, as the engine takes them)."""
    batch = exit_logits[0].shape[0]
    device = exit_logits[0].device
    state = policy.start(batch)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.empty_like(exit_logits[-1])
    exit_layer = torch.zeros(batch, dtype=torch.long, device=device)
    for logits, layer in zip(exit_logits, exit_layers):
        leave, state = decide(policy, logits, layer, state, words)
        leave = torch.from_numpy(leave).to(device)
        if layer == exit_layers[-1]:
            leave = torch.ones_like(leave)
        new = leave & ~done
        out[new] = logits[new]
        exit_layer[new] = layer
        done |= new
    return ExitResult(out, exit_layer)
