"""Training step time of each multi-exit objective relative to ``model=bert``, in one run.

Each objective's LightningModule does what Lightning would do in a step: its
``training_loss`` (RomeBERT's GR computes g_A there), backward, ``on_before_optimizer_step``
(RomeBERT's GR projection), clipping and an AdamW step. Objectives are timed round-robin
on the same batches of real SST-2 sentences; the median of the rounds is reported.

    python bench/bench_objectives.py --data-dir ../shared/data/glue --out bench/results/objectives.json
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_bert import make_batches, sentences, sync  # noqa: E402
from rbert.data.tasks import TaskSpec  # noqa: E402
from rbert.models import BertForSequenceClassification, MultiExitBert, load_encoder  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402
from rbert.systems import PABEE, DeeBERT, RomeBERT, SequenceClassifier  # noqa: E402


def build(name: str, backbone: str, task: TaskSpec, pooling: str):
    adamw = functools.partial(torch.optim.AdamW, lr=2e-5)
    torch.manual_seed(0)
    bert = load_encoder(backbone)
    if name == "bert":
        return SequenceClassifier(task, BertForSequenceClassification(bert, 2), adamw)
    net = MultiExitBert(bert, 2, style="pabee" if name == "pabee" else "highway", pooling=pooling)
    if name.startswith("deebert"):
        system = DeeBERT(task, net, adamw)
        system.set_stage(1 if name.endswith("stage2") else 0)
        return system
    if name == "pabee":
        return PABEE(task, net, adamw)
    return RomeBERT(task, net, adamw, self_distillation=name != "joint", gradient_regularization=name == "romebert")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results/objectives.json")
    args = parser.parse_args()
    dev = args.device
    task = TaskSpec(name="sst2", text_fields=["sentence"], num_labels=2, labels=["0", "1"], metrics=["accuracy"],
                    monitor="accuracy", splits={"train": "train.tsv", "val": "dev.tsv"})
    batches = make_batches(args.backbone, sentences(args.data_dir, args.batch_size * args.batches),
                           args.batch_size, dev)
    names = ["bert", "joint", "romebert_sd", "romebert", "pabee", "deebert_stage1", "deebert_stage2"]
    steps = {}
    for name in names:
        system = build(name, args.backbone, task, args.pooling).to(dev).train()
        system.trainer = pl.Trainer(accelerator="cpu" if dev == "cpu" else "gpu", devices=1, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        system.log_dict = lambda *a, **k: None
        params = [p for p in system.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-5)

        def step(batch, system=system, params=params, opt=opt):
            loss, _ = system.training_loss(batch)
            loss.backward()
            system.on_before_optimizer_step(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(batches[0])  # warm-up
        steps[name] = step

    seconds = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            sync(dev)
            start = time.perf_counter()
            for batch in batches:
                steps[name](batch)
            sync(dev)
            seconds[name].append((time.perf_counter() - start) / len(batches))
    base = statistics.median(seconds["bert"])
    rows = [{"objective": n, "ms/step": 1000 * statistics.median(seconds[n]),
             "x model=bert": statistics.median(seconds[n]) / base} for n in names]
    machine = torch.cuda.get_device_name() if dev.startswith("cuda") else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    meta = {"date": date.today().isoformat(), "device": dev, "machine": machine, "backbone": args.backbone,
            "batch_size": args.batch_size, "pooling": args.pooling, "rounds": args.rounds, "torch": torch.__version__}
    print(meta)
    print(format_table(rows, floatfmt="{:.2f}"))
    write_json(args.out, {"meta": meta, "results": rows, "seconds": seconds})


if __name__ == "__main__":
    main()
