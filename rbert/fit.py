"""Fitting a system, stage by stage: what ``mode=train`` and ``mode=pretrain`` share."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.trainer.states import TrainerStatus

from rbert.build import build_datamodule, build_system, check_checkpoint, instantiate_all, make_trainer, stored_stage
from rbert.hardware import check_trainer, preflight_data
from rbert.launch import resume_path


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint a run starts from: ``ckpt_path``, or with ``ckpt_path=auto`` the run
    folder's newest ``last.ckpt`` (none yet: a fresh start); vetted before anything is built."""
    path = resume_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    return check_checkpoint(path) if path else None


def setup_run(cfg: DictConfig, task=None) -> tuple[pl.LightningModule, pl.LightningDataModule, list]:
    """Seeded system, datamodule and loggers of a run; the system carries the resolved config.

    First the hardware options and, where DDP children are to start, the data are checked,
    so that bad input gets one line before any child process exists (:mod:`rbert.hardware`).
    """
    check_trainer(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg, task)
    preflight_data(cfg, datamodule)
    system = build_system(cfg, task)
    system.run_config = OmegaConf.to_container(cfg, resolve=True)
    loggers = instantiate_all(cfg.get("logger"))
    for lg in loggers:
        lg.log_hyperparams(system.run_config)
    return system, datamodule, loggers


def fit(cfg: DictConfig, system, datamodule, loggers: list, ckpt_path: str | None) -> tuple[pl.Trainer, list]:
    """One ``Trainer.fit`` per stage; a resumed run goes on in the stage its checkpoint was
    saved in, and each later stage starts from the weights the previous one ended with.
    Returns the last stage's trainer and checkpoint callbacks."""
    first = stored_stage(system, ckpt_path) if ckpt_path else 0
    resume = ckpt_path
    trainer, checkpoints = None, []
    for stage in range(first, system.num_stages):
        if system.stage_overrides(stage).get("max_epochs") == 0:
            continue  # a stage given no epochs (DeeBERT's first, on a model fine-tuned before: init_from)
        trainer, checkpoints = make_trainer(cfg, system, loggers, stage)
        trainer.fit(system, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        if system.continue_data and hasattr(datamodule, "continue_from"):
            datamodule.continue_from(trainer)  # the next stage goes on with the data where this one stopped
        elif resume is not None and hasattr(datamodule, "forget_position"):
            datamodule.forget_position()  # the next stage starts its data from the beginning
        resume = None
        # last.ckpt holds the final weights too: Lightning writes it only at its save triggers
        # (validations, every N steps), and a step budget can end between two.
        keepers = [c for c in checkpoints if c.save_last]
        saved_now = any(getattr(c, "_last_global_step_saved", -1) == trainer.global_step for c in keepers)
        if keepers and trainer.state.status == TrainerStatus.FINISHED and not saved_now:
            trainer.save_checkpoint(Path(keepers[0].dirpath) / "last.ckpt")
    return trainer, checkpoints


def best_checkpoint(checkpoints: list) -> pl.callbacks.ModelCheckpoint | None:
    """The callback that keeps the best checkpoint: the one that watches a metric, else one that keeps files."""
    return next((c for c in checkpoints if c.monitor), None) or next((c for c in checkpoints if c.save_top_k), None)
