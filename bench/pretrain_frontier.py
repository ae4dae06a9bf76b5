"""Pre-training recipes at a fixed wall-clock budget: how far below the unigram floor each gets.

Each named recipe is a list of ``run.py --config-name pretrain`` overrides. The script first
times a short probe of each (``--probe-steps``, after a warm-up) to turn the budget in minutes
into a step count (the LR schedule needs one), then runs the recipes one after the other,
each alone on the machine, and tabulates, from every run's CSV log, the last validation's
loss, floor, loss below the floor, context gain and masked accuracy, beside tokens/s.
Writes ``frontier.json`` and ``frontier.png`` (below-floor loss, context gain and accuracy vs
minutes and vs tokens).

    python bench/pretrain_frontier.py --minutes 8 --out logs/frontier --recipes 2x128 4x128 4x256
    python bench/pretrain_frontier.py --minutes 8 --out logs/frontier --recipes 2x128 --reuse   # tabulate only
    python bench/pretrain_frontier.py --run logs/pretrain_long --png docs/img/pretrain_long.png  # one run's curves
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rbert.report import format_table, write_json  # noqa: E402

TEXT = REPO.parent / "shared" / "data" / "text"


def shape(layers: int, hidden: int) -> list[str]:
    heads = max(2, hidden // 64)
    return [f"arch.num_hidden_layers={layers}", f"arch.hidden_size={hidden}", f"arch.num_attention_heads={heads}",
            f"arch.intermediate_size={4 * hidden}"]


# The base recipe: own 8k vocabulary, no dropout (a short budget underfits), batch 64 x 128.
BASE = ["tokenizer=train", "vocab.size=8192", "+arch.hidden_dropout_prob=0", "+arch.attention_probs_dropout_prob=0",
        "data.batch_size=64", "model.optimizer.lr=2e-3", "data.files={train: train.txt, val: valid.txt}"]
RECIPES: dict[str, list[str]] = {
    "2x128": [*BASE, *shape(2, 128)],
    "4x128": [*BASE, *shape(4, 128)],
    "4x256": [*BASE, *shape(4, 256)],
    "2x256": [*BASE, *shape(2, 256)],
    "6x192": [*BASE, *shape(6, 192)],
    "2x128-lr1e-3": [*BASE, *shape(2, 128), "model.optimizer.lr=1e-3"],
    "2x128-lr4e-3": [*BASE, *shape(2, 128), "model.optimizer.lr=4e-3"],
    "2x128-mask30": [*BASE, *shape(2, 128), "data.mlm_probability=0.3"],
    "2x128-bs32": [*BASE, *shape(2, 128), "data.batch_size=32"],
    "2x128-bs128": [*BASE, *shape(2, 128), "data.batch_size=128"],
    "2x128-vocab30k": [*BASE, *shape(2, 128), "tokenizer=minilm"],
    "2x128-vocab4k": [*BASE, *shape(2, 128), "vocab.size=4096"],
    "2x128-noclip": [*BASE, *shape(2, 128), "trainer.gradient_clip_val=null"],
}
FIELDS = ("loss", "floor", "below_floor", "context_gain", "accuracy")


def run(run_dir: Path, overrides: list[str], text_dir: Path, timeout: float | None = None) -> None:
    cmd = [sys.executable, "run.py", "--config-name", "pretrain", f"data_dir={text_dir}", *overrides,
           f"hydra.run.dir={run_dir}"]
    with open(run_dir.with_suffix(".out"), "w") as log:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=timeout,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})


def seconds_per_step(out: Path, name: str, overrides: list[str], text_dir: Path, steps: int) -> float:
    """Training seconds a step, from a probe run (its first validation excluded)."""
    probe = out / f"{name}.probe"
    run(probe, [*overrides, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                "export_dir=null", "callbacks=none", "logger=none"], text_dir)
    result = json.loads((probe / "results.json").read_text())
    return result["train_seconds"] / result["steps"]


def tokens_per_step(run_dir: Path) -> int:
    """Batch size x block length, from the run's stored config."""
    from omegaconf import OmegaConf

    data = OmegaConf.load(run_dir / ".hydra" / "config.yaml").data
    return int(data.batch_size) * int(data.max_seq_len)


