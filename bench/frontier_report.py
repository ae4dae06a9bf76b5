"""The frontier plane from ``bench/frontier.py``'s record: tables, a plot, JSON (and W&B).

Everything here is computed from the record and the logits kept beside it, so a report can
be re-made in any later session without a checkpoint.

* Points: per configuration, the mean over its seeds (and the seed spread) of the dev
  metric and of the measured speed-ups over the plain full-depth model, bs=1 and batched.
* The static curve: the plain model (speed-up ~1) and static depth k, joined by straight
  lines; an early-exit curve is compared with it at every static model's measured speed-up
  (the early-exit curve interpolated there) and as a whole: the mean, over the curve's points
  inside the static curve's range, of its metric minus the static curve's at the same
  speed-up (ELUE's score, with measured speed-ups for FLOPs).
* The budget point of each curve (the largest speed-up within ``max_drop`` points of the
  plain model on the selection split, chosen there, reported on dev), with a paired
  bootstrap 95% interval of its dev metric minus the plain model's and minus the static
  model nearest in bs=1 speed-up (dev samples resampled; seeds paired where both have them).
* The learning-rate grid: per objective, its final exit at each lr on the selection split
  (where the lr is chosen: a paired bootstrap against the default there) and on dev (only
  reported), on the seeds the grid ran.
* A flag where a final exit is at chance level (the majority class's accuracy, or an MCC /
  correlation near 0): there a speed-up is meaningless, and no point of it is reported as one.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "bench" / "records" / "frontier"
BOOTSTRAP = 2000
MODES = ("bs1", "batched")


# ---------------------------------------------------------------------------- metrics on arrays
def metric_value(name: str, logits: np.ndarray, labels: np.ndarray | None) -> float:
    """The task metric on NumPy arrays (the bootstrap recomputes it thousands of times).

    ``labels`` None: ``logits`` are a tagging set's per-sentence counts (``bench/frontier.py``'s
    ``sentence_stats``): (correct words, words), or (entities right, predicted, gold).
    """
    if labels is None:
        totals = logits.sum(axis=0)
        if name == "accuracy":
            return float(totals[0] / max(totals[1], 1))
        return float(2 * totals[0] / max(totals[1] + totals[2], 1))
    if name in ("pearson", "spearman"):
        pred = logits[..., 0]
        if name == "spearman":
            pred, labels = rank(pred), rank(labels)
        return float(np.corrcoef(pred, labels)[0, 1])
    pred = logits.argmax(-1)
    if name == "accuracy":
        return float((pred == labels).mean())
    tp, fp = float(((pred == 1) & (labels == 1)).sum()), float(((pred == 1) & (labels == 0)).sum())
    fn, tn = float(((pred == 0) & (labels == 1)).sum()), float(((pred == 0) & (labels == 0)).sum())
    if name == "f1":
        return 2 * tp / max(2 * tp + fp + fn, 1.0)
    if name == "mcc":
        denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return float((tp * tn - fp * fn) / denom) if denom else 0.0
    raise ValueError(f"no NumPy form of metric {name!r}")


def rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    out = np.empty(len(x))
    out[order] = np.arange(len(x))
    return out


def at_chance(entry: dict) -> bool:
    """The final exit's dev metric is what a constant answer would score (within 2 points)."""
    final = entry["per_exit"]["dev"][-1]
    if entry["metric"] == "accuracy":
        return final <= entry["majority"]["dev"] + 0.02
    return abs(final) < 0.05  # MCC, F1 of a one-class answer, correlations


# ---------------------------------------------------------------------------- answers of a point
def answers(entry: dict, point: dict, split: str = "dev") -> tuple[np.ndarray, np.ndarray]:
    """The logits a point answers with on ``split`` and the labels (from the stored exit logits)."""
    import torch

    from rbert.inference.engine import simulate
    from rbert.inference.policies import ConfidenceExit, EntropyExit, PatienceExit

    arrays = np.load(RECORDS / Path(*Path(entry["arrays"]).parts[-2:]))  # <plan>/<key>.npz beside the record
    if "stats" in point:  # tagging: the point's per-sentence counts (labels None: see metric_value)
        return arrays[point["stats"]], None
    logits, labels = arrays[f"{split}_logits"], arrays[f"{split}_labels"]
    if point["policy"] == "none":
        return logits[-1], labels
    policy = {"entropy": EntropyExit, "confidence": ConfidenceExit, "patience": PatienceExit}[point["policy"]](
        point["threshold"])
    out = simulate(policy, [torch.from_numpy(z) for z in logits], entry["exit_layers"])
    return out.logits.numpy(), labels


