"""Early exit against what a user would deploy instead: the plain model and static depth.

One task, one data budget (the same rows and epochs for every configuration), and on one
plane, metric against *measured* speed-up over the plain fine-tuned model at full depth:

* the plain model (``model=bert``), the reference;
* static depth: the same backbone cut to k layers *before* fine-tuning
  (``model.net.bert.num_layers=k``);
* each multi-exit objective's early-exit curves (entropy, confidence, patience).

Selection is honest: ``data.select_rows`` training rows are held out (never trained on) as
the selection split; checkpoints, exit thresholds and the "within 1 point" budget point are
chosen on it, and the dev set is only reported.

``run`` trains what the plan's record lacks (``bench/runs.py``: a job per configuration
and seed, skipped once recorded; a killed job resumes from its ``last.ckpt``), then
evaluates it: every exit's logits on the selection and dev sets (kept beside the record,
so the report needs no checkpoint), and wall-clock time at bs=1 and batched of the model
(plain, static) or of its early-exit points, each timed in turns with the plain full-depth
model in the same process. The reference's speed does not depend on its weights, so it is
the plain architecture (the backbone at full depth with the plain head), and a job's
speed-ups stay valid in a later session. ``report`` reads the record and prints/writes the
plane: per configuration the mean over seeds and the seed spread; each early-exit curve
interpolated at every static model's measured speed-up; one number per curve, the mean
gain over the static curve (ELUE's score, with measured speed-up for FLOPs); the budget
point (largest speed-up within 1 point of the plain model on the selection split) with a
paired bootstrap interval on dev against the plain model and the nearest static one; and
a flag where a final exit sits at chance level.

    python bench/frontier.py run --plan sst2 [--only plain,static-3] [--seeds 42]
    python bench/frontier.py report --plan sst2 [--logger wandb]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.runs import RunRecord, checkpoint, job_key, machine, train  # noqa: E402

# The record and the logits beside it are committed: a later session reports (and skips) from them.
RESULTS = REPO / "bench" / "records" / "frontier"
TARGETS = (1.5, 2.0, 2.5, 3.0, 4.0)  # layer speed-ups (on the selection split) of the timed points
POLICIES = {  # the early-exit policies swept, with a fine grid of thresholds
    "entropy": [round(float(x), 3) for x in np.linspace(0.0, 1.0, 41)],
    "confidence": [round(float(x), 3) for x in np.linspace(0.5, 1.0, 41)],
    "patience": [1, 2, 3, 4, 5],
}


@dataclass
class Plan:
    """A task and budget, and the configurations trained on it (name -> run.py overrides)."""

    common: list[str]
    configs: dict[str, list[str]]
    seeds: dict[str, list[int]] = field(default_factory=dict)  # per configuration; default [42]
    max_drop: float = 1.0  # the budget point: within this many points of the plain model (selection split)


PLAIN = ["model=bert"]
PLAIN_CKPT = "{plain_checkpoint}"  # replaced by the checkpoint of the recorded plain run of the same seed
STATIC = {f"static-{k}": ["model=bert", f"model.net.bert.num_layers={k}"] for k in (2, 3, 4)}
SST2 = ["task=sst2", "data_dir=../shared/data/glue", "data.train_limit=16000", "data.select_rows=2000",
        "trainer.max_epochs=1", "eval.after_train=false", "logger=csv"]


def deebert_on_plain(epochs: int) -> list[str]:
    """DeeBERT's exits on the recorded plain model of the same seed (stage 1 skipped)."""
    return ["model=deebert", f"model.init_from={PLAIN_CKPT}", f"model.stage_epochs=[0,{epochs}]"]


