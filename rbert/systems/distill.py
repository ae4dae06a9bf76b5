"""Knowledge distillation: the soft-target loss, and a fine-tuned teacher to take targets from.

RomeBERT distils its internal exits from its own final exit. Early exit is judged against
the plain fine-tuned model, so the objectives can also take that model as a *teacher*
(``model.teacher=<its checkpoint>``): every exit (the final one too) learns from its
logits. The same option is offered to the plain and static-depth models (``model=bert``),
so a comparison never gives distillation to one side only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rbert.data.tasks import TaskSpec
from rbert.errors import ConfigError

KD_REDUCTIONS = ("mean", "batchmean")


def kd_term(z: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str,
            regression: bool) -> torch.Tensor:
    """T^2 KL(softmax(teacher/T) || softmax(z/T)), or the MSE to the teacher's value for regression.

    ``reduction``: ``mean`` divides the summed KL by batch x classes (the RomeBERT reference
    code's ``nn.KLDivLoss()``), ``batchmean`` by the batch (the KL per sample).
    """
    if regression:
        return F.mse_loss(z.squeeze(-1).float(), teacher.squeeze(-1).float())
    t = temperature
    kl = F.kl_div(F.log_softmax(z.float() / t, dim=-1), F.log_softmax(teacher.float() / t, dim=-1),
                  log_target=True, reduction="sum")
    # Spelled out: torch has announced that its reduction="mean" will become "batchmean".
    return t * t * kl / (z.numel() if reduction == "mean" else z.shape[0])


def check_kd(temperature: float, gamma: float, reduction: str) -> None:
    if reduction not in KD_REDUCTIONS:
        raise ConfigError(f"model.kd_reduction must be one of {KD_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= gamma <= 1.0 or temperature <= 0:
        raise ConfigError(f"model.gamma must lie in [0, 1] and model.temperature be > 0, got {gamma}, {temperature}")


class Teacher:
    """A fine-tuned rbert checkpoint whose final-exit logits are the soft targets.

    Loaded on first use (a checkpoint rebuilt for inference never loads its teacher), frozen,
    in eval mode, and kept *outside* the student's module tree: the student's checkpoints do
    not carry the teacher's weights, and its optimiser never sees them.
    """

    def __init__(self, ckpt_path: str, task: TaskSpec):
        self.ckpt_path = str(ckpt_path)
        self.task = task
        self._system = None

    def _load(self, device: torch.device):
        from rbert.build import load_system  # systems are built by rbert.build: import at use

        try:
            system, _, _ = load_system(self.ckpt_path)
        except ConfigError as err:
            raise ConfigError(f"model.teacher: {err}") from err
        if getattr(system, "task", None) is None or system.task.num_labels != self.task.num_labels:
            raise ConfigError(f"model.teacher: {self.ckpt_path} is not a fine-tuned model with "
                              f"{self.task.num_labels} label(s) (task {self.task.name})")
        for p in system.parameters():
            p.requires_grad_(False)
        return system.to(device).eval()

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = batch["input_ids"].device
        if self._system is None:
            self._system = self._load(device)
        return self._system(batch)[-1].detach()