def paired_bootstrap(metric: str, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], seed: int = 0) -> dict:
    """95% interval of metric(a) - metric(b) over dev resamples; ``pairs``: (a logits, b logits, labels)
    per seed, resampled with the same sample indices (the samples are the same dev rows)."""
    rng = np.random.default_rng(seed)
    n = len(pairs[0][0])
    diffs = []
    for _ in range(BOOTSTRAP):
        idx = rng.integers(0, n, n)
        diffs.append(np.mean([metric_value(metric, a[idx], None if y is None else y[idx])
                              - metric_value(metric, b[idx], None if y is None else y[idx]) for a, b, y in pairs]))
    observed = np.mean([metric_value(metric, a, y) - metric_value(metric, b, y) for a, b, y in pairs])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": 100 * float(observed), "low": 100 * float(lo), "high": 100 * float(hi)}


# ---------------------------------------------------------------------------- aggregation
def aggregate(entries: list[dict]) -> dict[str, list[dict]]:
    """Per configuration, its points averaged over seeds (one point per target label)."""
    by_name = defaultdict(list)
    for e in entries:
        by_name[e["name"]].append(e)
    out = {}
    for name, runs in by_name.items():
        labels = defaultdict(list)  # (policy, label) -> [(entry, point)]
        for e in runs:
            for p in e["points"]:
                for label in p["targets"]:
                    labels[(p["policy"], label)].append((e, p))
        points = []
        for (policy, label), found in labels.items():
            dev = np.array([p["dev_metric"] for _, p in found]) * 100
            points.append({"config": name, "policy": policy, "target": label, "seeds": len(found),
                           "thresholds": sorted({p["threshold"] for _, p in found}, key=str),
                           "dev": float(dev.mean()), "dev_sd": float(dev.std(ddof=1)) if len(dev) > 1 else None,
                           "select": 100 * float(np.mean([p["select_metric"] for _, p in found])),
                           "layer_speedup": float(np.mean([p["dev_layer_speedup"] for _, p in found])),
                           "bs1": float(np.mean([p["speedup_bs1"] for _, p in found])),
                           "batched": float(np.mean([p["speedup_batched"] for _, p in found])),
                           "chance": any(at_chance(e) for e, _ in found), "found": found})
        out[name] = points
    return out


def static_curve(agg: dict[str, list[dict]], mode: str) -> list[tuple[float, float, str]]:
    """(speed-up, dev metric, name) of the plain model and the static-depth models, by speed-up."""
    pts = [(p[mode], p["dev"], name) for name, ps in agg.items() for p in ps
           if name == "plain" or name.startswith("static-")]
    return sorted(pts)


def interpolate(curve: list[tuple[float, float]], x: float) -> float | None:
    """The piecewise-linear curve at ``x``; None outside its range."""
    xs, ys = [c[0] for c in curve], [c[1] for c in curve]
    if not xs or x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return None
    return float(np.interp(x, xs, ys))


def curves(agg: dict[str, list[dict]]) -> dict[tuple[str, str], list[dict]]:
    """Early-exit curves: (configuration, policy) -> its distinct points by bs=1 speed-up."""
    out = {}
    for name, ps in agg.items():
        for policy in sorted({p["policy"] for p in ps} - {"none"}):
            seen, pts = set(), []
            for p in sorted((p for p in ps if p["policy"] == policy), key=lambda p: p["bs1"]):
                key = tuple(p["thresholds"])
                if key not in seen:
                    seen.add(key)
                    pts.append(p)
            out[(name, policy)] = pts
    return out