MULTI_EXIT = {"romebert": ["model=romebert"], "deebert": ["model=deebert"], "pabee": ["model=pabee"]}
PLANS = {
    # SST-2 at the default budget: 16,000 training rows (after 2,000 held out), 1 epoch.
    # In the order they run: the reference, static depth, the objectives, then what might move
    # the frontier (a teacher, the learning rate).
    "sst2": Plan(SST2, {
        "plain": PLAIN, **STATIC, **MULTI_EXIT,
        # Every exit distils from the plain model of the same seed; the static models get the same offer.
        # The plain model as Hugging Face's BertForSequenceClassification has it (the [CLS] pooler),
        # which an Optimum export can reproduce (bench/deploy_int8.py).
        "plain-cls": [*PLAIN, "model.net.pooling=cls"],
        "romebert-teacher": ["model=romebert", f"model.teacher={PLAIN_CKPT}"],
        "static-3-teacher": [*STATIC["static-3"], f"model.teacher={PLAIN_CKPT}"],
        "romebert-lr2e-4": ["model=romebert", "model.optimizer.lr=2e-4"],
        "romebert-lr5e-5": ["model=romebert", "model.optimizer.lr=5e-5"],
        "plain-lr5e-5": [*PLAIN, "model.optimizer.lr=5e-5"],
        "plain-lr2e-4": [*PLAIN, "model.optimizer.lr=2e-4"],
        "deebert-lr5e-5": ["model=deebert", "model.optimizer.lr=5e-5"],
        "deebert-lr2e-4": ["model=deebert", "model.optimizer.lr=2e-4"],
    }),
    # The larger budget: every SST-2 training row but the 2,000 held out, 1 epoch; the plain
    # model, static depth at the goal's 2x, and the best multi-exit configuration of "sst2".
    "sst2_full": Plan([o for o in SST2 if not o.startswith("data.train_limit")] + ["data.train_limit=null"],
                      {"plain": PLAIN, "static-3": STATIC["static-3"], "deebert": MULTI_EXIT["deebert"]}),
    # A task where depth pays (plain MCC 0.114 at 6 layers, 0.019 at 3, on 1 epoch): CoLA,
    # every training row but 1,000 held out, 3 epochs.
    "cola": Plan(["task=cola", "data_dir=../shared/data/glue", "data.train_limit=null", "data.select_rows=1000",
                  "trainer.max_epochs=3", "eval.after_train=false", "logger=csv"],
                 {"plain": PLAIN, "deebert": MULTI_EXIT["deebert"],  # the SST-2 frontier's best first
                  # The recorded "deebert" job ran when DeeBERT's stages had 1 epoch each whatever
                  # trainer.max_epochs said (a third of the plan's budget); they follow it now.
                  "deebert-3ep": [*MULTI_EXIT["deebert"], "model.stage_epochs=[3,3]"],
                  **{k: STATIC[k] for k in ("static-3", "static-4", "static-2")},
                  "romebert": MULTI_EXIT["romebert"], "pabee": MULTI_EXIT["pabee"]}),
    # Sequence labelling (sentence-level early exit, SENTEE): every training sentence but those
    # held out, the epochs; the same configurations, token heads picked by the task.
    # "deebert-ft": DeeBERT's second stage on the plain run of the same seed (its final exit *is*
    # the plain model), the exits trained as long as the plain model was; "-ss": with token-level
    # exit's self-sampling (the exits see copied states of words that left; default settings).
    "pos_ewt": Plan(["task=pos_ewt", "data_dir=../shared/data/tagging", "data.select_rows=1000",
                     "trainer.max_epochs=3", "eval.after_train=false", "logger=csv"],
                    {"plain": PLAIN, "deebert-ft": deebert_on_plain(3), **STATIC, **MULTI_EXIT,
                     "deebert-ft-ss": [*deebert_on_plain(3), "model.self_sampling={sandwich: 2}"],
                     # exits trained *with* the backbone, from the plain model and distilled from it
                     # (its final exit too), one more epoch: do jointly trained exits let words leave sooner?
                     "sd-ft": ["model=romebert_sd", f"model.init_from={PLAIN_CKPT}", f"model.teacher={PLAIN_CKPT}",
                               "trainer.max_epochs=1"]}),
    "ner_wnut17": Plan(["task=ner_wnut17", "data_dir=../shared/data/tagging", "data.select_rows=400",
                        "trainer.max_epochs=5", "eval.after_train=false", "logger=csv"],
                       {"plain": PLAIN, **STATIC, **MULTI_EXIT, "deebert-ft": deebert_on_plain(5)}),
}


