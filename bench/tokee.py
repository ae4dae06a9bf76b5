"""Token-level early exit (TOKEE) on the tagging frontier's checkpoints: tuned on token-layer
counts, then timed against the plain full-depth model.

For one multi-exit tagging checkpoint of ``bench/frontier.py``'s record (plan ``pos_ewt`` or
``ner_wnut17``, a configuration and a seed):

1. every (window, threshold) of the grid runs the engine (:mod:`rbert.inference.tokee`) on
   the selection split: metric, token-layer speed-up (full token-layers / computed ones) and
   the ceiling that halted tokens' keys and values leave (1 / ((1 - f) + f / 6));
2. about five points are chosen on the selection split (token-layer speed-ups nearest 1.5x,
   2x, 3x, 4x, 5x, and the budget point: the largest speed-up within ``--max-drop`` points
   of the plain model's selection metric), run on dev and timed at bs=1 and batched, in
   turns with the plain full-depth model. Batches are **length-sorted** for every caller
   (the plain model too), so cutting padding is not counted as a speed-up;
3. with ``--onnx`` (the default), the same points on onnxruntime at bs=1: the exported
   folder's per-layer graphs (:mod:`rbert.deploy.onnx_runtime`) against the one full-depth
   graph of the same model, in turns.

    python bench/tokee.py --plan pos_ewt --config romebert --seed 42

Records go to ``bench/records/tokee_<plan>.jsonl`` (one entry per checkpoint).

    python bench/tokee.py --plan pos_ewt --report

prints the plane of the issue: every recorded TOKEE point beside the frontier record's plain
model, static depths and sentence-level (SENTEE) points, by measured batched speed-up, and
for each TOKEE point the best static or SENTEE metric at that speed-up or above (one seed,
``--seed``); then every configuration's points by selection target, averaged over the seeds
recorded. Every speed-up in it was measured in turns with the plain model *within its own run*.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.frontier import RESULTS  # noqa: E402
from bench.runs import RunRecord, machine  # noqa: E402

RECORDS = REPO / "bench" / "records"
WINDOWS = (0, 1, 2, 4)
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
TARGETS = (1.5, 2.0, 3.0, 4.0, 5.0)


def sorted_batches(loader, size: int, pad_id: int) -> list[dict]:
    """The loader's rows regrouped into batches of ``size`` rows of similar length (no padding waste)."""
    import torch

    from rbert.inference.words import IGNORE

    rows = []
    for b in loader:
        for i in range(len(b["input_ids"])):
            n = int(b["attention_mask"][i].sum())
            rows.append({k: v[i, :n] if v.ndim == 2 else v[i] for k, v in b.items()})
    rows.sort(key=lambda r: len(r["input_ids"]))
    pads = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE}
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        width = max(len(r["input_ids"]) for r in chunk)
        out.append({k: torch.stack([torch.nn.functional.pad(r[k], (0, width - len(r[k])), value=pads[k])
                                    for r in chunk]) if chunk[0][k].ndim else torch.stack([r[k] for r in chunk])
                    for k in chunk[0]})
    return out


def owner_of(batch: dict):
    """Each token's word (its first piece's column): first pieces are the labelled positions;
    every non-special token after one belongs to it."""
    import torch

    from rbert.inference.tokee import first_piece_owner
    from rbert.inference.words import IGNORE

    words = batch["labels"] != IGNORE
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1)
    cols = torch.arange(mask.shape[1])
    pieces = mask & (cols > 0) & (cols < (lengths - 1)[:, None])  # between [CLS] and [SEP]
    return first_piece_owner(words, pieces)


def run_engine(engine, batches, task) -> tuple[float, dict, float]:
    """(token-layer share computed, metric values, the ceiling counting finished sentences) of
    the engine over ``batches``."""
    import torch

    from rbert.inference.sweep import TagTargets, task_metric
    from rbert.inference.tokee import row_ceiling

    logits, targets, computed, full, kv = [], [], 0, 0, 0
    width = max(b["input_ids"].shape[1] for b in batches)
    for b in batches:
        out = engine(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), owner_of(b))
        pad = width - out.logits.shape[1]
        logits.append(torch.nn.functional.pad(out.logits, (0, 0, 0, pad)))
        targets.append((torch.nn.functional.pad(b["labels"], (0, pad), value=-100), b["sentence"], b["window"]))
        computed, full, kv = computed + out.token_layers, full + out.full_token_layers, kv + out.kv_token_layers
    labels = TagTargets(*(torch.cat([t[i] for t in targets]) for i in range(3)))
    return computed / full, task_metric(task, torch.cat(logits), labels), row_ceiling(computed, kv, full)


