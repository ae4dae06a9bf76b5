"""Validation MLM loss of pre-training runs against steps and against training time, in one PNG.

Reads each run folder's CSV log (``csv/metrics.csv``: ``val/loss``, ``time/step`` and
``time/train_seconds``, logged together at every validation), plots both views side by side,
prints a table of the points and writes them as JSON. With ``--target``, it also prints when
each run first reaches that loss (interpolated between validations), and its time as a ratio
of the first run's; with ``--each``, the same for every validation loss of the first run (from
step ``--from-step`` on), so a lead that closes by the end shows where it was.

    python bench/loss_curves.py docs/img/pretrain_small.png small=logs/pretrain_small --metric val/loss
    python bench/loss_curves.py docs/img/core_small.png --target \
        scratch=logs/core/scratch-lr1e-3 core=logs/core/core-lr1e-3
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
                # time/step counts over all stages (CoRe's phases); Lightning's step restarts per stage.
                step = float(row["time/step"]) if row.get("time/step") else int(row["step"]) + 1
                points.append({"step": int(step), "minutes": float(row["time/train_seconds"]) / 60,
                               metric: float(row[metric])})
    if not points:
        raise SystemExit(f"{run_dir}: no {metric} logged beside time/train_seconds")
    return points


def time_to(points: list[dict], metric: str, target: float) -> tuple[float, float] | None:
    """(step, minutes) at which the curve first reaches ``target`` (linear between validations)."""
    previous = {"step": 0, "minutes": 0.0, metric: float("inf")}
    for p in points:
        if p[metric] <= target:
            if previous[metric] == float("inf"):
                return p["step"], p["minutes"]
            f = (previous[metric] - target) / (previous[metric] - p[metric])
            return (previous["step"] + f * (p["step"] - previous["step"]),
                    previous["minutes"] + f * (p["minutes"] - previous["minutes"]))
        previous = p
    return None


def plot(curves: dict[str, list[dict]], metric: str, out: Path, target: float | None = None) -> None:
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
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1)
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
    parser.add_argument("--target", action="store_true",
                        help="time for each run to reach the first run's final value (lower is better)")
    parser.add_argument("--each", action="store_true",
                        help="with --target: also the time ratio to each of the first run's validation values")
    parser.add_argument("--from-step", type=int, default=0, help="--each: from this step of the first run on")
    args = parser.parse_args()
    curves = {}
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        curves[label or Path(folder).name] = read_curve(Path(folder), args.metric)
    first = next(iter(curves.values()))
    target = first[-1][args.metric] if args.target else None
    plot(curves, args.metric, args.png, target)
    for label, points in curves.items():
        print(f"\n{label}\n{format_table(points, floatfmt='{:.3f}')}")
    result = {"curves": curves}
    if target is not None:
        rows = []
        for label, points in curves.items():
            reached = time_to(points, args.metric, target)
            rows.append({"run": label, "final": points[-1][args.metric], "reaches_at_step": reached and reached[0],
                         "minutes": reached and reached[1],
                         "time_ratio": reached and reached[1] / time_to(first, args.metric, target)[1]})
        print(f"\ntime to reach {args.metric} = {target:.4f} (the first run's final value)\n"
              + format_table(rows, floatfmt="{:.3f}"))
        result.update(target=target, time_to_target=rows)
    if target is not None and args.each:
        rows = []
        for point in (p for p in first if p["step"] >= args.from_step):
            row = {"first run's step": point["step"], args.metric: point[args.metric]}
            for label, points in list(curves.items())[1:]:
                reached = time_to(points, args.metric, point[args.metric])
                row[f"{label}: time ratio"] = reached and reached[1] / point["minutes"]
            rows.append(row)
        print(f"\ntime to each of the first run's {args.metric} values, as a ratio of its time\n"
              + format_table(rows, floatfmt="{:.3f}"))
        result.update(time_to_each=rows)
    write_json(args.png.with_suffix(".json"), result)
    print(f"\nwritten {args.png} and {args.png.with_suffix('.json')}")


if __name__ == "__main__":
    main()
