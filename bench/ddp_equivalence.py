"""DDP equals one process: the same steps with the same effective batch, on real data.

For each objective, ``run.py`` trains a few steps in one process (batch B) and with
``trainer=ddp_cpu`` (2 processes, batch B/2 each), from the same initial weights and data
order, with dropout off and SGD (Adam's first steps would hide gradient differences), then
compares the final weights and the dev (or validation) metrics. CoLA's dev set has 1,043
sentences, so the two ranks get 522 and 521: a padded split would count one twice.

    python bench/ddp_equivalence.py --backbone logs/pretrain_small/hf
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rbert.report import format_table, write_json  # noqa: E402

SGD = ["model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=0.5"]
CASES = {
    "bert": ["task=cola", "model=bert", "model.net.bert.dropout=0.0", "model.net.dropout=0.0",
             "data.shuffle=false", "eval.after_train=false", *SGD],
    "romebert": ["task=cola", "model=romebert", "model.net.bert.dropout=0.0", "model.net.dropout=0.0",
                 "data.shuffle=false", "eval.after_train=false", *SGD],
    "bert_mlm": ["--config-name", "pretrain", "arch=small", "+arch.hidden_dropout_prob=0",
                 "+arch.attention_probs_dropout_prob=0", "data.files.train=valid.txt",
                 "data.files.val=wikitext-2/valid.txt", "export_dir=null", "~model.optimizer.betas",
                 "~model.optimizer.eps", *SGD],
}


def run(name: str, out: Path, batch: int, ddp: bool, args) -> tuple[dict, dict, float]:
    extra = CASES[name]
    pretrain = "--config-name" in extra
    cmd = [sys.executable, "run.py", *extra, f"hydra.run.dir={out}", f"data.batch_size={batch}",
           f"trainer.max_steps={args.steps}", "logger=csv", "seed=1"]
    if pretrain:
        cmd += [f"data_dir={args.text_dir}", f"trainer.val_check_interval={args.steps}"]
    else:
        cmd += [f"backbone={args.backbone}", f"data_dir={args.data_dir}", "data.train_limit=null"]
    if ddp:
        cmd.append("trainer=ddp_cpu")
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - start
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    res = json.loads((out / "results.json").read_text())
    return state, res.get("test") or res.get("final"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="logs/pretrain_small/hf")
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--text-dir", default="../shared/data/text")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--runs-dir", default="logs/ddp_equivalence")
    parser.add_argument("--out", default="bench/results/ddp_equivalence.json")
    args = parser.parse_args()
    rows = []
    for name in args.cases:
        one, one_metrics, one_s = run(name, Path(args.runs_dir) / f"{name}-one", args.batch_size, False, args)
        ddp, ddp_metrics, ddp_s = run(name, Path(args.runs_dir) / f"{name}-ddp", args.batch_size // 2, True, args)
        moved = max((one[k].float() - ddp[k].float()).abs().max().item() for k in one)
        keys = [k for k in one_metrics if not k.endswith("/perplexity")]
        rows.append({"objective": name, "steps": args.steps,
                     "batch": f"{args.batch_size} vs 2 x {args.batch_size // 2}",
                     "max |w_one - w_ddp|": moved,
                     "max metric diff": max(abs(one_metrics[k] - ddp_metrics[k]) for k in keys),
                     "metrics": ", ".join(f"{k} {one_metrics[k]:.4f}" for k in keys[:3]),
                     "seconds one / ddp": f"{one_s:.0f} / {ddp_s:.0f}"})
    print(format_table(rows, floatfmt="{:.2e}"))
    write_json(args.out, {"date": date.today().isoformat(), "rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