def evaluate(entry: dict, args) -> dict:
    import torch

    from rbert.build import build_datamodule
    from rbert.inference.checkpoint import load_task_system
    from rbert.inference.timing import time_in_turns
    from rbert.inference.tokee import TokenEarlyExit, ceiling
    from rbert.inference.token_policies import WindowEntropyExit
    from rbert.models import BertForTokenClassification, load_encoder

    system, train_cfg, trained = load_task_system(entry["checkpoint"])
    task, net, metric = system.task, system.net, system.task.monitor
    datamodule = build_datamodule(train_cfg, task, backbone=train_cfg.backbone)
    pad = datamodule.tokenizer.pad_token_id
    select = sorted_batches(datamodule.selection_loader(), 32, pad)
    dev = sorted_batches(datamodule.eval_loader(0), 32, pad)
    plains = [e for e in RunRecord(RESULTS / f"{args.plan}.jsonl").entries() if e["name"] == "plain"]
    floor = next((e for e in plains if e["seed"] == entry["seed"]), plains[0])["per_exit"]["select"][-1]
    grid = []
    with torch.inference_mode():
        for window in args.windows:
            for threshold in args.thresholds:
                share, metrics, _ = run_engine(TokenEarlyExit(net, WindowEntropyExit(threshold, window), trained),
                                               select, task)
                grid.append({"window": window, "threshold": threshold, "select_metric": metrics[metric],
                             "token_speedup": 1 / share, "ceiling": ceiling(1 - share)})
                print(f"window {window} threshold {threshold}: select {metric} {metrics[metric]:.4f}, "
                      f"token-layer speed-up {1 / share:.2f}x", flush=True)
    chosen: dict[tuple, list[str]] = {}
    for target in TARGETS:
        row = min(grid, key=lambda r: abs(r["token_speedup"] - target))
        chosen.setdefault((row["window"], row["threshold"]), []).append(f"{target}x")
    within = [r for r in grid if r["select_metric"] >= floor - args.max_drop / 100]
    if within:
        best = max(within, key=lambda r: r["token_speedup"])
        chosen.setdefault((best["window"], best["threshold"]), []).append("budget")

    reference = BertForTokenClassification(load_encoder(train_cfg.backbone, pretrained=False), task.num_labels).eval()
    single = [{k: v[i:i + 1, :int(b["attention_mask"][i].sum())] if v.ndim == 2 else v[i:i + 1]
               for k, v in b.items()} for b in dev for i in range(len(b["input_ids"]))]
    single = [single[int(i)] for i in np.linspace(0, len(single) - 1, min(args.samples, len(single)))]
    timed = [dev[int(i)] for i in np.linspace(0, len(dev) - 1, min(args.batches, len(dev)))]
    calls = {"plain": lambda x: reference(x["input_ids"], x["attention_mask"])}
    points = []
    with torch.inference_mode():
        for (window, threshold), targets in chosen.items():
            engine = TokenEarlyExit(net, WindowEntropyExit(threshold, window), trained)
            share, metrics, rows_bound = run_engine(engine, dev, task)
            name = f"w{window}-t{threshold}"
            calls[name] = (lambda e: lambda x: e(x["input_ids"], x["attention_mask"], None, owner_of(x)))(engine)
            row = next(r for r in grid if (r["window"], r["threshold"]) == (window, threshold))
            points.append({"call": name, "targets": targets, **row, "dev_metric": metrics[metric],
                           "dev_token_speedup": 1 / share, "dev_ceiling": ceiling(1 - share),
                           "dev_row_ceiling": rows_bound})

        def over(items, call):
            return lambda i: call(items[i])

        one = time_in_turns({k: over(single, c) for k, c in calls.items()}, len(single), args.repeats)
        many = time_in_turns({k: over(timed, c) for k, c in calls.items()}, len(timed), args.repeats)
    for point in points:
        name = point.pop("call")
        point.update(speedup_bs1=one["plain"] / one[name], speedup_batched=many["plain"] / many[name])
        point["batched_vs_ceiling"] = point["speedup_batched"] / point["dev_ceiling"]
    if getattr(args, "onnx", True):
        onnx_speedups = time_onnx(net, trained, task, datamodule.tokenizer, single,
                                  [(p["window"], p["threshold"]) for p in points], args.repeats)
        for point, speedup in zip(points, onnx_speedups):
            point["speedup_bs1_onnx"] = speedup
    return {"grid": grid, "points": points, "metric": metric, "floor_select": floor,
            "timing": f"bs=1 on {len(single)} dev sentences, batched on {len(timed)} length-sorted dev batches "
                      f"of 32, each item's best of {args.repeats}, in turns with the plain full-depth model"
                      + ("; onnxruntime at bs=1 against the full-depth graph" if getattr(args, "onnx", True) else "")}


