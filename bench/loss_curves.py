"""Validation MLM loss of pre-training runs against steps and against training time, in one PNG.

Reads each run folder's CSV log (``csv/metrics.csv``: ``val/loss`` and ``time/train_seconds``,
logged together at every validation), plots both views side by side, prints a table of
the points and writes them as JSON.

    python bench/loss_curves.py docs/img/pretrain_small.png small=logs/pretrain_small --metric val/loss
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rbert.report import format_table, write_json  # noqa: E402


def read_curve(run_dir: Path, metric: str) -> list[dict]:
    """(step, train seconds, metric) at every validation of a run."""
    points = []
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get(metric) and row.get("time/train_seconds"):
                points.append({"step": int(row["step"]) + 1, "minutes": float(row["time/train_seconds"]) / 60,
                               metric: float(row[metric])})
    if not points:
        raise SystemExit(f"{run_dir}: no {metric} logged beside time/train_seconds")
    return points


def plot(curves: dict[str, list[dict]], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for label, points in curves.items():
        for ax, x in zip(axes, ("step", "minutes")):
            ax.plot([p[x] for p in points], [p[metric] for p in points], marker="o", markersize=3, label=label)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training time (minutes, validation excluded)")
    axes[0].set_ylabel(metric)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("png", type=Path)
    parser.add_argument("runs", nargs="+", help="label=run_folder")
    parser.add_argument("--metric", default="val/loss")
    args = parser.parse_args()
    curves = {}
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        curves[label or Path(folder).name] = read_curve(Path(folder), args.metric)
    plot(curves, args.metric, args.png)
    for label, points in curves.items():
        print(f"\n{label}\n{format_table(points, floatfmt='{:.3f}')}")
    write_json(args.png.with_suffix(".json"), curves)
    print(f"\nwritten {args.png} and {args.png.with_suffix('.json')}")


if __name__ == "__main__":
    main()
