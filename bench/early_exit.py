"""Early-exit speed/accuracy of trained multi-exit checkpoints, several policies, one table.

Runs ``python run.py mode=eval`` for each (checkpoint, policy) pair, then reports for each:
the best layer-count speed-up within ``--max-drop`` points of the final exit's metric, the
measured wall-clock speed-ups at that point, how close bs=1 wall-clock comes to the layer
count over all sweep points (measured / layer speed-up), and whether the batched engine beats
a full forward pass wherever the mean exit layer is below 0.7 L. Curves go on one plot.

    python bench/early_exit.py --runs romebert=logs/compare_exits/romebert-mean_s42 \\
        deebert=logs/compare_exits/deebert-mean_s42 pabee=logs/compare_exits/pabee-mean_s42 \\
        --policies romebert:entropy,confidence,patience deebert:entropy pabee:patience,entropy
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.runs import checkpoint  # noqa: E402
from rbert.inference.plot import plot_curves  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="name=run_dir (a run.py training folder)")
    parser.add_argument("--policies", nargs="+", required=True, help="name:policy,policy,...")
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--reference", type=float, default=None,
                        help="metric in %% to stay within --max-drop of (e.g. the best final exit of any "
                             "method on the same budget); default: each model's own final exit")
    parser.add_argument("--timing-samples", type=int, default=200)
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the batched timing")
    parser.add_argument("--out-dir", default="logs/early_exit")
    parser.add_argument("--out", default="bench/results/early_exit.json")
    parser.add_argument("overrides", nargs="*", help="extra run.py overrides (eval.device=cuda eval.amp=bf16 ...)")
    args = parser.parse_args()
    runs = dict(r.split("=", 1) for r in args.runs)
    policies = {k: v.split(",") for k, v in (p.split(":", 1) for p in args.policies)}

    rows, curves, summaries = [], {}, []
    for name, run_dir in runs.items():
        for policy in policies.get(name, ["entropy"]):
            out = Path(args.out_dir) / f"{name}-{policy}"
            cmd = [sys.executable, "run.py", "mode=eval", f"ckpt_path={checkpoint(Path(run_dir))}",
                   f"exit_policy={policy}", f"data_dir={args.data_dir}", f"hydra.run.dir={out}",
                   f"eval.timing_samples={args.timing_samples}", f"eval.timing_repeats={args.timing_repeats}",
                   f"data.eval_batch_size={args.batch_size}",
                   f"eval.label={name} / {policy}", "logger=none",
                   *args.overrides]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
            summary = json.loads((REPO / out / "eval.json").read_text())
            summaries.append({"command": " ".join(cmd[1:]), **summary})
            sweep, metric = summary["sweep"], summary["metric"]
            curves[summary["label"]] = ([r["layer_speedup"] for r in sweep], [r[metric] for r in sweep])
            if args.reference is None:
                within = [r for r in sweep if r["drop"] <= args.max_drop]
            else:
                within = [r for r in sweep if 100 * r[metric] >= args.reference - args.max_drop - 1e-9]
            if not within:
                print(f"{summary['label']}: no sweep point within {args.max_drop} of {args.reference}", flush=True)
                continue
            best = max(within, key=lambda r: r["layer_speedup"])
            num_layers = len(summary["forced"])
            shallow = [r for r in sweep if r["mean_exit_layer"] < 0.7 * num_layers]
            rows.append({
                "model / policy": summary["label"],
                f"final {metric}": 100 * (best[metric] + best["drop"] / 100),
                "threshold": best["threshold"],
                f"{metric} at best": 100 * best[metric],
                "layer speed-up": best["layer_speedup"],
                "bs1 layer (timed samples)": best["layer_speedup_bs1_samples"],
                "bs1 measured": best["measured_speedup_bs1"],
                "batched measured": best["measured_speedup_batched"],
                "bs1/layer at best": best["measured_speedup_bs1"] / best["layer_speedup_bs1_samples"],
                "min bs1/layer": min(r["measured_speedup_bs1"] / r["layer_speedup_bs1_samples"] for r in sweep),
                "batched>1 when <0.7L": all(r["measured_speedup_batched"] > 1 for r in shallow) if shallow else "n/a",
            })
    against = "the final exit" if args.reference is None else f"{args.reference:.2f} (--reference)"
    print(f"\nbest speed-up within {args.max_drop} point(s) of {against}; wall-clock vs a full forward pass")
    print(format_table(rows, floatfmt="{:.2f}"))
    plot_curves(curves, Path(args.out).with_suffix(".png"), metric="dev accuracy")
    write_json(args.out, {"date": date.today().isoformat(), "max_drop": args.max_drop,
                          "reference": args.reference, "table": rows,
                          "evals": summaries})


if __name__ == "__main__":
    main()
