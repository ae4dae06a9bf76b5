"""Does a pre-trained checkpoint fine-tune better than random weights of its shape and vocabulary?

For each task, fine-tuning budget, learning rate and seed, ``python run.py model=bert`` on the
checkpoint's Hugging Face folder, once as trained and once with ``model.net.bert.pretrained=false``
(the same config.json and tokenizer, random weights). Every run has its own folder under
``--out``; a finished run (its ``results.json``) is not run again, so an interrupted grid resumes.
Prints a table of mean +- std over seeds per row and the gain of pre-training, and writes it
as JSON (``--out``/pretrain_helps.json).

    python bench/pretrain_helps.py logs/pretrain_long/hf --glue ../shared/data/glue \\
        --tasks sst2 stsb --seeds 1 2 3 --lrs 1e-4 5e-4 --out logs/pretrain_helps
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rbert.report import format_table, write_json  # noqa: E402

# Fine-tuning budgets: the default one (model=bert's quick start) and two low-resource ones
# (1,500 and 1,000 labelled rows), where a prior should matter most.
BUDGETS = {"default": [], "low": ["data.train_limit=1500", "trainer.max_epochs=3"],
           "low1k": ["data.train_limit=1000", "trainer.max_epochs=3"]}
METRIC = {"sst2": "accuracy", "stsb": "pearson", "cola": "mcc", "mrpc": "f1"}


def run_one(folder: Path, checkpoint: Path, glue: Path, task: str, budget: str, lr: float, seed: int,
            pretrained: bool) -> float:
    results = folder / "results.json"
    if not results.is_file():
        cmd = [sys.executable, "run.py", f"task={task}", "model=bert", f"backbone={checkpoint}",
               f"model.net.bert.pretrained={str(pretrained).lower()}", f"model.optimizer.lr={lr}", f"seed={seed}",
               f"data_dir={glue}", "eval.after_train=false", "logger=csv", f"hydra.run.dir={folder}",
               *BUDGETS[budget]]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    tested = json.loads(results.read_text())["test"]
    return 100 * tested[f"test/{METRIC[task]}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a Hugging Face folder (pre-training's export)")
    parser.add_argument("--glue", type=Path, default=Path("../shared/data/glue"))
    parser.add_argument("--tasks", nargs="+", default=["sst2", "stsb"])
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 5e-4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("logs/pretrain_helps"))
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").is_file():
        raise SystemExit(f"{args.checkpoint}: not a Hugging Face folder (no config.json)")
    rows, started = [], time.time()
    for task in args.tasks:
        for budget in args.budgets:
            for lr in args.lrs:
                scores = {}
                for init in ("pre-trained", "random"):
                    scores[init] = [run_one(args.out / f"{task}_{budget}_lr{lr:g}_{init}_s{seed}",
                                            args.checkpoint.resolve(), args.glue.resolve(), task, budget, lr,
                                            seed, init == "pre-trained") for seed in args.seeds]
                mean = {k: statistics.mean(v) for k, v in scores.items()}
                std = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in scores.items()}
                rows.append({"task": task, "metric": METRIC[task], "budget": budget, "lr": lr,
                             "pre-trained": f"{mean['pre-trained']:.2f} +- {std['pre-trained']:.2f}",
                             "random": f"{mean['random']:.2f} +- {std['random']:.2f}",
                             "gain": round(mean["pre-trained"] - mean["random"], 2), "scores": scores})
                print(f"[{time.time() - started:.0f} s] {task} {budget} lr {lr:g}: {rows[-1]['pre-trained']} vs "
                      f"{rows[-1]['random']}", flush=True)
    print(format_table([{k: v for k, v in r.items() if k != "scores"} for r in rows]))
    write_json(args.out / "pretrain_helps.json", {"checkpoint": str(args.checkpoint), "seeds": args.seeds,
                                                  "budgets": {b: BUDGETS[b] for b in args.budgets}, "rows": rows})


if __name__ == "__main__":
    main()
