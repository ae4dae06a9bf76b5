"""MLM training throughput: rbert's masked-LM step against ``transformers.BertForMaskedLM``.

Same weights, same masked batches, same optimiser, in one process, the two models timed in
turns step by step (the order alternating), so a slow spell of a shared machine hits both.
A step is forward, loss, backward, gradient clipping and an AdamW update; rbert decodes only
the masked positions, transformers every position. Tokens/s counts every input token.

    python bench/mlm_throughput.py --sizes small base --steps 20 5 --text ../shared/data/text/valid.txt
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import transformers
from transformers import BertConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rbert.data.text import MaskingCollator, pack_lines  # noqa: E402
from rbert.models import BertForMaskedLM, load_tokenizer  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402

SIZES = {  # conf/arch/*.yaml
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def batches(text: str | None, tokenizer, n: int, batch_size: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """Masked batches of packed real text when given (else random tokens), as pre-training sees them."""
    if text and Path(text).is_file():
        blocks = pack_lines(Path(text).read_text().splitlines(), tokenizer, seq)
    else:
        g = torch.Generator().manual_seed(0)
        blocks = torch.randint(1000, 30000, (n * batch_size, seq), generator=g).tolist()
    collate = MaskingCollator(tokenizer, 0.15, seed=0)
    needed = n * batch_size
    blocks = (blocks * (needed // len(blocks) + 1))[:needed]
    import numpy as np

    return [collate([((0, i * batch_size + j), np.asarray(blocks[i * batch_size + j])) for j in range(batch_size)])
            for i in range(n)]


def train_step(model, optimizer, batch, hf: bool) -> float:
    if hf:
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    else:
        loss = model(batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def bench_size(name: str, steps: int, batch_size: int, seq: int, text: str | None, device: str) -> dict:
    tokenizer = load_tokenizer("minilm")
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, **SIZES[name])
    torch.manual_seed(0)
    ours = BertForMaskedLM(config).to(device).train()
    hf = transformers.BertForMaskedLM(config).to(device).train()
    hf.load_state_dict(ours.state_dict())
    # Same function: the loss on one batch agrees (dropout off for the check).
    data = [{k: v.to(device) for k, v in b.items()} for b in batches(text, tokenizer, steps + 2, batch_size, seq)]
    with torch.no_grad():
        ours.eval(), hf.eval()
        diff = abs(float(ours(data[0]["input_ids"], labels=data[0]["labels"]).loss)
                   - float(hf(input_ids=data[0]["input_ids"], labels=data[0]["labels"]).loss))
        ours.train(), hf.train()
    models = {"rbert": (ours, torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.98)), False),
              "transformers": (hf, torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.98)), True)}
    times = {k: [] for k in models}
    for i, batch in enumerate(data):
        order = list(models) if i % 2 == 0 else list(models)[::-1]
        for key in order:
            model, opt, is_hf = models[key]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(model, opt, batch, is_hf)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= 2:  # two warm-up steps
                times[key].append(time.perf_counter() - start)
    tokens = batch_size * seq
    row = {"size": name, "batch": batch_size, "seq": seq, "steps": steps, "loss_diff": diff}
    for key, ts in times.items():
        row[f"{key}_s_per_step"] = statistics.median(ts)
        row[f"{key}_tokens_per_s"] = tokens / statistics.median(ts)
    row["speedup"] = row["transformers_s_per_step"] / row["rbert_s_per_step"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "base"], choices=sorted(SIZES))
    parser.add_argument("--steps", nargs="+", type=int, default=[20, 5], help="timed steps per size")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 8])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared/data/text/valid.txt"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results/mlm_throughput.json")
    args = parser.parse_args()
    rows = [bench_size(size, args.steps[min(i, len(args.steps) - 1)],
                       args.batch_sizes[min(i, len(args.batch_sizes) - 1)], args.seq, args.text, args.device)
            for i, size in enumerate(args.sizes)]
    print(format_table(rows, floatfmt="{:.3f}"))
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "device": args.device,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__}
    write_json(args.out, {"meta": meta, "rows": rows})
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