def lr_variants(entries: list[dict]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(configuration -> its lr, "default" where not overridden; objective -> its ``-lr<value>``
    configurations)."""
    lr = {}
    for e in entries:
        given = [o.split("=", 1)[1] for o in e.get("overrides", []) if o.startswith("model.optimizer.lr=")]
        lr[e["name"]] = given[0] if given else "default"
    grids = defaultdict(list)
    for name, value in lr.items():
        if value != "default" and name.endswith(f"-lr{value}"):
            grids[name[: -len(f"-lr{value}")]].append(name)
    return lr, grids


def lr_grid(entries: list[dict], metric: str) -> list[dict]:
    """Each objective's final exit at every learning rate the plan tried (configurations named
    ``<objective>-lr<value>``; the objective's own name is its default lr), selection split and
    dev, on the seeds the grid ran, with a paired bootstrap of each lr against the default on
    the selection split. The lr chosen there: the default, unless another one is better with
    the whole 95% interval above 0 (then the best such), so that noise does not move a default."""
    lr, grids = lr_variants(entries)
    final = {"policy": "none"}
    rows = []
    for base, names in grids.items():
        seeds = {e["seed"] for e in entries if e["name"] in names}
        default = {e["seed"]: e for e in entries if e["name"] == base and e["seed"] in seeds}
        members = []
        for name in [base, *names]:
            runs = [e for e in entries if e["name"] == name and e["seed"] in seeds]
            if not runs:
                continue
            row = {"objective": base, "lr": lr[name], "seeds": len(runs),
                   "select, final exit": 100 * float(np.mean([e["per_exit"]["select"][-1] for e in runs])),
                   "dev, final exit": 100 * float(np.mean([e["per_exit"]["dev"][-1] for e in runs])),
                   "select vs default [95% CI]": ""}
            pairs = [(answers(e, final, "select")[0], *answers(default[e["seed"]], final, "select"))
                     for e in runs if e["seed"] in default]
            if name != base and pairs:
                ci = paired_bootstrap(metric, pairs)
                row["select vs default [95% CI]"] = f"{ci['diff']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}]"
                row["_low"] = ci["low"]
            members.append(row)
        better = [m for m in members if m.get("_low", 0) > 0]
        chosen = max(better, key=lambda m: m["select, final exit"]) if better else members[0]
        for m in members:
            m.pop("_low", None)
            m["chosen"] = "<-" if m is chosen else ""
        rows += members
    return rows


# ---------------------------------------------------------------------------- the report
def report(plan_name: str, entries: list[dict], plan, png: Path, wandb: bool = False) -> dict:
    from rbert.report import format_table, write_json

    if not entries:
        raise SystemExit(f"plan {plan_name}: nothing recorded yet (python bench/frontier.py run --plan {plan_name})")
    metric = entries[0]["metric"]
    agg = aggregate(entries)
    plain = agg.get("plain", [None])[0]
    rows = []
    for name, ps in agg.items():
        for p in sorted(ps, key=lambda p: p["bs1"]):
            rows.append({"configuration": name, "policy": p["policy"], "point": p["target"],
                         "threshold": ",".join(str(t) for t in p["thresholds"]), "seeds": p["seeds"],
                         f"dev {metric}": p["dev"], "seed sd": p["dev_sd"], f"select {metric}": p["select"],
                         "vs plain (points)": p["dev"] - plain["dev"] if plain else None,
                         "layer speed-up": p["layer_speedup"], "bs=1 speed-up": p["bs1"],
                         "batched speed-up": p["batched"], "chance": "AT CHANCE" if p["chance"] else ""})
    minutes = [{"configuration": name, "seeds": len({e["seed"] for e, _ in ps[0]["found"]}),
                "train minutes (mean)": float(np.mean([e["train_seconds"] for e, _ in ps[0]["found"]])) / 60}
               for name, ps in agg.items()]

    comparisons, gains_rows, budgets = [], [], []
    for mode in MODES:
        static = static_curve(agg, mode)
        for (name, policy), pts in curves(agg).items():
            curve = [(p[mode], p["dev"]) for p in pts]
            for x, y, n in static:
                if n == "plain":
                    continue
                ee = interpolate(curve, x)
                comparisons.append({"speed": mode, "configuration": name, "policy": policy, "static": n,
                                    "its speed-up": x, f"its {metric}": y, "early exit there": ee,
                                    "early exit - static": None if ee is None else ee - y})
            gains = [y - s for x, y in curve if (s := interpolate([(a, b) for a, b, _ in static], x)) is not None]
            gains_rows.append({"speed": mode, "configuration": name, "policy": policy,
                               "mean gain over static (ELUE)": float(np.mean(gains)) if gains else None,
                               "points inside the static range": len(gains), "points": len(curve)})
    for name, policy in curves(agg):
        budget = next((p for p in agg[name] if p["policy"] == policy and p["target"] == "budget"), None)
        if budget is None:
            continue
        row = {"configuration": name, "policy": policy, "threshold": ",".join(map(str, budget["thresholds"])),
               f"dev {metric}": budget["dev"], "seed sd": budget["dev_sd"], "bs=1": budget["bs1"],
               "batched": budget["batched"], "layer": budget["layer_speedup"]}
        for column, other in (("vs plain", "plain"), ("vs nearest static", nearest_static(agg, budget["bs1"]))):
            if other is None or other not in agg:
                continue
            ref = agg[other][0]
            pairs = [(answers(e, p)[0], *answers(r, rp)) for e, p in budget["found"]
                     for r, rp in ref["found"] if r["seed"] == e["seed"]] or \
                    [(answers(e, p)[0], *answers(*ref["found"][0])) for e, p in budget["found"][:1]]
            ci = paired_bootstrap(metric, pairs)
            label = "" if other == "plain" else f"{other}: "
            row[f"{column} [95% CI]"] = f"{label}{ci['diff']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}]"
        row["goal (>=2x bs=1, within 1 of plain)"] = bool(plain and not budget["chance"] and budget["bs1"] >= 2.0
                                                          and budget["dev"] >= plain["dev"] - 1.0)
        budgets.append(row)

    print(f"\nfrontier {plan_name}: {len(entries)} runs; dev {metric} (x100) and measured speed-ups over the plain "
          f"full-depth model ({entries[0]['timing']})\n{format_table(rows, floatfmt='{:.2f}')}")
    print(f"\ntraining minutes\n{format_table(minutes, floatfmt='{:.1f}')}")
    print(f"\nearly exit against static depth at each static model's measured speed-up (points of dev {metric}; "
          f"None: the early-exit curve does not reach that speed-up)\n{format_table(comparisons, floatfmt='{:.2f}')}")
    print(f"\nmean gain of each early-exit curve over the static curve, over its points inside the static "
          f"curve's speed-up range (ELUE's score, measured speed-ups)\n{format_table(gains_rows, floatfmt='{:+.2f}')}")
    grid = lr_grid(entries, metric)
    if grid:
        print(f"\nlearning-rate grid: final exit, {metric} x100 (the lr is chosen on the selection split; dev is "
              f"only reported)\n{format_table(grid, floatfmt='{:.2f}')}")
    print(f"\nbudget points (largest speed-up within {plan.max_drop} point(s) of the plain model on the selection "
          f"split), dev; paired bootstrap of the difference\n{format_table(budgets, floatfmt='{:.2f}')}")
    variants = {name for names in lr_variants(entries)[1].values() for name in names}
    plot({name: ps for name, ps in agg.items() if name not in variants}, metric, png, plan_name)  # in the grid's table
    result = {"plan": plan_name, "metric": metric, "points": rows, "minutes": minutes, "comparisons": comparisons,
              "gains": gains_rows, "budgets": budgets, "lr_grid": grid,
              "machines": sorted({e.get("machine", {}).get("cpu", "?") for e in entries}),
              "dates": sorted({e.get("date", "?") for e in entries})}
    out = png.with_suffix(".json")
    write_json(out, result)
    print(f"\nwritten {png} and {out}")
    if wandb:
        log_wandb(plan_name, png, rows)
    return result


def nearest_static(agg: dict, speedup: float) -> str | None:
    statics = [(abs(ps[0]["bs1"] - speedup), name) for name, ps in agg.items() if name.startswith("static-")]
    return min(statics)[1] if statics else None


def plot(agg: dict, metric: str, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, mode in zip(axes, MODES):
        static = static_curve(agg, mode)
        ax.plot([s[0] for s in static], [s[1] for s in static], "k-s", lw=2, label="plain + static depth")
        for x, y, n in static:
            ax.annotate(n.replace("static-", "k="), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        names = sorted({name for name, _ in curves(agg)})
        styles = {"entropy": "o-", "confidence": "s--", "patience": "^:"}
        for (name, policy), pts in curves(agg).items():  # a colour per configuration, a line per policy
            ax.plot([p[mode] for p in pts], [p["dev"] for p in pts], styles.get(policy, "o-"), ms=4,
                    color=f"C{names.index(name)}", label=f"{name} / {policy}")
        ax.set_xlabel(f"measured speed-up over the plain full-depth model ({'bs=1' if mode == 'bs1' else 'batched'})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"dev {metric} (x100)")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"frontier {title}: early exit vs the plain model and static depth (mean over seeds)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def log_wandb(plan_name: str, png: Path, rows: list[dict]) -> None:
    import wandb

    run = wandb.init(project="rbert", job_type="frontier", name=f"frontier-{plan_name}")
    columns = list(rows[0])
    run.log({"frontier/plot": wandb.Image(str(png)),
             "frontier/points": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})
    run.finish()
