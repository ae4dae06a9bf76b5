"""Every backbone family: parity with ``transformers`` and training-step time against its own
``*ForSequenceClassification``, on the same weights and batches.

For each family a random checkpoint of one shape (made with ``transformers``' classes, saved
to a temporary folder as a user's would be) is loaded by rbert (``load_encoder``, by name
after reading ``model_type``) and by ``transformers.AutoModel`` / ``AutoModelForSequenceClassification``.
Parity: the largest absolute difference of any layer's hidden states at non-pad positions,
on a padded batch. Step time: forward + backward + AdamW step of rbert's classifier and of
``transformers``' one, measured in turns (median of ``--steps``, after warm-up), as a ratio.

    python bench/backbones.py --steps 20 --out logs/backbones.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rbert.models import BertForSequenceClassification, load_encoder  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402

SHAPE = dict(num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, max_position_embeddings=512)
CONFIGS = {
    "bert": transformers.BertConfig(hidden_size=256, **SHAPE),
    "roberta": transformers.RobertaConfig(hidden_size=256, type_vocab_size=1, layer_norm_eps=1e-5, **SHAPE),
    "xlm-roberta": transformers.XLMRobertaConfig(hidden_size=256, type_vocab_size=1, layer_norm_eps=1e-5,
                                                 **SHAPE),
    "distilbert": transformers.DistilBertConfig(dim=256, n_layers=4, n_heads=4, hidden_dim=1024),
    "albert": transformers.AlbertConfig(hidden_size=256, embedding_size=128, **SHAPE),
    "electra": transformers.ElectraConfig(hidden_size=256, embedding_size=128, **SHAPE),
}


def batch(config, size: int, length: int, generator: torch.Generator):
    pad = config.pad_token_id or 0
    ids = torch.randint(5, 8000, (size, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (size,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, pad), mask, torch.randint(0, 2, (size,), generator=generator)


def parity(folder: Path, family: str, config) -> float:
    ours = load_encoder(str(folder)).eval()
    theirs = transformers.AutoModel.from_pretrained(folder).eval()
    ids, mask, _ = batch(config, 8, 64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = ours(ids, mask, output_hidden_states=True).hidden_states
    keep = mask.bool()
    return max((a - b)[keep].abs().max().item() for a, b in zip(got, expected))


def step_times(folder: Path, config, steps: int, size: int, length: int) -> dict[str, float]:
    torch.manual_seed(0)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).train()
    ours = BertForSequenceClassification(load_encoder(str(folder)), 2, pooling="cls").train()
    models = {"rbert": (ours, lambda m, i, a: m(i, a)), "transformers": (theirs, lambda m, i, a: m(
        input_ids=i, attention_mask=a).logits)}
    optimisers = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, (m, _) in models.items()}
    generator = torch.Generator().manual_seed(2)
    times = {k: [] for k in models}
    for step in range(steps + 3):  # 3 warm-up steps
        ids, mask, labels = batch(config, size, length, generator)
        for name, (model, call) in models.items():  # in turns: both see the machine's same moments
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(call(model, ids, mask), labels)
            optimisers[name].zero_grad()
            loss.backward()
            optimisers[name].step()
            if step >= 3:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            config = CONFIGS[family]
            config.vocab_size = 8000
            torch.manual_seed(0)
            folder = Path(tmp) / family
            transformers.AutoModel.from_config(config).save_pretrained(folder)
            times = step_times(folder, config, args.steps, args.batch, args.length)
            rows.append({"family": family, "parity_max_abs": f"{parity(folder, family, config):.1e}",
                         "rbert_ms": round(1e3 * times["rbert"], 1),
                         "transformers_ms": round(1e3 * times["transformers"], 1),
                         "ratio": round(times["rbert"] / times["transformers"], 3)})
            print(rows[-1], flush=True)
    print(f"train step (fwd + bwd + AdamW), batch {args.batch} x {args.length}, 4 layers x 256, "
          f"median of {args.steps}, {torch.get_num_threads()} threads")
    print(format_table(rows))
    if args.out:
        write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()
