"""Per-exit dev accuracy of multi-exit objectives trained with the same budget and seed.

Runs ``python run.py`` once per configuration (sequentially), reads each run's
``results.json`` and prints one table: a row per configuration, a column per exit.

    python bench/compare_exits.py --data-dir ../shared/data/glue --train-limit 8000 --seeds 42
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rbert.report import format_table, write_json  # noqa: E402

# name (model-pooling) -> run.py overrides; romebert is SD + GR, romebert_sd is SD only.
# romebert uses the reference's KD weight (kd_reduction=mean); romebert_bm the batchmean one
# (C times stronger) that rbert used before.
CONFIGS = {
    "deebert-mean": ["model=deebert"],
    "pabee-mean": ["model=pabee"],
    "romebert_sd-mean": ["model=romebert_sd"],
    "romebert-mean": ["model=romebert"],
    "romebert_bm-mean": ["model=romebert", "model.kd_reduction=batchmean"],
    "deebert-cls": ["model=deebert", "model.net.pooling=cls"],
    "pabee-cls": ["model=pabee", "model.net.pooling=cls"],
    "romebert_sd-cls": ["model=romebert_sd", "model.net.pooling=cls"],
    "romebert-cls": ["model=romebert", "model.net.pooling=cls"],
    "romebert_bm-cls": ["model=romebert", "model.kd_reduction=batchmean", "model.net.pooling=cls"],
}
# Ablations used to explain the main table (run with --configs); not part of the default set.
ABLATIONS = {
    "joint-mean": ["model=joint"],
    "romebert_sd-g0.5-mean": ["model=romebert_sd", "model.gamma=0.5"],
    "romebert-anchor_final-mean": ["model=romebert", "model.anchor=final"],
    "romebert_sd-2ep-mean": ["model=romebert_sd", "trainer.max_epochs=2"],
    "romebert-2ep-mean": ["model=romebert", "trainer.max_epochs=2"],
    "deebert-2ep-mean": ["model=deebert", "model.stage_epochs=[2,1]"],
    "bert-mean": ["model=bert", "model.warmup_ratio=0.0"],
}


def epochs(name: str, n: str) -> list[str]:
    """The epoch budget: every objective's backbone trains ``n`` epochs (DeeBERT's internal exits one more)."""
    if n == "1":
        return []
    return [f"model.stage_epochs=[{n},1]"] if name.startswith("deebert") else [f"trainer.max_epochs={n}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--train-limit", default="8000")
    parser.add_argument("--lr", default="5e-5")
    parser.add_argument("--epochs", default="1", help="trainer.max_epochs (DeeBERT: model.stage_epochs=[n,1])")
    parser.add_argument("--batch-size", default="32")
    parser.add_argument("--seeds", default="42", help="comma-separated")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated names from {', '.join([*CONFIGS, *ABLATIONS])}")
    parser.add_argument("--reuse", action="store_true", help="keep runs whose results.json already exists")
    parser.add_argument("--runs-dir", default="logs/compare_exits")
    parser.add_argument("--out", default="bench/results/compare_exits.json")
    args = parser.parse_args()

    known = {**CONFIGS, **ABLATIONS}
    unknown = [name for name in args.configs.split(",") if name not in known]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {list(known)}")
    runs = []
    for name in args.configs.split(","):
        for seed in args.seeds.split(","):
            run_dir = Path(args.runs_dir) / f"{name}_s{seed}"
            cmd = [sys.executable, "run.py", f"task={args.task}", f"backbone={args.backbone}",
                   f"data_dir={args.data_dir}", f"data.train_limit={args.train_limit}", f"seed={seed}",
                   f"data.batch_size={args.batch_size}", f"model.optimizer.lr={args.lr}",
                   f"hydra.run.dir={run_dir}", "logger=csv", "eval.after_train=false", *epochs(name, args.epochs),
                   *known[name]]
            timing = REPO / run_dir / "bench_seconds.json"
            if not (args.reuse and timing.exists()):
                print("$", " ".join(cmd[1:]), flush=True)
                start = time.perf_counter()
                subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.DEVNULL)
                write_json(timing, {"seconds": time.perf_counter() - start})
            result = json.loads((REPO / run_dir / "results.json").read_text())
            runs.append({"config": name, "seed": int(seed), "seconds": json.loads(timing.read_text())["seconds"],
                         "test": result["test"], "command": " ".join(cmd[1:])})

    metric = "accuracy"
    rows = []
    for name in args.configs.split(","):
        mine = [r for r in runs if r["config"] == name]
        exits = sorted({k for r in mine for k in r["test"] if k.startswith("test/exit_") and k.endswith(metric)},
                       key=lambda k: int(k.split("/")[1].split("_")[1]))
        row = {"config": name, "seeds": len(mine)}
        for key in exits:
            values = [100 * r["test"][key] for r in mine]
            spread = f" +- {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            row[key.split("/")[1]] = f"{statistics.mean(values):.1f}{spread}"
        row["minutes"] = statistics.mean(r["seconds"] for r in mine) / 60
        rows.append(row)
    print(f"\n{args.task} dev {metric} (%) per exit, mean +- std over seeds {args.seeds}; "
          f"backbone {args.backbone}, train rows {args.train_limit}")
    print(format_table(rows, floatfmt="{:.1f}"))
    meta = {"date": date.today().isoformat(), "task": args.task, "backbone": args.backbone,
            "train_limit": args.train_limit, "lr": args.lr, "batch_size": args.batch_size, "seeds": args.seeds,
            "epochs": args.epochs}
    write_json(args.out, {"meta": meta, "table": rows, "runs": runs})


if __name__ == "__main__":
    main()
