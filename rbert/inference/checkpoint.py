"""Fine-tuned checkpoints for inference: the system, the config that trained it, and its trained exits."""

from __future__ import annotations

from omegaconf import DictConfig

from rbert.build import load_system
from rbert.errors import ConfigError
from rbert.inference.policies import ExitPolicy
from rbert.models.multi_exit import MultiExitBert
from rbert.models.token_heads import MultiExitTokenBert
from rbert.systems.base import TaskSystem


def load_task_system(ckpt_path: str) -> tuple[TaskSystem, DictConfig, list[int]]:
    """Rebuild a fine-tuned system from its checkpoint (the config that trained it is stored inside).

    Also returns the layers of the exits its objective had trained when the checkpoint was
    written (e.g. only the final one after DeeBERT's stage 1): early exit uses only those.
    """
    system, train_cfg, ckpt = load_system(ckpt_path)
    if not isinstance(system, TaskSystem):
        raise ConfigError(f"ckpt_path: {ckpt_path} is a pre-training checkpoint; fine-tune it first "
                          "(its run folder's hf/ is a backbone: backbone=<run>/hf)")
    trained = [int(layer) for layer in ckpt.get("rbert_trained_exits", system.exit_layers)]
    return system, train_cfg, trained


def multi_exit_net(system: TaskSystem, policy: ExitPolicy, trained: list[int]
                   ) -> MultiExitBert | MultiExitTokenBert | None:
    net = getattr(system, "net", None)
    policy.check(system.task.num_labels, len(trained))
    return net if isinstance(net, (MultiExitBert, MultiExitTokenBert)) else None

