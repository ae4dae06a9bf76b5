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

from rbert.build import build_datamodule, build_system, build_task, instantiate_all
from rbert.inference.policies import ExitPolicy
from rbert.inference.token_policies import WindowEntropyExit
from rbert.pretrain import own_vocabulary
from rbert.systems import MaskedLM, TaskSystem
from tests.tagging_files import write_ewt, write_wnut

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
# Files starting with "_" are fragments that options include, not options.
OPTIONS = [(group, yaml.stem) for group in GROUPS for yaml in sorted((CONF / group).glob("*.yaml"))
           if not yaml.stem.startswith("_")]
# The primary config each option belongs to: conf/config.yaml (fine-tuning on a task, eval,
# predict) or conf/pretrain.yaml (masked-LM pre-training). Options of other groups go with both.
PRETRAIN = {("data", "text"), ("model", "bert_mlm"), ("model", "core"), ("experiment", "core_small")} | {
    (g, o) for g, o in OPTIONS if g == "arch" or (g == "experiment" and o.startswith("pretrain_"))}
TASK_ONLY_GROUPS = {"task", "exit_policy", "budget", "eval", "serve", "hparams_search"}


def primaries(group: str, option: str) -> list[str]:
    if (group, option) in PRETRAIN:
        return ["pretrain"]
    if group in TASK_ONLY_GROUPS or group in ("data", "model", "experiment"):
        return ["config"]
    return ["config", "pretrain"]


CASES = [(primary, group, option) for group, option in OPTIONS for primary in primaries(group, option)]


def make_config(overrides: list[str], tmp_path: Path, primary: str = "config") -> DictConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(primary, overrides=overrides, return_hydra_config=True)
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
            "exit_policy", "arch"} <= set(GROUPS)
    assert {"cpu", "gpu", "ddp", "ddp_cpu", "amp"} <= {o for g, o in OPTIONS if g == "trainer"}
    assert {"csv", "wandb", "none"} <= {o for g, o in OPTIONS if g == "logger"}


def test_pretrain_config_carries_no_task():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("pretrain")
    assert "task" not in cfg and "backbone" not in cfg and "exit_policy" not in cfg
    assert cfg.mode == "pretrain" and cfg.trainer.max_steps > 0


# Options that need tagging files (and what else they need).
TAGGING = {("data", "tagging"): ["task=pos_ewt"], ("task", "pos_ewt"): [], ("task", "ner_wnut17"): [],
           ("task", "tagging"): ["task.num_labels=6"], ("task", "ner_conll2003"): []}


@pytest.mark.parametrize(("primary", "group", "option"), CASES, ids=[f"{p}:{g}={o}" for p, g, o in CASES])
def test_option_composes_and_instantiates(primary, group, option, glue_dir, text_dir, tmp_path):
    # hydra/default is the only option of its group and always in use.
    overrides = [] if group == "hydra" else [f"{group}={option}"]
    if primary == "pretrain":
        overrides += [f"data_dir={text_dir}"] + ([] if group == "arch" else ["arch=tiny"])
    elif (group, option) in TAGGING:
        # Tagging tasks read their own folders (and pick data=tagging); data=tagging needs one.
        write_ewt(tmp_path), write_wnut(tmp_path)
        (tmp_path / "train.txt").write_text((tmp_path / "WNUT17" / "wnut17train.conll").read_text())
        (tmp_path / "dev.txt").write_text((tmp_path / "WNUT17" / "emerging.dev.conll").read_text())
        conll = tmp_path / "CoNLL2003"  # the shared task's columns: word POS chunk NER
        conll.mkdir(exist_ok=True)
        for name in ("eng.train", "eng.testa", "eng.testb"):
            (conll / name).write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
                                      "German JJ B-NP B-MISC\ncall NN I-NP O\n\nPeter NNP B-NP B-PER\n"
                                      "Blackburn NNP I-NP I-PER\nin IN B-PP O\nLondon NNP B-NP B-LOC\n")
        overrides += ["backbone=tiny", f"data_dir={tmp_path}", *TAGGING[(group, option)]]
    else:
        overrides += ["backbone=tiny", f"data_dir={glue_dir}"]
    cfg = make_config(overrides, tmp_path, primary)
    if group == "task" and option == "custom":
        with open_dict(cfg):
            cfg.data_dir = str(tmp_path)
        (tmp_path / "train.csv").write_text("sentence,label\ngood,1\nbad,0\n")
        (tmp_path / "dev.csv").write_text("sentence,label\nfine,1\n")

    if primary == "pretrain":
        own_vocabulary(cfg)  # tokenizer=train: as run.py does before building
    task = build_task(cfg)
    model = build_system(cfg, task)
    datamodule = build_datamodule(cfg, task)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    size = batch["input_ids"].shape[0]
    # What each system type produces: task systems one logits tensor per exit, MLM systems
    # a loss and logits on the masked positions only.
    if isinstance(model, TaskSystem):
        assert primary == "config"
        tokens = (batch["input_ids"].shape[1],) if task.kind == "tagging" else ()
        assert model(batch)[-1].shape == (size, *tokens, task.num_labels)
        assert isinstance(hydra.utils.instantiate(cfg.exit_policy), (ExitPolicy, WindowEntropyExit))
    else:
        assert isinstance(model, MaskedLM) and primary == "pretrain"
        out = model(batch)
        masked = int((batch["labels"] != -100).sum())
        assert out.logits.shape == (masked, model.net.config.vocab_size) and torch.isfinite(out.loss)
    for logger in instantiate_all(cfg.get("logger")):
        assert isinstance(logger, pl.loggers.Logger)
    for callback in instantiate_all(cfg.get("callbacks")):
        assert isinstance(callback, pl.Callback)
    instantiate_trainer(cfg)


def test_deebert_stages_follow_the_epoch_budget(glue_dir, tmp_path):
    """``trainer.max_epochs=3`` gives DeeBERT 3 epochs per stage, as every other objective gets
    3 epochs (a fixed [1, 1] once gave it a third of a plan's budget without a word)."""
    cfg = make_config(["model=deebert", "trainer.max_epochs=3", f"data_dir={glue_dir}"], tmp_path)
    system = build_system(cfg, build_task(cfg))
    assert list(system.stage_epochs) == [3, 3]
