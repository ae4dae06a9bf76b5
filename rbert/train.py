"""``mode=train``: fine-tune on a task: fit every stage, test the best checkpoint, report."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from rbert.build import build_task, check_checkpoint, make_trainer, model_choice, stored_stage
from rbert.fit import best_checkpoint, fit, setup_run
from rbert.report import metrics_table, write_json

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (``cfg.train``) and test (``cfg.test``); return the test metrics."""
    ckpt_path = check_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    task = build_task(cfg)
    system, datamodule, loggers = setup_run(cfg, task)
    if cfg.train:
        trainer, checkpoints = fit(cfg, system, datamodule, loggers, ckpt_path)
        best = best_checkpoint(checkpoints)
        # Test the (last stage's) best checkpoint when there is one, else the weights in hand.
        ckpt_path = (best.best_model_path or None) if best else None
    else:
        first = stored_stage(system, ckpt_path) if ckpt_path else 0  # also refuses a misfit or code
        trainer, checkpoints = make_trainer(cfg, system, loggers, first)
        best = best_checkpoint(checkpoints)
    results: dict[str, float] = {}
    if cfg.test:
        for per_loader in trainer.test(system, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False,
                                       weights_only=True):
            results.update({k: float(v) for k, v in per_loader.items()})
    if trainer.is_global_zero:
        report(cfg, task, results, ckpt_path, best)
    return results


def report(cfg: DictConfig, task, results: dict[str, float], ckpt_path: str | None, best) -> None:
    """Print the result table and write ``results.json`` in the run folder."""
    header = f"task={task.name} model={model_choice(cfg)} backbone={cfg.backbone} seed={cfg.seed}"
    if "test" not in task.splits:
        header += "  (test = dev set(s): GLUE test labels are hidden)"
    print(f"\n{header}\n{metrics_table(results)}\n")
    summary = {"task": task.name, "backbone": cfg.backbone, "seed": cfg.seed, "test": results,
               "checkpoint": ckpt_path}
    if best is not None and best.best_model_score is not None:
        summary["best_val"] = {best.monitor: float(best.best_model_score)}
    out = Path(cfg.paths.output_dir)
    write_json(out / "results.json", summary)
    log.info("results written to %s", out / "results.json")
