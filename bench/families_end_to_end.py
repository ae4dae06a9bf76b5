"""Every backbone family end to end through ``run.py``: multi-exit training, then early exit.

No pretrained RoBERTa, DistilBERT, ALBERT or ELECTRA weights exist offline, so each family is
a tiny random checkpoint made with ``transformers``' own classes (``tests/backbone_files.py``),
saved as a user's folder would be. For each: ``python run.py task=sst2 model=<objective>
backbone=<folder>`` on a slice of SST-2, whose report ends with the early-exit table at the
budget-chosen threshold; then ``mode=export`` (``exit_policy=budget``) and the onnxruntime
runtime on the whole dev set. The script collects each run's per-exit dev accuracy, that
table, and the exported model's accuracy and mean exit layer.
The accuracies of random tiny models say nothing about the families; the point is that the
whole path runs on each.

    python bench/families_end_to_end.py --glue ../shared/data/glue --out logs/families
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.deploy_speed import dev_set  # noqa: E402
from rbert.deploy import OnnxEarlyExitModel  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402
from tests.backbone_files import FAMILIES, write_family  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue", type=Path, default=Path("../shared/data/glue"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--model", default="romebert")
    parser.add_argument("--rows", type=int, default=2000, help="SST-2 training rows")
    parser.add_argument("--out", type=Path, default=Path("logs/families"))
    args = parser.parse_args()
    rows = []
    for family in args.families:
        folder = write_family(args.out / "checkpoints", family)
        run_dir = args.out / f"{args.model}_{family}"
        cmd = [sys.executable, "run.py", "task=sst2", f"model={args.model}", f"backbone={folder.resolve()}",
               f"data_dir={args.glue.resolve()}", f"data.train_limit={args.rows}", "model.optimizer.lr=1e-3",
               "logger=csv", f"hydra.run.dir={run_dir.resolve()}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{family}: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        result = json.loads((run_dir / "results.json").read_text())
        exits = {k.split("/")[1]: round(100 * v, 1) for k, v in result["test"].items() if k.endswith("/accuracy")}
        early = result.get("early_exit") or {}
        rows.append({"family": family, **exits, "policy": early.get("policy"),
                     "early-exit acc.": round(100 * early["early_exit"], 1) if "early_exit" in early else None,
                     "mean exit layer": early.get("mean_exit_layer"), "layer speed-up": early.get("layer_speedup"),
                     "bs=1 measured": early.get("measured_speedup_bs1"),
                     "batched measured": early.get("measured_speedup_batched")})
        # The deploy path: mode=export (ONNX graphs), then the onnxruntime runtime on the dev set.
        export = run_dir / "export"
        best = (run_dir / "checkpoints" / "best.ckpt").resolve()
        cmd = [sys.executable, "run.py", "mode=export", f"ckpt_path={best}", f"export_dir={export.resolve()}",
               f"data_dir={args.glue.resolve()}", "exit_policy=budget",
               f"hydra.run.dir={(run_dir / 'export_run').resolve()}"]
        if not export.is_dir():
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{family}: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        texts, labels = dev_set(args.glue)
        deployed = OnnxEarlyExitModel.from_pretrained(export)
        answers = deployed.predict(texts)
        correct = sum(a["label"] == y for a, y in zip(answers, labels))
        rows[-1].update({"onnx policy": deployed.policy.describe(), "onnx acc.": round(100 * correct / len(labels), 1),
                         "onnx mean exit": round(sum(a["exit_layer"] for a in answers) / len(answers), 2)})
        print(rows[-1], flush=True)
    print(f"model={args.model}, SST-2 {args.rows} rows, 1 epoch, lr 1e-3; dev accuracy (%) per exit")
    print(format_table(rows))
    write_json(args.out / "families.json", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()