def curve(run_dir: Path) -> list[dict]:
    """(step, tokens, minutes, FIELDS) at every validation of a run."""
    points, per_step = [], tokens_per_step(run_dir)
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("val/loss") and row.get("time/train_seconds"):
                step = int(float(row.get("time/step") or row["step"]))
                point = {"step": step, "tokens_M": step * per_step / 1e6,
                         "minutes": float(row["time/train_seconds"]) / 60}
                point.update({k: float(row[f"val/{k}"]) for k in FIELDS if row.get(f"val/{k}")})
                points.append(point)
    return points


def plot(path: Path, curves: dict[str, list[dict]]) -> None:
    """Loss below the floor, context gain and masked accuracy against minutes (top) and tokens (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for name, points in curves.items():
        for row, x in zip(axes, ("minutes", "tokens_M")):
            for ax, key in zip(row, ("below_floor", "context_gain", "accuracy")):
                ax.plot([p[x] for p in points], [p.get(key) for p in points], marker=".", label=name)
    for row, x in zip(axes, ("training minutes", "training tokens (millions)")):
        for ax, title in zip(row, ("loss below the unigram floor (nats)", "context gain (nats)", "masked accuracy")):
            ax.set_xlabel(x)
            ax.set_title(title)
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["2x128", "4x128", "4x256"], choices=sorted(RECIPES))
    parser.add_argument("--minutes", type=float, default=8.0, help="training minutes per recipe")
    parser.add_argument("--validations", type=int, default=10, help="validations per run (the curve's points)")
    parser.add_argument("--probe-steps", type=int, default=30)
    parser.add_argument("--text-dir", type=Path, default=TEXT)
    parser.add_argument("--out", type=Path, default=REPO / "logs" / "frontier")
    parser.add_argument("--reuse", action="store_true", help="tabulate runs already in --out")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every recipe")
    parser.add_argument("--run", type=Path, default=None, help="only tabulate and plot this finished run folder")
    parser.add_argument("--png", type=Path, default=None, help="where the plot goes (default: --out/frontier.png)")
    args = parser.parse_args()
    if args.run is not None:  # one run (e.g. the long one): its table and curves
        points = curve(args.run)
        print(format_table([{k: round(v, 3) if isinstance(v, float) else v for k, v in p.items()} for p in points]))
        write_json(args.run / "curve.json", {"run": str(args.run), "curve": points})
        plot(args.png or args.run / "curve.png", {args.run.name: points})
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for name in args.recipes:
        overrides = [*RECIPES[name], *args.extra]
        run_dir = args.out / name
        if not args.reuse:
            per_step = seconds_per_step(args.out, name, overrides, args.text_dir, args.probe_steps)
            steps = max(args.validations, int(args.minutes * 60 / per_step))
            print(f"{name}: {per_step:.3f} s/step -> {steps} steps in {args.minutes} min", flush=True)
            started = time.time()
            run(run_dir, [*overrides, f"trainer.max_steps={steps}",
                          f"trainer.val_check_interval={max(1, steps // args.validations)}", "export_dir=null"],
                args.text_dir)
            print(f"{name}: done in {(time.time() - started) / 60:.1f} min", flush=True)
        points = curve(run_dir)
        curves[name] = points
        cfg = json.loads((run_dir / "results.json").read_text())
        tokens = cfg["steps"] * tokens_per_step(run_dir)
        rows.append({"recipe": name, "steps": cfg["steps"], "minutes": round(cfg["train_seconds"] / 60, 1),
                     "tokens_per_s": round(tokens / cfg["train_seconds"]), "tokens_M": round(tokens / 1e6, 1),
                     **{k: points[-1].get(k) for k in FIELDS}})
    print(format_table(rows))
    write_json(args.out / "frontier.json", {"minutes": args.minutes, "rows": rows, "curves": curves,
                                            "recipes": {n: RECIPES[n] + args.extra for n in args.recipes}})
    plot(args.png or args.out / "frontier.png", curves)
    print(f"wrote {args.out / 'frontier.json'} and {args.png or args.out / 'frontier.png'}")


if __name__ == "__main__":
    main()
