"""Metric vs speed-up curves (PNG), for one run or several.

    python -m rbert.inference.plot out.png logs/.../eval.json logs/.../eval.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(curves: dict[str, tuple[list[float], list[float]]], path: str | Path, metric: str,
                xlabel: str = "speed-up (layers: L / mean exit layer)") -> None:
    """One line per curve: ``{label: (speedups, metric values)}``."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, (x, y) in curves.items():
        order = sorted(range(len(x)), key=lambda i: x[i])
        ax.plot([x[i] for i in order], [y[i] for i in order], marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m rbert.inference.plot OUT.png EVAL.json [EVAL.json ...]")
    curves, metric = {}, "metric"
    for file in argv[1:]:
        summary = json.loads(Path(file).read_text())
        metric = f"{summary['task']} dev {summary['metric']}"
        rows = summary["sweep"]
        curves[summary["label"]] = ([r["layer_speedup"] for r in rows], [r[summary["metric"]] for r in rows])
    plot_curves(curves, argv[0], metric)


if __name__ == "__main__":
    main(sys.argv[1:])
