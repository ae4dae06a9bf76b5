"""``mode=serve``: ``python run.py mode=serve serve.folder=<exported folder>``.

The Hydra face of :mod:`rbert.deploy.server` (which runs without Hydra too: ``python -m
rbert.deploy.server <folder>``). The exported policy answers unless ``exit_policy=`` is
given on the command line (``exit_policy=none``: the same server at full depth).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rbert.errors import ConfigError
from rbert.inference.policies import BudgetExit


def policy_override(cfg: DictConfig):
    """The ``exit_policy`` given on the command line, or None: the exported policy answers."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    if not any(o.lstrip("+~").startswith("exit_policy") for o in overrides):
        return None
    policy = hydra.utils.instantiate(cfg.exit_policy)
    if isinstance(policy, BudgetExit):
        raise ConfigError("exit_policy: a budget's threshold is chosen on the dev set at export time "
                          "(python run.py mode=export exit_policy=budget ...); serve takes the others")
    return policy


def run(cfg: DictConfig) -> None:
    from rbert.deploy.folder import FolderError
    from rbert.deploy.server import Limits, load, serve

    s = cfg.serve
    if not s.get("folder"):
        raise ConfigError("serve.folder: mode=serve needs an exported folder (python run.py mode=export ...)")
    try:
        model = load(s.folder, s.runtime, policy_override(cfg), threads=s.threads)
        limits = Limits(max_texts=s.max_texts, max_request_bytes=s.max_request_bytes, max_batch=s.max_batch,
                        max_wait_ms=s.max_wait_ms, max_queue=s.max_queue, truncate=s.truncate)
    except (FolderError, ValueError) as err:
        raise ConfigError(f"serve.folder: {err}" if isinstance(err, FolderError) else f"serve: {err}") from err
    print(f"serving {s.folder} ({model.policy.describe()}, {s.runtime}) on http://{s.host}:{s.port}")
    serve(model, s.host, s.port, limits)
