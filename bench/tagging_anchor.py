"""Is rbert's token classifier as good as the one everybody else trains? The parity anchor.

``transformers``' ``AutoModelForTokenClassification`` on the same backbone, fine-tuned in a
plain PyTorch loop (no Lightning, no rbert model code) on exactly the rows rbert trains on
(rbert's tagging data module: the same sentences, selection split, word pieces and
first-piece labels, the same shuffled order per epoch), with the same budget (epochs,
batch size), learning rate, warm-up, weight decay, gradient clipping (``trainer.gradient_clip_val``,
1.0: also ``transformers.Trainer``'s default ``max_grad_norm``) and checkpoint choice (the
best epoch on the selection split). The dev metric of its chosen epoch is compared with the plain model
(``model=bert``) of the frontier plan of the same task and seed (``bench/frontier.py``):

    python bench/tagging_anchor.py run --plan pos_ewt --seeds 42 43 44
    python bench/tagging_anchor.py report --plan pos_ewt

The decoder and the metric are rbert's for both (word accuracy; seqeval entity F1 with valid
BIO decoding), so the comparison is of the trained models. Runs are recorded per plan and
seed (``bench/records/tagging_anchor_<plan>.jsonl``) and skipped once recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.frontier import PLANS, RESULTS  # noqa: E402
from bench.runs import RunRecord, job_key, machine  # noqa: E402

RECORDS = REPO / "bench" / "records"
SUMMARIES = REPO / "bench" / "results"


class Anchor:
    """The Hugging Face model as :func:`rbert.inference.sweep.exit_logits` calls a system."""

    def __init__(self, model, task):
        self.model, self.task = model, task

    def __call__(self, batch):
        return [self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits]


def compose(plan: str, seed: int):
    """The plan's plain-model config for ``seed``, as ``run.py`` would compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import rbert.launch  # noqa: F401  (the rbert.* resolvers)

    overrides = [*PLANS[plan].common, "model=bert", f"seed={seed}"]
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return hydra_compose("config", [o for o in overrides if not o.startswith(("logger=", "eval."))])


def train_anchor(plan: str, seed: int) -> dict:
    import torch
    from transformers import AutoModelForTokenClassification, get_scheduler

    from rbert.build import build_datamodule, build_task
    from rbert.inference.sweep import exit_logits, task_metric
    from rbert.models.hub import resolve

    cfg = compose(plan, seed)
    task = build_task(cfg)
    datamodule = build_datamodule(cfg, task)
    datamodule.setup("fit")
    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_pretrained(resolve(cfg.backbone), num_labels=task.num_labels)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    settings = cfg.model.optimizer
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=float(settings.lr), weight_decay=float(settings.weight_decay))
    loader = datamodule.train_dataloader()
    clip = float(cfg.trainer.get("gradient_clip_val") or 0.0)
    epochs = int(cfg.trainer.max_epochs)
    total = epochs * len(loader)
    scheduler = get_scheduler("linear", optimizer, int(float(cfg.model.warmup_ratio) * total), total)
    system = Anchor(model, task)
    best, history, seconds = None, [], 0.0
    for epoch in range(epochs):
        model.train()
        loader.sampler.set_epoch(epoch)  # the order rbert's run sees in this epoch
        start = time.perf_counter()
        for batch in loader:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            out.loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        seconds += time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            logits, labels = exit_logits(system, datamodule.selection_loader(), torch.device("cpu"),
                                         contextlib.nullcontext)
        score = task_metric(task, logits[-1], labels)[task.monitor]
        history.append(score)
        print(f"anchor {plan} seed {seed} epoch {epoch + 1}: select {task.monitor} {score:.4f}", flush=True)
        if best is None or score > best[0]:
            best = (score, epoch + 1, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    with torch.no_grad():
        logits, labels = exit_logits(system, datamodule.eval_loader(0), torch.device("cpu"), contextlib.nullcontext)
    dev = {k: (None if v != v else v)  # a type with no entities at all has no F1 (NaN): null in the record
           for k, v in task_metric(task, logits[-1], labels, per_type=True).items()}
    return {"select": best[0], "best_epoch": best[1], "select_by_epoch": history, "dev": dev,
            "train_seconds": seconds, "lr": float(cfg.model.optimizer.lr), "epochs": epochs, "clip": clip,
            "batch_size": int(cfg.data.batch_size)}


def run(args) -> None:
    record = RunRecord(RECORDS / f"tagging_anchor_{args.plan}.jsonl")
    for seed in args.seeds:
        key = job_key(f"anchor-s{seed}", [*PLANS[args.plan].common, f"seed={seed}", "clip"])
        if key in record.done():
            print(f"{key}: recorded, skipped")
            continue
        start = time.time()
        result = train_anchor(args.plan, seed)
        record.add({"key": key, "plan": args.plan, "seed": seed, "date": date.today().isoformat(),
                    "machine": machine(), "wall_minutes": (time.time() - start) / 60, **result})
        print(f"{key}: recorded ({(time.time() - start) / 60:.1f} min)", flush=True)


def report(args) -> dict:
    from rbert.report import format_table, write_json

    anchors = {e["seed"]: e for e in RunRecord(RECORDS / f"tagging_anchor_{args.plan}.jsonl").entries()}
    plains = {e["seed"]: e for e in RunRecord(RESULTS / f"{args.plan}.jsonl").entries() if e["name"] == "plain"}
    rows = []
    for seed in sorted(anchors.keys() & plains.keys()):
        metric = plains[seed]["metric"]
        ours, theirs = 100 * plains[seed]["per_exit"]["dev"][-1], 100 * anchors[seed]["dev"][metric]
        rows.append({"seed": seed, f"rbert dev {metric}": ours, f"transformers dev {metric}": theirs,
                     "rbert - transformers": ours - theirs,
                     "rbert train min": plains[seed]["train_seconds"] / 60,
                     "transformers train min": anchors[seed]["train_seconds"] / 60})
    if not rows:
        raise SystemExit(f"plan {args.plan}: no seed has both the anchor and the frontier's plain run recorded")
    diffs = [r["rbert - transformers"] for r in rows]
    summary = {"plan": args.plan, "rows": rows, "mean_diff": float(np.mean(diffs)),
               "mean_rbert": float(np.mean([r[next(k for k in r if k.startswith("rbert dev"))] for r in rows])),
               "seeds": len(rows)}
    print(f"\nparity anchor, {args.plan}: rbert's model=bert vs transformers' AutoModelForTokenClassification in a "
          f"plain loop (same rows, budget, lr, checkpoint choice)\n{format_table(rows, floatfmt='{:.2f}')}\n"
          f"mean difference over {len(rows)} seed(s): {summary['mean_diff']:+.2f} points")
    write_json(SUMMARIES / f"tagging_anchor_{args.plan}.json", summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--plan", default="pos_ewt", choices=("pos_ewt", "ner_wnut17"))
        if name == "run":
            p.add_argument("--seeds", type=int, nargs="+", default=[42])
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
