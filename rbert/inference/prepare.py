"""What ``mode=eval``, ``mode=predict`` and ``mode=export`` set up alike from a config:
the policy, the checkpoint's system and trained exits, the exits to consult, the device,
autocast and the data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import hydra
import torch
from omegaconf import DictConfig

from rbert.build import build_datamodule
from rbert.errors import ConfigError
from rbert.inference.checkpoint import load_task_system, multi_exit_net
from rbert.inference.policies import BudgetExit, ExitPolicy
from rbert.inference.sweep import exit_logits, only, sweep
from rbert.models.multi_exit import MultiExitBert
from rbert.systems.base import TaskSystem


@dataclass
class Setup:
    policy: ExitPolicy
    system: TaskSystem
    net: MultiExitBert | None    # None: a single-exit model
    trained: list[int]           # layers of the exits the checkpoint's objective trained
    layers: list[int]            # the exits that may answer: trained, and in eval.exit_layers if given
    device: torch.device
    autocast: Callable
    datamodule: object
    train_cfg: DictConfig


def placement(eval_cfg: DictConfig) -> tuple[torch.device, Callable]:
    """The device to evaluate on (``eval.device``; cuda if available) and an autocast context
    factory for ``eval.amp``."""
    device = torch.device(eval_cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[eval_cfg.amp]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    return device, autocast


def prepare(cfg: DictConfig, loaded: tuple | None = None) -> Setup:
    """``loaded``: what :func:`load_task_system` returned, if the caller has loaded the checkpoint already."""
    policy: ExitPolicy = hydra.utils.instantiate(cfg.exit_policy)
    system, train_cfg, trained = loaded or load_task_system(cfg.ckpt_path)
    layers = trained
    if cfg.eval.get("exit_layers"):  # fewer exits: less per-exit work, coarser exit choices
        wanted = sorted({int(layer) for layer in cfg.eval.exit_layers})
        missing = [layer for layer in wanted if layer not in trained]
        if missing:
            raise ConfigError(f"eval.exit_layers: no trained exit at layer(s) {missing} in {cfg.ckpt_path} "
                              f"(trained exits: {trained})")
        layers = sorted(set(wanted) | {trained[-1]})
    net = multi_exit_net(system, policy.base if isinstance(policy, BudgetExit) else policy, layers)
    device, autocast = placement(cfg.eval)
    system.to(device)
    # A run trained with a selection split keeps it held out here: thresholds are chosen on it.
    select = cfg.data.get("select_rows") or train_cfg.get("data", {}).get("select_rows")
    datamodule = build_datamodule(cfg, system.task, backbone=train_cfg.backbone, select_rows=select)
    return Setup(policy, system, net, trained, layers, device, autocast, datamodule, train_cfg)


def dev_loader(datamodule):
    return datamodule.eval_loader(0)


def resolve_budget(setup: Setup) -> tuple[ExitPolicy, dict | None]:
    """The policy to answer with: a budget policy's choice of threshold (and the choice, as
    :meth:`BudgetExit.choose` reports it), or the policy itself. The choice is made on the
    selection split when the run held one out (``data.select_rows``), else on the dev set."""
    policy = setup.policy
    if not isinstance(policy, BudgetExit):
        return policy, None
    logits, labels = exit_logits(setup.system, setup.datamodule.selection_loader(), setup.device, setup.autocast)
    logits = only(logits, setup.system.exit_layers, setup.layers)
    rows = sweep(policy.base, logits, labels, setup.layers, setup.system.task)
    return policy.choose(rows, as_policy=True), policy.choose(rows)

