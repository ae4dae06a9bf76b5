"""Every option of every config group composes and instantiates."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from rbert.inference.policies import ExitPolicy
from rbert.train import instantiate_all

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
# Files starting with "_" are fragments that options include, not options.
OPTIONS = [(group, yaml.stem) for group in GROUPS for yaml in sorted((CONF / group).glob("*.yaml"))
           if not yaml.stem.startswith("_")]


def make_config(overrides: list[str], tmp_path: Path) -> DictConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def instantiate_trainer(cfg: DictConfig) -> object:
    """A Trainer; where the option needs a GPU this machine lacks, the unbound constructor call."""
    needs_gpu = cfg.trainer.get("accelerator") == "gpu"
    partial = needs_gpu and not torch.cuda.is_available()
    trainer = hydra.utils.instantiate(cfg.trainer, _partial_=partial, logger=False)
    if partial:
        assert trainer.func is pl.Trainer
    return trainer


def test_groups_are_all_covered():
    assert {"task", "model", "data", "trainer", "logger", "callbacks", "paths", "debug", "experiment",
            "exit_policy"} <= set(GROUPS)
    assert {"cpu", "gpu", "ddp", "ddp_cpu", "amp"} <= {o for g, o in OPTIONS if g == "trainer"}
    assert {"csv", "wandb", "none"} <= {o for g, o in OPTIONS if g == "logger"}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, glue_dir, tmp_path):
    # hydra/default is the only option of its group and always in use.
    overrides = [] if group == "hydra" else [f"{group}={option}"]
    cfg = make_config(overrides + ["backbone=tiny", f"data_dir={glue_dir}"], tmp_path)
    if group == "task" and option == "custom":
        with open_dict(cfg):
            cfg.data_dir = str(tmp_path)
        (tmp_path / "train.csv").write_text("sentence,label\ngood,1\nbad,0\n")
        (tmp_path / "dev.csv").write_text("sentence,label\nfine,1\n")

    task = hydra.utils.instantiate(cfg.task)
    model = hydra.utils.instantiate(cfg.model, _partial_=True)(task=task)
    assert isinstance(model, pl.LightningModule)
    datamodule = hydra.utils.instantiate(cfg.data, _partial_=True)(task=task)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    logits = model(batch)[-1]
    assert logits.shape == (batch["input_ids"].shape[0], task.num_labels)
    assert isinstance(hydra.utils.instantiate(cfg.exit_policy), ExitPolicy)
    for logger in instantiate_all(cfg.get("logger")):
        assert isinstance(logger, pl.loggers.Logger)
    for callback in instantiate_all(cfg.get("callbacks")):
        assert isinstance(callback, pl.Callback)
    instantiate_trainer(cfg)
