"""Hardware options checked before any process starts.

``trainer=gpu|amp|ddp|slurm`` on a machine that lacks what the option asks for would end in
Lightning's multi-line "No supported gpu backend found!" (or, for DDP, in a child process's
gloo traceback); :func:`check_trainer` says it in one line naming ``trainer`` and what runs
here. :func:`preflight_data` reads the data in the launching process before Lightning
starts DDP children, so a missing task folder is reported once, as in one process, instead
of by one rank while another dies in a barrier.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from rbert.errors import ConfigError


def trainer_option() -> str:
    """The chosen ``trainer=`` option's name (``gpu``, ``ddp``, ...), for messages."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("trainer") or "?"
    return "?"


def is_multi_process(trainer_cfg: DictConfig) -> bool:
    strategy = str(trainer_cfg.get("strategy") or "")
    devices = trainer_cfg.get("devices", 1)
    return "ddp" in strategy and (devices == -1 or devices == "auto" or int(devices or 1) > 1
                                  or int(trainer_cfg.get("num_nodes") or 1) > 1)


def check_trainer(cfg: DictConfig) -> None:
    """A one-line ConfigError if this machine cannot run ``cfg.trainer``."""
    t = cfg.get("trainer")
    if t is None:
        return
    name = trainer_option()
    accelerator = str(t.get("accelerator") or "auto")
    here = "trainer=cpu runs here" + (", or trainer=ddp_cpu (data-parallel CPU processes)" if "ddp" in
                                      str(t.get("strategy") or "") else "")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
            raise ConfigError(f"trainer={name}: this machine has no usable CUDA GPU (torch {torch.__version__}, "
                              f"{build}); {here}")
        devices, count = t.get("devices", 1), torch.cuda.device_count()
        if isinstance(devices, int) and devices > count:
            raise ConfigError(f"trainer.devices={devices}: this machine has {count} GPU(s); trainer.devices={count} "
                              "or trainer.devices=-1 (all of them)")
    plugins = [str(p.get("_target_", "")) for p in t.get("plugins") or [] if hasattr(p, "get")]
    if any(p.endswith("SLURMEnvironment") for p in plugins) and "SLURM_NTASKS" not in os.environ:
        raise ConfigError(f"trainer={name}: not inside a SLURM job (no SLURM_NTASKS); start it with srun in an "
                          f"sbatch script or with hydra/launcher=slurm -m; {here}")


def preflight_data(cfg: DictConfig, datamodule) -> None:
    """Read (and cache) the data in the process that will launch DDP children, before it does."""
    launching = "LOCAL_RANK" not in os.environ  # Lightning's children and torchrun's ranks have one
    if launching and is_multi_process(cfg.trainer) and hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