# ---------------------------------------------------------------------------- evaluation of one job
def evaluate_job(ckpt: Path, floor: float | None, max_drop: float, samples: int, batches: int,
                 repeats: int) -> tuple[dict, dict]:
    """Exit logits on the selection and dev sets, and the timed points of one checkpoint: what
    goes in the record, and the arrays kept beside it.

    ``floor``: the plain model's selection-split metric (None: this model's own final exit);
    the budget point is the largest speed-up within ``max_drop`` points of it.
    """
    import torch

    with torch.no_grad():  # scoped: the caller (a test, a later training job) keeps its grad mode
        return _evaluate_job(ckpt, floor, max_drop, samples, batches, repeats)


def _evaluate_job(ckpt: Path, floor: float | None, max_drop: float, samples: int, batches: int,
                  repeats: int) -> tuple[dict, dict]:
    import contextlib

    import torch

    from rbert.build import build_datamodule
    from rbert.inference.checkpoint import load_task_system
    from rbert.inference.engine import EarlyExit, simulate
    from rbert.inference.policies import ConfidenceExit, EntropyExit, PatienceExit
    from rbert.inference.sweep import exit_logits, task_metric, words_of
    from rbert.inference.timing import time_in_turns, timing_inputs
    from rbert.inference.words import IGNORE
    from rbert.models import (
        BertForSequenceClassification,
        BertForTokenClassification,
        MultiExitBert,
        MultiExitTokenBert,
        load_encoder,
    )

    system, train_cfg, trained = load_task_system(str(ckpt))
    task, device, metric = system.task, torch.device("cpu"), system.task.monitor
    tagging = task.kind == "tagging"
    datamodule = build_datamodule(train_cfg, task, backbone=train_cfg.backbone)
    sets = {}
    for name, loader in (("select", datamodule.selection_loader()), ("dev", datamodule.eval_loader(0))):
        logits, labels = exit_logits(system, loader, device, contextlib.nullcontext)
        sets[name] = ([logits[system.exit_layers.index(layer)] for layer in trained], labels)
    result = {"exit_layers": trained, "metric": metric,
              "per_exit": {name: [task_metric(task, z, y)[metric] for z in zs] for name, (zs, y) in sets.items()},
              "majority": {name: majority(gold_of(y), task.num_labels) for name, (_, y) in sets.items()},
              "train_seconds": float(torch.load(ckpt, map_location="cpu", weights_only=True)
                                     .get("rbert_train_seconds", float("nan")))}

    # The reference: the plain architecture at full depth (its speed does not depend on its weights).
    encoder = load_encoder(train_cfg.backbone, pretrained=False)
    if tagging:
        reference = BertForTokenClassification(encoder, task.num_labels).eval()
    else:
        reference = BertForSequenceClassification(encoder, task.num_labels,
                                                  pooling=train_cfg.model.net.get("pooling", "mean")).eval()
    inputs = timing_inputs(datamodule.eval_loader(0, 32), device, samples, batches)

    def forward(model):
        if isinstance(model, EarlyExit) and model.tokens:  # SENTEE decides on the words' first pieces
            return lambda x: model(x["input_ids"], x["attention_mask"], x.get("token_type_ids"),
                                   words=x["labels"] != IGNORE)
        return lambda x: model(x["input_ids"], x["attention_mask"], x.get("token_type_ids"))

    calls, points, net = {"reference": forward(reference)}, [], system.net
    answered = []  # the dev logits each point answers with (tagging keeps their per-sentence counts)
    if isinstance(net, (MultiExitBert, MultiExitTokenBert)) and len(trained) > 1:
        (select_logits, select_labels), (dev_logits, dev_labels) = sets["select"], sets["dev"]
        floor = result["per_exit"]["select"][-1] if floor is None else floor
        makers = {"entropy": EntropyExit, "confidence": ConfidenceExit, "patience": PatienceExit}
        for pname, grid in POLICIES.items():
            rows = []
            for value in grid:
                sel = simulate(makers[pname](value), select_logits, trained, words_of(select_labels))
                rows.append({"threshold": value, "select_metric": task_metric(task, sel.logits, select_labels)[metric],
                             "select_layer_speedup": trained[-1] / sel.exit_layer.float().mean().item()})
            chosen: dict[float, list[str]] = {}
            for target in TARGETS:
                row = min(rows, key=lambda r: abs(r["select_layer_speedup"] - target))
                chosen.setdefault(row["threshold"], []).append(f"{target}x")
            within = [r for r in rows if r["select_metric"] >= floor - max_drop / 100]
            if within:
                best = max(within, key=lambda r: r["select_layer_speedup"])
                chosen.setdefault(best["threshold"], []).append("budget")
            for row in (r for r in rows if r["threshold"] in chosen):
                policy = makers[pname](row["threshold"])
                dev = simulate(policy, dev_logits, trained, words_of(dev_labels))
                answered.append(dev.logits)
                name = f"{pname}={row['threshold']}"
                calls[name] = forward(EarlyExit(net, policy, trained))
                points.append({"policy": pname, "call": name, "targets": chosen[row["threshold"]], **row,
                               "dev_metric": task_metric(task, dev.logits, dev_labels)[metric],
                               "dev_layer_speedup": trained[-1] / dev.exit_layer.float().mean().item()})
    else:  # a single-exit model: the model itself is the point
        calls["model"] = forward(net)
        answered.append(sets["dev"][0][-1])
        full_depth = reference.bert.num_layers
        points.append({"policy": "none", "call": "model", "threshold": None, "targets": ["model"],
                       "select_metric": result["per_exit"]["select"][-1], "dev_metric": result["per_exit"]["dev"][-1],
                       "select_layer_speedup": full_depth / trained[-1], "dev_layer_speedup": full_depth / trained[-1]})
    def over(items, call):
        return lambda i: call(items[i])

    with torch.inference_mode():
        one = time_in_turns({k: over(inputs.single, c) for k, c in calls.items()}, len(inputs.single), repeats)
        many = time_in_turns({k: over(inputs.batched, c) for k, c in calls.items()}, len(inputs.batched), repeats)
    for point in points:
        name = point.pop("call")
        point.update(bs1_seconds=one[name], batched_seconds=many[name],
                     speedup_bs1=one["reference"] / one[name], speedup_batched=many["reference"] / many[name])
    result.update(points=points, reference_seconds={"bs1": one["reference"], "batched": many["reference"]},
                  timing=f"bs=1 on {len(inputs.single)} dev sentences, batched on {len(inputs.batched)} dev "
                         f"batches of 32, each item's best of {repeats}, in turns with the plain full-depth model")
    if tagging:
        # Token logits of every exit would be megabytes per job: the record keeps, per timed point,
        # each dev sentence's counts (correct words and words; or entities right, predicted, gold),
        # all that the report's metric and its bootstrap over sentences need.
        arrays = {f"dev_stats_{i}": sentence_stats(task, z, sets["dev"][1]) for i, z in enumerate(answered)}
        for i, point in enumerate(points):
            point["stats"] = f"dev_stats_{i}"
        return result, arrays
    arrays = {f"{name}_logits": torch.stack(zs).numpy() for name, (zs, _) in sets.items()}
    arrays |= {f"{name}_labels": y.numpy() for name, (_, y) in sets.items()}
    return result, arrays