def time_onnx(net, trained: list[int], task, tokenizer, single: list[dict], rules: list[tuple[int, float]],
              repeats: int) -> list[float]:
    """bs=1 speed-ups on onnxruntime of TOKEE with each (window, threshold) in ``rules`` over
    the full-depth graph of the same model (embeddings, every layer, the final exit)."""
    import tempfile

    import onnxruntime as ort

    from rbert.deploy import OnnxEarlyExitModel, save
    from rbert.deploy.folder import DeploySpec
    from rbert.deploy.onnx_export import export_full_depth
    from rbert.inference.timing import time_in_turns
    from rbert.inference.token_policies import WindowEntropyExit

    with tempfile.TemporaryDirectory() as tmp:
        labels = [str(t) for t in task.labels or range(task.num_labels)]
        spec = DeploySpec(task=task.name, text_fields=["words"], labels=labels,
                          max_length=512, exit_layers=list(net.exit_layers), trained_exits=trained,
                          consulted_exits=trained, style="token", pooling="none", policy={"name": "none"},
                          kind="tagging", scheme=getattr(task, "scheme", None))
        folder = save(Path(tmp) / "folder", net, tokenizer, spec)
        export_full_depth(net, Path(tmp) / "full.onnx")
        options = ort.SessionOptions()
        for key, value in OnnxEarlyExitModel.SESSION_CONFIG.items():
            options.add_session_config_entry(key, value)
        full = ort.InferenceSession(str(Path(tmp) / "full.onnx"), options)
        names = [i.name for i in full.get_inputs()]
        items = [{"input_ids": x["input_ids"].numpy(), "attention_mask": x["attention_mask"].numpy(),
                  "token_type_ids": np.zeros_like(x["input_ids"].numpy()), "owner": owner_of(x).numpy()}
                 for x in single]
        calls = {"plain": lambda i: full.run(None, {n: items[i][n] for n in names})}
        for window, threshold in rules:
            model = OnnxEarlyExitModel.from_pretrained(folder, policy=WindowEntropyExit(threshold, window))
            calls[f"w{window}-t{threshold}"] = (lambda m: lambda i: m.run(
                items[i]["input_ids"], items[i]["attention_mask"], None, owner=items[i]["owner"]))(model)
        seconds = time_in_turns(calls, len(items), repeats)
    return [seconds["plain"] / seconds[f"w{w}-t{t}"] for w, t in rules]


def plane(plan: str, seed: int = 42) -> tuple[list[dict], list[dict]]:
    """(rows of the plane, TOKEE against the others): see the module docstring."""
    rows = []
    for e in RunRecord(RESULTS / f"{plan}.jsonl").entries():
        if e["seed"] != seed:
            continue
        for p in e.get("points", []):
            static = e["name"] == "plain" or e["name"].startswith("static")
            rows.append({"kind": e["name"] if static else "SENTEE", "point": "" if static else
                         f"{e['name']} {p['policy']} {p['threshold']}", "dev": p["dev_metric"],
                         "layer_speedup": p["dev_layer_speedup"], "bs1": p["speedup_bs1"],
                         "batched": p["speedup_batched"]})
    for e in RunRecord(RECORDS / f"tokee_{plan}.jsonl").entries():
        if e["seed"] != seed:
            continue
        for p in e["points"]:
            rows.append({"kind": "TOKEE", "point": f"{e['config']} w{p['window']} t{p['threshold']}",
                         "dev": p["dev_metric"], "layer_speedup": p["dev_token_speedup"], "bs1": p["speedup_bs1"],
                         "batched": p["speedup_batched"], "bs1_onnx": p.get("speedup_bs1_onnx"),
                         "ceiling": p["dev_ceiling"], "row_ceiling": p.get("dev_row_ceiling")})
    rows.sort(key=lambda r: r["batched"])
    versus = []
    for r in (r for r in rows if r["kind"] == "TOKEE"):
        for kind in ("static", "SENTEE"):
            rivals = [o for o in rows if o["kind"].startswith(kind) and o["batched"] >= r["batched"]]
            best = max(rivals, key=lambda o: o["dev"], default=None)
            versus.append({"TOKEE": r["point"], "batched": r["batched"], "dev": r["dev"], "against": kind,
                           "best there": best and f"{best['kind']} {best['point']}".strip(),
                           "its dev": best and best["dev"], "TOKEE above": best is None or r["dev"] > best["dev"]})
    return rows, versus


