"""Does rbert's masked-LM BERT learn to use context as fast as ``transformers``' own?

A synthetic copy task makes context use the only way below the floor: every block is a
pattern of ``period`` random tokens repeated, so each masked token is visible ``period``
positions away, while its unigram distribution is uniform (floor = ln(vocab)). Both models
start from the same weights (rbert's loads ``transformers.BertForMaskedLM``'s by name) and
train on the same masked batches with the same AdamW, warm-up and clipping, in a plain loop
(no Lightning, no data pipeline): their losses must stay together, and both must learn the
copy (masked accuracy near 1). ``tests/test_mlm_learning.py`` runs a tiny version; the
pipeline's own version (packing, masking, own vocabulary, Lightning) is there too.

    python bench/mlm_copy_task.py --vocab 500 --hidden 64 --steps 600 --out logs/copy_task.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rbert.models.mlm import IGNORE_INDEX  # noqa: E402

SPECIAL = 5  # ids 0-4 are special; [MASK] is 4
MASK_ID = 4


def copy_batch(generator: torch.Generator, vocab: int, batch: int = 32, length: int = 128, period: int = 8,
               mlm_probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``: repeated random patterns, masked with BERT's 80/10/10 rule."""
    ids = torch.randint(SPECIAL, vocab, (batch, period), generator=generator).repeat(1, length // period)
    selected = torch.rand(ids.shape, generator=generator) < mlm_probability
    labels = ids.masked_fill(~selected, IGNORE_INDEX)
    draw = torch.rand(ids.shape, generator=generator)
    inputs = ids.masked_fill(selected & (draw < 0.8), MASK_ID)
    randomised = selected & (draw >= 0.8) & (draw < 0.9)
    inputs[randomised] = torch.randint(SPECIAL, vocab, (int(randomised.sum()),), generator=generator)
    return inputs, labels


def tiny_pair(vocab: int, hidden: int, layers: int = 2, seed: int = 0):
    """``transformers.BertForMaskedLM`` and rbert's model with the same random weights (no dropout)."""
    import transformers

    from rbert.models.mlm import BertForMaskedLM

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=max(2, hidden // 16), intermediate_size=4 * hidden,
                                     max_position_embeddings=128, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    reference = transformers.BertForMaskedLM(config)
    ours = BertForMaskedLM(config)
    ours.load_state_dict(reference.state_dict(), strict=False)  # the tied decoder is one tensor in both
    return reference, ours


def masked_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    selected = labels != IGNORE_INDEX
    return float((logits[selected].argmax(-1) == labels[selected]).float().mean())


def copy_batches(vocab: int, batch: int = 32, length: int = 128, period: int = 8, seed: int = 0):
    """An endless stream of copy-task training batches."""
    generator = torch.Generator().manual_seed(seed + 1)
    while True:
        yield copy_batch(generator, vocab, batch=batch, length=length, period=period)


def train_side_by_side(vocab: int, hidden: int, steps: int, lr: float, batches: Iterator[tuple[torch.Tensor, ...]],
                       held_out: tuple[torch.Tensor, torch.Tensor], every: int = 50, seed: int = 0) -> list[dict]:
    """Both models on the same ``(input_ids, labels)`` ``batches``: training loss at every step,
    masked accuracy on ``held_out`` every ``every`` steps."""
    reference, ours = tiny_pair(vocab, hidden, seed=seed)
    models = {"transformers": reference, "rbert": ours}
    optimisers = {name: torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
                  for name, m in models.items()}
    warmup = max(1, int(0.06 * steps))
    curve, started = [], time.time()
    for step, (inputs, labels) in zip(range(1, steps + 1), batches):
        point = {"step": step}
        for name, model in models.items():
            for group in optimisers[name].param_groups:
                group["lr"] = lr * min(1.0, step / warmup)
            model.train()
            loss = model(input_ids=inputs, labels=labels).loss
            optimisers[name].zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimisers[name].step()
            point[f"{name}/loss"] = loss.item()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                for name, model in models.items():
                    logits = model.eval()(input_ids=held_out[0]).logits
                    point[f"{name}/accuracy"] = masked_accuracy(logits, held_out[1])
            point["seconds"] = time.time() - started
            curve.append(point)
    return curve


def copy_task(vocab: int = 500, hidden: int = 64, steps: int = 600, lr: float = 1e-3, batch: int = 32,
              length: int = 128, period: int = 8, every: int = 50, seed: int = 0) -> list[dict]:
    held_out = copy_batch(torch.Generator().manual_seed(10_000 + seed), vocab, batch=64, length=length, period=period)
    return train_side_by_side(vocab, hidden, steps, lr, copy_batches(vocab, batch, length, period, seed), held_out,
                              every, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=500)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from rbert.report import format_table, write_json

    curve = copy_task(args.vocab, args.hidden, args.steps, args.lr)
    print(f"copy task: vocab {args.vocab} (floor ln V = {math.log(args.vocab - SPECIAL):.3f}), hidden {args.hidden}, "
          f"2 layers, batch 32 x 128, AdamW lr {args.lr}")
    print(format_table([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in p.items()} for p in curve]))
    if args.out:
        write_json(args.out, {"args": vars(args) | {"out": str(args.out)}, "curve": curve})


if __name__ == "__main__":
    main()