def gold_of(labels) -> np.ndarray:
    """The gold classes (a tagging set's: of its scored words)."""
    from rbert.inference.sweep import TagTargets

    if isinstance(labels, TagTargets):
        return labels.labels[labels.words].numpy()
    return labels.numpy()


def sentence_stats(task, logits, targets) -> np.ndarray:
    """Per dev sentence, the counts its metric sums: ``(correct words, words)`` for accuracy, or
    ``(entities right, predicted, gold)`` for entity F1 (seqeval's entities, CoNLL mode)."""
    from seqeval.metrics.sequence_labeling import get_entities

    from rbert.metrics import EntityF1, predictions

    collect = EntityF1(task, sync_on_compute=False)
    collect.update(predictions(logits, task, targets.labels), targets.labels, targets.sentence, targets.window)
    preds, gold = collect.sequences()
    if task.monitor == "accuracy":
        return np.array([[sum(p == g for p, g in zip(ps, gs)), len(gs)] for ps, gs in zip(preds, gold)])
    rows = []
    for ps, gs in zip(preds, gold):
        p, g = set(get_entities(ps)), set(get_entities(gs))
        rows.append([len(p & g), len(p), len(g)])
    return np.array(rows)


def majority(labels: np.ndarray, num_labels: int) -> float | None:
    """The metric of always answering the most frequent class (accuracy tasks), for the chance flag."""
    if num_labels < 2:
        return None
    return float(np.bincount(labels.astype(int)).max() / len(labels))