def over_seeds(plan: str) -> list[dict]:
    """Each configuration's TOKEE points by selection target (``2.0x``, ``budget``, ...), averaged
    over the seeds that have them, against the plain model of the same seeds. A target's
    threshold is chosen on each seed's own selection split, so it may differ between seeds."""
    plain = {e["seed"]: e["per_exit"]["dev"][-1] for e in RunRecord(RESULTS / f"{plan}.jsonl").entries()
             if e["name"] == "plain"}
    found: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    for e in RunRecord(RECORDS / f"tokee_{plan}.jsonl").entries():
        for p in e["points"]:
            for target in p["targets"]:
                found.setdefault((e["config"], target), []).append((e["seed"], p))
    rows = []
    for (config, target), points in sorted(found.items()):
        dev = np.array([100 * p["dev_metric"] for _, p in points])
        drop = np.array([100 * (p["dev_metric"] - plain[seed]) for seed, p in points])
        rows.append({"config": config, "target": target, "seeds": ",".join(str(s) for s, _ in points),
                     "rules (window, threshold)": " ".join(f"{p['window']},{p['threshold']}" for _, p in points),
                     "dev": dev.mean(), "dev sd": dev.std(ddof=1) if len(dev) > 1 else None,
                     "vs plain": drop.mean(), "token-layer": np.mean([p["dev_token_speedup"] for _, p in points]),
                     "ceiling": np.mean([p["dev_ceiling"] for _, p in points]),
                     "bs=1": np.mean([p["speedup_bs1"] for _, p in points]),
                     "batched": np.mean([p["speedup_batched"] for _, p in points])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default="pos_ewt", choices=("pos_ewt", "ner_wnut17"))
    parser.add_argument("--config", default="romebert")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--windows", type=int, nargs="+", default=list(WINDOWS))
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--max-drop", type=float, default=0.3)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the onnxruntime timings")
    parser.add_argument("--report", action="store_true", help="print the plane of the recorded runs")
    args = parser.parse_args()
    from rbert.report import format_table

    if args.report:
        rows, versus = plane(args.plan, args.seed)
        print(f"{args.plan}, seed {args.seed}: dev metric and speed-ups over the plain model\n"
              f"{format_table(rows, floatfmt='{:.3f}')}\n\nTOKEE against the best static / SENTEE point at "
              f"its batched speed-up or above\n{format_table(versus, floatfmt='{:.3f}')}")
        print(f"\nTOKEE points by selection target, mean over the recorded seeds (metric x100; vs plain: "
              f"against the plain model of the same seeds)\n{format_table(over_seeds(args.plan), floatfmt='{:.2f}')}")
        return

    entry = next((e for e in RunRecord(RESULTS / f"{args.plan}.jsonl").entries()
                  if e["name"] == args.config and e["seed"] == args.seed), None)
    if entry is None:
        raise SystemExit(f"no {args.config} seed {args.seed} in the {args.plan} frontier record "
                         f"(python bench/frontier.py run --plan {args.plan} --only {args.config})")
    start = time.time()
    result = evaluate(entry, args)
    RunRecord(RECORDS / f"tokee_{args.plan}.jsonl").add({
        "key": f"{entry['key']}-tokee", "config": args.config, "seed": args.seed, "checkpoint": entry["checkpoint"],
        "date": date.today().isoformat(), "machine": machine(), "wall_minutes": (time.time() - start) / 60, **result})
    print(f"\nTOKEE on {args.plan} {args.config} seed {args.seed} ({result['timing']})\n"
          f"{format_table(result['points'], floatfmt='{:.3f}')}")


if __name__ == "__main__":
    main()
