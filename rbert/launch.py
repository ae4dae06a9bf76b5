"""How a ``run.py`` job starts and ends, under whatever launched it.

* **One run folder per job, whoever starts its processes.** ``torchrun`` and ``srun`` start
  every rank themselves, and each composes the config: a folder named by the clock could
  differ between ranks. :func:`run_id` (the ``rbert.run_id`` resolver of
  ``conf/hydra/default.yaml``) names it by the launch instead (``torchrun-<rdzv id>``,
  ``slurm-<job>.<step>``) and by the time otherwise; a requeued SLURM job keeps its folder.
* **DDP children run this job, not the command line.** Lightning starts DDP ranks 1..N-1 by
  re-running ``sys.argv``; in a Hydra multirun that is the whole sweep (``-m
  task=mrpc,sst2 ...``), so every child would run every job. :func:`ddp_child_command`
  re-runs only this job's overrides, as a single run in this job's folder.
* **``ckpt_path=auto``** resumes from the run folder's newest ``last.ckpt`` if there is one
  (a requeued job goes on where it stopped), else starts afresh.
* **A failed job does not stop a sweep**: :func:`record_failure` writes ``failed.json`` in
  the job's folder and the sweep goes on; its summary (:mod:`rbert.sweep`) lists the failures.
* **A job ends whole** (:func:`finish`): its W&B run (one per multirun job) and, in a
  multirun, its DDP process group and launcher environment, so the next job starts its own.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger("rbert")


def run_id(time_format: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """A name for this job's run folder that every process of the job agrees on."""
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":  # torchrun (--standalone: a fresh uuid per launch)
        return f"torchrun-{env['TORCHELASTIC_RUN_ID'][:8]}"
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # srun with several tasks
        return f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
    return datetime.now().strftime(time_format)


def first(*values):
    """The first value that is set (not null): ``${rbert.first:${data_dir},${oc.env:RBERT_DATA_DIR,null}}``."""
    return next((v for v in values if v is not None), None)


if not OmegaConf.has_resolver("rbert.run_id"):
    OmegaConf.register_new_resolver("rbert.run_id", run_id, use_cache=True)  # as Hydra's `now`: one value per run
if not OmegaConf.has_resolver("rbert.first"):
    OmegaConf.register_new_resolver("rbert.first", first)


# ---------------------------------------------------------------------------- DDP children
def ddp_child_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning runs for DDP rank ``local_rank``: this Hydra job again, in its folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    hydra_cfg = HydraConfig.get()
    command = [sys.executable, to_absolute_path(sys.argv[0])]
    if hydra_cfg.job.config_name not in (None, "config"):
        command += ["--config-name", hydra_cfg.job.config_name]
    command += list(hydra_cfg.overrides.task)
    # Quoted for Hydra's override grammar; no output_subdir: rank 0 writes the job's .hydra/.
    command += [f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"', f"hydra.job.name=ddp_rank_{local_rank}",
                "hydra.output_subdir=null"]
    return command, get_original_cwd()


def install_ddp_child_command() -> None:
    """Make Lightning's DDP launcher start children with :func:`ddp_child_command` (pinned Lightning
    version: the launcher looks the function up in its module at every launch)."""
    from pytorch_lightning.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = ddp_child_command


# ---------------------------------------------------------------------------- resuming
def resume_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """``ckpt_path`` as given, or for ``auto`` the newest ``last.ckpt`` under the run folder's
    ``checkpoints/`` (a later stage's first), or None when there is none yet."""
    if ckpt_path != "auto":
        return ckpt_path
    candidates = sorted(Path(output_dir).glob("checkpoints/**/last.ckpt"),
                        key=lambda p: (str(p.parent), p.stat().st_mtime))
    if not candidates:
        log.info("ckpt_path=auto: no checkpoint in %s yet; starting afresh", output_dir)
        return None
    log.info("ckpt_path=auto: resuming from %s", candidates[-1])
    return str(candidates[-1])


# ---------------------------------------------------------------------------- sweeps
def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(output_dir: str, err: BaseException, message: str) -> None:
    """A failed multirun job: its error in the log and in ``failed.json``; the sweep goes on."""
    from rbert.report import write_json

    log.error("job failed: %s", message)
    if not message.startswith("error:"):  # a bug rather than bad input: keep the traceback
        log.error("%s", "".join(traceback.format_exception(err)))
    write_json(Path(output_dir) / "failed.json", {"error": message, "type": type(err).__name__})


# What Lightning's DDP launcher sets in the launching process's environment.
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def ddp_environment() -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in DDP_ENV}


def finish(environment: dict[str, str | None]) -> None:
    """End a job: its W&B run, so the next job of a sweep (same process) gets its own; and in a
    multirun, the DDP process group its children joined, with the environment Lightning's
    launcher set (``environment``: as it was when the job started). Otherwise the next job
    would take LOCAL_RANK for an external launcher's and wait for children that have exited."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
    if not in_multirun():
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in environment.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


__all__ = ["ddp_child_command", "ddp_environment", "finish", "in_multirun", "install_ddp_child_command",
           "record_failure", "resume_path", "run_id"]
