"""``mode=train``: fine-tune on a task: fit every stage, test the best checkpoint, report.

A multi-exit model's report ends with what early exit buys on the dev set
(``eval.after_train``): the budget policy's threshold for at most ``eval.max_drop`` points
of metric, and the layer-count and measured speed-ups there (:mod:`rbert.inference.report`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from rbert.build import build_task, make_trainer, model_choice, stored_stage
from rbert.fit import best_checkpoint, fit, resume_checkpoint, setup_run
from rbert.report import metrics_table, write_json
from rbert.tracking import log_summary

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (``cfg.train``) and test (``cfg.test``); return the test metrics and the best
    validation value of the monitored metric (what sweepers optimise, ``objective``)."""
    ckpt_path = resume_checkpoint(cfg)
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
    results.update(validation_score(trainer, system, datamodule, best))
    early_exit = None
    if cfg.eval.after_train and cfg.test and trainer.is_global_zero:
        from rbert.inference.report import after_training

        early_exit = after_training(cfg, system, datamodule, loggers)  # on the tested weights
    if trainer.is_global_zero:
        report(cfg, task, results, ckpt_path, best, early_exit)
        log_summary(loggers, results)
    return results


def validation_score(trainer, system, datamodule, best) -> dict[str, float]:
    """The monitored validation metric of the tested weights: the best checkpoint's score, or
    (a stage that keeps its last weights, e.g. DeeBERT's second) a validation of the weights in hand."""
    key = system.task.monitor_key
    if best is not None and best.monitor == key and best.best_model_score is not None:
        return {key: float(best.best_model_score)}
    scores = trainer.validate(system, datamodule=datamodule, verbose=False)
    return {key: float(scores[0][key])} if scores and key in scores[0] else {}


def report(cfg: DictConfig, task, results: dict[str, float], ckpt_path: str | None, best,
           early_exit: dict | None = None) -> None:
    """Print the result table and write ``results.json`` in the run folder."""
    header = f"task={task.name} model={model_choice(cfg)} backbone={cfg.backbone} seed={cfg.seed}"
    if "test" not in task.splits:
        header += "  (test = dev set(s): no labelled test split)"
    tested = {k: v for k, v in results.items() if not k.startswith("val")}
    print(f"\n{header}\n{metrics_table(tested)}\n")
    summary = {"task": task.name, "backbone": cfg.backbone, "seed": cfg.seed, "test": tested,
               "checkpoint": ckpt_path, "objective": {cfg.objective: results.get(cfg.objective)}}
    if best is not None and best.best_model_score is not None:
        summary["best_val"] = {best.monitor: float(best.best_model_score)}
    if early_exit is not None:
        from rbert.inference.report import after_training_table

        print(f"{after_training_table(early_exit)}\n")
        summary["early_exit"] = early_exit
    out = Path(cfg.paths.output_dir)
    write_json(out / "results.json", summary)
    log.info("results written to %s", out / "results.json")
