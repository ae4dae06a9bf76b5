"""CoRe's relaxed blocks against BERT's: attention kernels and whole layers, forward + backward.

1. Attention alone, linear vs softmax (SDPA), same projection weights, sequence lengths 128
   to 4096 at a fixed number of tokens per batch: forward + backward time, and memory, as
   the bytes of tensors autograd saves for backward (on CPU; on a GPU, peak allocated too).
2. One transformer layer, relaxed (linear attention + low-rank feed-forward of rank d/4 or
   d/6) vs standard, forward + backward + AdamW update, at seq 128 and 512.
3. The whole masked-LM training step of the pre-training runs (BERT-small, 30,522-token
   vocabulary, batch 32 x 128, 15% masked, masked-only decoding, AdamW), relaxed vs standard:
   what CoRe's phase 1 saves per step, embeddings, MLM head and optimiser included.

Timings alternate between the variants step by step; each row is the median.

    python bench/core_kernels.py --out bench/results/core_kernels.json
    python bench/core_kernels.py --skip-kernels --repeats 10 --out bench/results/core_model_step.json
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
from transformers import BertConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rbert.models.bert import BertLayer, SoftmaxSelfAttention  # noqa: E402
from rbert.models.mlm import IGNORE_INDEX, BertForMaskedLM  # noqa: E402
from rbert.models.relaxed import LinearSelfAttention  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402


def config(hidden: int, heads: int, rank: float | None = None) -> BertConfig:
    cfg = BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.ffn_rank = rank
    return cfg


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def saved_bytes(fn) -> int:
    """Bytes of the (distinct) tensors autograd keeps for backward while ``fn`` runs forward."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def time_in_turns(steps: dict[str, callable], repeats: int, device: str) -> dict[str, float]:
    times = {k: [] for k in steps}
    for r in range(repeats + 1):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            sync(device)
            start = time.perf_counter()
            steps[name]()
            sync(device)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def attention_rows(seqs: list[int], tokens: int, hidden: int, heads: int, repeats: int, device: str) -> list[dict]:
    rows = []
    for seq in seqs:
        batch = max(1, tokens // seq)
        torch.manual_seed(0)
        soft = SoftmaxSelfAttention(config(hidden, heads)).to(device)
        lin = LinearSelfAttention(config(hidden, heads)).to(device)
        lin.load_state_dict(soft.state_dict())
        x = torch.randn(batch, seq, hidden, device=device, requires_grad=True)
        mask = None  # packed blocks need no padding mask (and SDPA then may pick its fastest kernel)

        def step(module, x=x, mask=mask):
            return lambda: module(x, mask).sum().backward()

        row = {"seq": seq, "batch": batch}
        seconds = time_in_turns({"softmax": step(soft), "linear": step(lin)}, repeats, device)
        for name, module in (("softmax", soft), ("linear", lin)):
            row[f"{name}_ms"] = 1000 * seconds[name]
            row[f"{name}_saved_MB"] = saved_bytes(lambda m=module, x=x, mask=mask: m(x, mask).sum()) / 2**20
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                step(module)()
                row[f"{name}_peak_MB"] = torch.cuda.max_memory_allocated() / 2**20
        row["time_ratio"] = row["linear_ms"] / row["softmax_ms"]
        rows.append(row)
    return rows


def layer_rows(seqs: list[int], ranks: list[int], tokens: int, hidden: int, heads: int, repeats: int,
               device: str) -> list[dict]:
    rows = []
    for seq in seqs:
        batch = max(1, tokens // seq)
        x = torch.randn(batch, seq, hidden, device=device)
        for divisor in ranks:
            torch.manual_seed(0)
            full = BertLayer(config(hidden, heads)).to(device)
            relaxed = BertLayer(config(hidden, heads, rank=hidden // divisor), "linear", "low_rank").to(device)
            def step(module, x=x):
                optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

                def run():
                    module(x, None).square().mean().backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                return run

            seconds = time_in_turns({"full": step(full), "relaxed": step(relaxed)}, repeats, device)
            rows.append({"seq": seq, "batch": batch, "rank": f"d/{divisor}={hidden // divisor}",
                         "full_ms": 1000 * seconds["full"], "relaxed_ms": 1000 * seconds["relaxed"],
                         "ratio": seconds["relaxed"] / seconds["full"],
                         "params_ratio": sum(p.numel() for p in relaxed.parameters())
                         / sum(p.numel() for p in full.parameters())})
    return rows


def model_rows(ranks: list[int], batch: int, seq: int, hidden: int, heads: int, layers: int, repeats: int,
               device: str, vocab: int = 30522) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g).to(device)
    labels = torch.where(torch.rand(batch, seq, generator=g).to(device) < 0.15, ids, IGNORE_INDEX)

    def build(rank=None, attention="softmax", feed_forward="dense"):
        cfg = config(hidden, heads, rank)
        cfg.vocab_size, cfg.num_hidden_layers = vocab, layers
        torch.manual_seed(0)
        model = BertForMaskedLM(cfg, attention=attention, feed_forward=feed_forward).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run():
            model(ids, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    rows = []
    variants = {"full": build()}
    for divisor in ranks:
        variants[f"relaxed d/{divisor}"] = build(hidden // divisor, "linear", "low_rank")
    variants["linear attention only"] = build(attention="linear")
    variants[f"low-rank d/{ranks[0]} only"] = build(hidden // ranks[0], feed_forward="low_rank")
    seconds = time_in_turns(variants, repeats, device)
    for name, sec in seconds.items():
        rows.append({"model": name, "batch": batch, "seq": seq, "step_ms": 1000 * sec,
                     "ratio": sec / seconds["full"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per batch (batch = tokens / seq)")
    parser.add_argument("--seqs", nargs="+", type=int, default=[128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--layer-seqs", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 6], help="rank = hidden / this")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-layers", type=int, default=4, help="layers of the whole-model rows (0: skip)")
    parser.add_argument("--model-batch", type=int, default=32)
    parser.add_argument("--skip-kernels", action="store_true", help="only the whole-model rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results/core_kernels.json")
    args = parser.parse_args()
    attention, layers, models = [], [], []
    if not args.skip_kernels:
        attention = attention_rows(args.seqs, args.tokens, args.hidden, args.heads, args.repeats, args.device)
        print("attention forward + backward\n" + format_table(attention, floatfmt="{:.2f}"))
        layers = layer_rows(args.layer_seqs, args.ranks, args.tokens, args.hidden, args.heads, args.repeats,
                            args.device)
        print("\none layer, forward + backward + AdamW\n" + format_table(layers, floatfmt="{:.3f}"))
    if args.model_layers:
        models = model_rows(args.ranks, args.model_batch, 128, args.hidden, args.heads, args.model_layers,
                            args.repeats, args.device)
        print("\nwhole masked-LM step (clip + AdamW)\n" + format_table(models, floatfmt="{:.3f}"))
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "device": args.device,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "hidden": args.hidden,
            "heads": args.heads, "tokens": args.tokens}
    write_json(args.out, {"meta": meta, "attention": attention, "layers": layers, "models": models})
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
