"""Throughput of rbert's BERT against Hugging Face transformers, same weights, same batches.

Measures, in one run, with the two implementations interleaved round by round:
  * train step: ``model=bert`` (rbert SequenceClassifier: forward, loss, backward,
    clip, AdamW step) vs ``transformers.BertForSequenceClassification``;
  * encoder forward (inference, no grad) vs ``transformers.BertModel``.
Prints a table and writes JSON.

    python bench/bench_bert.py --data-dir ../shared/data/glue --out bench/results/bert.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rbert.data.tasks import TaskSpec  # noqa: E402
from rbert.models import BertForSequenceClassification, load_encoder, load_tokenizer  # noqa: E402
from rbert.models.hub import resolve  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402
from rbert.systems import SequenceClassifier  # noqa: E402


def sentences(data_dir: str | None, n: int) -> list[str]:
    """Real SST-2 dev sentences when available (lengths matter), else synthetic ones."""
    if data_dir and (Path(data_dir) / "SST-2" / "dev.tsv").is_file():
        lines = (Path(data_dir) / "SST-2" / "dev.tsv").read_text().splitlines()[1:]
        return [line.split("\t")[0] for line in lines][:n]
    words = "the film is a long and very good story about an old man and the sea".split()
    return [" ".join(words[: 5 + i % 12]) for i in range(n)]


def make_batches(backbone: str, texts: list[str], batch_size: int, device: str) -> list[dict[str, torch.Tensor]]:
    tok = load_tokenizer(backbone)
    out = []
    for i in range(0, len(texts) - batch_size + 1, batch_size):
        enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc["labels"] = torch.arange(batch_size) % 2
        out.append({k: v.to(device) for k, v in enc.items()})
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, batches, device: str) -> float:
    """Samples per second of ``fn`` over ``batches``."""
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    sync(device)
    return sum(b["input_ids"].shape[0] for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--out", default="bench/results/bert.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = args.device
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    def autocast():
        return torch.autocast(dev.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None)

    batches = make_batches(args.backbone, sentences(args.data_dir, args.batch_size * args.batches),
                           args.batch_size, dev)
    task = TaskSpec(name="sst2", text_fields=["sentence"], num_labels=2, labels=["0", "1"], metrics=["accuracy"],
                    monitor="accuracy", splits={"train": "train.tsv", "val": "dev.tsv"})

    # The same weights in both: rbert's classifier is built first, transformers' gets its state dict.
    ours = SequenceClassifier(task, BertForSequenceClassification(load_encoder(args.backbone), 2),
                              optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5)).to(dev)
    hf_config = transformers.AutoConfig.from_pretrained(resolve(args.backbone), num_labels=2)
    hf = transformers.BertForSequenceClassification(hf_config)
    hf.load_state_dict(ours.net.state_dict())
    hf = hf.to(dev)
    hf_encoder = hf.bert

    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(enabled=amp_dtype is torch.float16)

    def train_step(loss_fn, model, opt):
        def step(batch):
            with autocast():
                loss = loss_fn(batch)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        return step

    ours_train = train_step(lambda b: ours.training_loss(b)[0], ours, opt_ours)
    hf_train = train_step(lambda b: hf(**b).loss, hf, opt_hf)

    @torch.inference_mode()
    def ours_forward(b):
        with autocast():
            ours.net.bert(b["input_ids"], b["attention_mask"], b["token_type_ids"])

    @torch.inference_mode()
    def hf_forward(b):
        with autocast():
            hf_encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])

    results = []
    for name, (fn_ours, fn_hf, mode) in {
        "train step (model=bert vs BertForSequenceClassification)": (ours_train, hf_train, "train"),
        "encoder forward (BertModel vs transformers.BertModel)": (ours_forward, hf_forward, "eval"),
    }.items():
        ours.train(mode == "train")
        hf.train(mode == "train")
        fn_ours(batches[0])  # warm-up
        fn_hf(batches[0])
        rates_ours, rates_hf = [], []
        for _ in range(args.rounds):
            rates_ours.append(timed(fn_ours, batches, dev))
            rates_hf.append(timed(fn_hf, batches, dev))
        o, h = statistics.median(rates_ours), statistics.median(rates_hf)
        results.append({"measure": name, "rbert samples/s": o, "transformers samples/s": h, "ratio": o / h,
                        "rbert rounds": rates_ours, "transformers rounds": rates_hf})

    machine = (torch.cuda.get_device_name() if dev.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    meta = {"date": date.today().isoformat(), "device": dev, "machine": machine, "amp": args.amp,
            "backbone": args.backbone, "batch_size": args.batch_size, "batches_per_round": args.batches,
            "rounds": args.rounds, "torch": torch.__version__, "transformers": transformers.__version__,
            "mean_tokens_per_batch": statistics.mean(b["input_ids"].numel() for b in batches)}
    cols = ["measure", "rbert samples/s", "transformers samples/s", "ratio"]
    print(json.dumps(meta))
    print(format_table([{k: r[k] for k in cols} for r in results], cols, floatfmt="{:.2f}"))
    write_json(args.out, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