# ---------------------------------------------------------------------------- run: train + evaluate what is missing
def run(args) -> None:
    plan, record = PLANS[args.plan], RunRecord(RESULTS / f"{args.plan}.jsonl")
    only = set(args.only.split(",")) if args.only else None
    for name, overrides in plan.configs.items():
        if only is not None and name not in only:
            continue
        for seed in args.seeds or plan.seeds.get(name, [42]):
            full = [*plan.common, *overrides, f"seed={seed}"]
            key = job_key(f"{name}-s{seed}", full)  # of the template: stable across sessions
            if key in record.done():
                print(f"{key}: recorded, skipped")
                continue
            plains = [e for e in record.entries() if e["name"] == "plain"]
            floor = next((e for e in plains if e["seed"] == seed), plains[0] if plains else None)
            if any(PLAIN_CKPT in o for o in full):
                plain_run = next((e for e in plains if e["seed"] == seed and Path(e["checkpoint"]).is_file()), None)
                if plain_run is None:
                    print(f"{key}: skipped, it needs the checkpoint of plain seed {seed} (run it in this session)")
                    continue
                full = [o.replace(PLAIN_CKPT, plain_run["checkpoint"]) for o in full]
            run_dir = REPO / "logs" / "frontier" / args.plan / key
            print(f"{key}: training ({' '.join(full)}) in {run_dir}", flush=True)
            start = time.time()
            if not (run_dir / "results.json").is_file():  # results.json: run.py finished
                train(full, run_dir)
            ckpt = checkpoint(run_dir)
            print(f"{key}: evaluating {ckpt}", flush=True)
            result, arrays = evaluate_job(ckpt, floor and floor["per_exit"]["select"][-1], plan.max_drop,
                                          args.samples, args.batches, args.repeats)
            arrays_file = RESULTS / args.plan / f"{key}.npz"
            arrays_file.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(arrays_file, **arrays)
            record.add({"key": key, "name": name, "seed": seed, "overrides": full, "run_dir": str(run_dir),
                        "checkpoint": str(ckpt), "arrays": str(arrays_file.relative_to(RESULTS)),
                        "floor_from": floor and floor["key"], "wall_minutes": (time.time() - start) / 60,
                        "date": date.today().isoformat(), "machine": machine(), **result})
            print(f"{key}: recorded ({(time.time() - start) / 60:.1f} min)", flush=True)
            if args.reload:  # the next job from the plan as the file now has it (edited meanwhile)
                os.execv(sys.executable, [sys.executable, *sys.argv])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="train and evaluate the plan's missing jobs")
    go.add_argument("--plan", default="sst2", choices=sorted(PLANS))
    go.add_argument("--only", help="comma-separated configuration names")
    go.add_argument("--seeds", type=int, nargs="*")
    go.add_argument("--samples", type=int, default=200, help="dev sentences timed at bs=1")
    go.add_argument("--batches", type=int, default=8, help="dev batches of 32 timed")
    go.add_argument("--repeats", type=int, default=3)
    go.add_argument("--reload", action="store_true", help="re-read this file's plan after each job")
    rep = sub.add_parser("report", help="the plane, from the record")
    rep.add_argument("--plan", default="sst2", choices=sorted(PLANS))
    rep.add_argument("--png", type=Path, help="default: docs/img/frontier_<plan>.png")
    rep.add_argument("--logger", choices=("none", "wandb"), default="none",
                     help="wandb: also log the plot and the table to Weights & Biases (as run.py logger=wandb)")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        from bench.frontier_report import report

        report(args.plan, RunRecord(RESULTS / f"{args.plan}.jsonl").entries(), PLANS[args.plan],
               args.png or REPO / "docs" / "img" / f"frontier_{args.plan}.png", args.logger == "wandb")


if __name__ == "__main__":
    main()
