"""The pipeline behind ``run.py``: build everything from config, fit, test, report."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rbert.errors import ConfigError
from rbert.report import metrics_table, write_json

log = logging.getLogger(__name__)


def instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a dict-shaped group (``logger``, ``callbacks``)."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def check_checkpoint(path: str) -> str:
    """Fail early, in one line, on a checkpoint Lightning could not read."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"ckpt_path: {file} does not exist")
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive
        raise ConfigError(f"ckpt_path: {file} is not a readable PyTorch checkpoint")
    return str(file)


def stored_stage(ckpt_path: str) -> int:
    """The training stage a checkpoint was saved in (multi-stage objectives resume there)."""
    return torch.load(ckpt_path, map_location="cpu", weights_only=False).get("rbert_stage", 0)


def make_trainer(cfg: DictConfig, model, loggers: list, stage: int, num_stages: int):
    """A Trainer (and its checkpoint callback) for one training stage."""
    callbacks = instantiate_all(cfg.get("callbacks"))
    checkpointing = next((c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint)), None)
    model.set_stage(stage)
    overrides = {}
    if num_stages > 1:
        overrides["max_epochs"] = model.stage_epochs[stage]
        if checkpointing is not None:
            checkpointing.dirpath = f"{checkpointing.dirpath}/stage{stage + 1}"
    if checkpointing is not None:
        checkpointing.monitor = model.monitor()
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                                      enable_checkpointing=checkpointing is not None, **overrides)
    return trainer, checkpointing


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (``cfg.train``) and test (``cfg.test``); return the test metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = check_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    task = hydra.utils.instantiate(cfg.task)
    # Partial, then called: Hydra would turn the TaskSpec object into a config node.
    datamodule = hydra.utils.instantiate(cfg.data, _partial_=True)(task=task)
    model = hydra.utils.instantiate(cfg.model, _partial_=True)(task=task)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)

    loggers = instantiate_all(cfg.get("logger"))
    for lg in loggers:
        lg.log_hyperparams(model.run_config)

    num_stages = len(model.stage_epochs or [None])
    first = stored_stage(ckpt_path) if ckpt_path else 0
    if not cfg.train:
        trainer, checkpointing = make_trainer(cfg, model, loggers, first, num_stages)
    else:
        # One fit per stage; a resumed run goes on in the stage its checkpoint was saved in,
        # and each later stage starts from the weights the previous one ended with.
        resume = ckpt_path
        for stage in range(first, num_stages):
            trainer, checkpointing = make_trainer(cfg, model, loggers, stage, num_stages)
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
            resume = None
        # Test the (last stage's) best checkpoint when there is one, else the weights in hand.
        ckpt_path = (checkpointing.best_model_path or None) if checkpointing else None
    results: dict[str, float] = {}
    if cfg.test:
        for per_loader in trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False):
            results.update({k: float(v) for k, v in per_loader.items()})
    if trainer.is_global_zero:
        report(cfg, task, results, ckpt_path, checkpointing)
    return results


def report(cfg: DictConfig, task, results: dict[str, float], ckpt_path: str | None, checkpointing) -> None:
    """Print the result table and write ``results.json`` in the run folder."""
    model = HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else cfg.model._target_
    header = f"task={task.name} model={model} backbone={cfg.backbone} seed={cfg.seed}"
    if "test" not in task.splits:
        header += "  (test = dev set(s): GLUE test labels are hidden)"
    print(f"\n{header}\n{metrics_table(results)}\n")
    summary = {"task": task.name, "backbone": cfg.backbone, "seed": cfg.seed, "test": results,
               "checkpoint": ckpt_path}
    if checkpointing is not None and checkpointing.best_model_score is not None:
        summary["best_val"] = {checkpointing.monitor: float(checkpointing.best_model_score)}
    out = Path(cfg.paths.output_dir)
    write_json(out / "results.json", summary)
    log.info("results written to %s", out / "results.json")
