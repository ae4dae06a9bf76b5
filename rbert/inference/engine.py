"""Early-exit inference that really skips layers.

:func:`early_exit` runs a :class:`~rbert.models.MultiExitBert` layer by layer on a batch;
at every exit the policy decides which samples leave. Those are answered and dropped from
the batch (and trailing padding that no remaining sample needs is cut off), so later
layers run on fewer, shorter rows: compute shrinks for real.

:func:`simulate` gives the same answers from one full forward pass (every exit's logits),
which makes threshold sweeps cheap; tests check that both agree with each other and with
running each sample alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import torch

from rbert.inference.policies import ExitPolicy
from rbert.models.multi_exit import MultiExitBert


@dataclass
class ExitResult:
    logits: torch.Tensor      # (batch, num_labels): the answering exit's logits
    exit_layer: torch.Tensor  # (batch,): layer number (1-based) each sample left at


def _take(state, keep: torch.Tensor):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(_take(s, keep) for s in state)
    return state[keep]


def unpadded(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """None when the mask has no padding (every row full length), else the mask.

    Without a mask, attention and mean pooling take their cheaper unmasked paths, which
    matters at batch size 1, where per-operation overhead is a large share of a layer.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask


@torch.inference_mode()
def early_exit(model: MultiExitBert, policy: ExitPolicy, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
               trim_padding: bool = True, exit_layers: list[int] | None = None) -> ExitResult:
    """Answer every sample at the first exit ``policy`` trusts (the last exit answers the rest).

    ``exit_layers``: the exits that may answer (default: all of the model's), e.g. only the
    trained ones. Padding must be on the right (as BERT tokenizers pad), for ``trim_padding``.
    """
    batch = input_ids.shape[0]
    device = input_ids.device
    bert = model.bert
    exit_layers = exit_layers or model.exit_layers
    exit_index = {layer: model.exit_layers.index(layer) for layer in exit_layers}
    last = exit_layers[-1]

    hidden = bert.embed(input_ids, token_type_ids)
    mask = unpadded(attention_mask)
    bias = bert.attention_bias(mask)
    state = policy.start(batch, device)
    # Where the running samples sit in the batch, and the answers of those that left: made
    # only once some sample leaves before the others (never at batch size 1).
    rows = logits_out = exit_layer = None

    for n, layer in enumerate(islice(bert.encoder.layer, last), start=1):
        hidden = layer(hidden, bias)
        if n not in exit_index:
            continue
        logits = model.exit_logits(exit_index[n], hidden, mask)
        leave, state = policy.decide(logits, n, state) if n < last else (None, state)
        if leave is None or leave.all():  # every running sample leaves here
            if rows is None:
                return ExitResult(logits, torch.full((batch,), n, dtype=torch.long, device=device))
            logits_out[rows], exit_layer[rows] = logits, n
            break
        if leave.numel() == 1 or not leave.any():  # (one sample: not all means none)
            continue
        if rows is None:
            rows = torch.arange(batch, device=device)
            logits_out = logits.new_empty(batch, logits.shape[-1])
            exit_layer = torch.zeros(batch, dtype=torch.long, device=device)
        gone = rows[leave]
        logits_out[gone], exit_layer[gone] = logits[leave], n
        keep = ~leave
        hidden, rows, state = hidden[keep], rows[keep], _take(state, keep)
        if mask is not None:
            mask = mask[keep]
            if trim_padding:
                length = int(mask.sum(dim=1).max())
                hidden, mask = hidden[:, :length], mask[:, :length]
            mask = unpadded(mask)
            bias = bert.attention_bias(mask)
    return ExitResult(logits_out, exit_layer)


def simulate(policy: ExitPolicy, exit_logits: list[torch.Tensor], exit_layers: list[int]) -> ExitResult:
    """What :func:`early_exit` answers, from every exit's logits of a full forward pass."""
    batch = exit_logits[0].shape[0]
    device = exit_logits[0].device
    state = policy.start(batch, device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.empty_like(exit_logits[-1])
    exit_layer = torch.zeros(batch, dtype=torch.long, device=device)
    for logits, layer in zip(exit_logits, exit_layers):
        leave, state = policy.decide(logits, layer, state)
        if layer == exit_layers[-1]:
            leave = torch.ones_like(leave)
        new = leave & ~done
        out[new] = logits[new]
        exit_layer[new] = layer
        done |= new
    return ExitResult(out, exit_layer)
