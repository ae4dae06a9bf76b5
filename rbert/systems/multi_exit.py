"""Multi-exit training objectives: RomeBERT, DeeBERT, PABEE (and their ablations).

All share :class:`MultiExitSystem` (a :class:`~rbert.models.multi_exit.MultiExitBert`
plus per-exit metrics); they differ in the loss, and DeeBERT in its two stages.

RomeBERT's gradient regularisation (GR) runs inside Lightning's automatic optimisation:
``training_step`` computes the anchor term's gradient g_A on the regularised weights with
``torch.autograd.grad`` (a second backward pass, scaled like the loss under fp16), keeps a
running sum over accumulated micro-batches, and returns the whole loss, whose backward
leaves g_A + g_M in ``.grad`` (averaged over DDP ranks). ``on_before_optimizer_step``,
which Lightning calls after unscaling and before clipping, averages g_A over ranks too,
projects g_M = grad - g_A off g_A when they conflict, and writes g_A + g_M back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rbert.data.tasks import TaskSpec
from rbert.errors import ConfigError
from rbert.models.multi_exit import MultiExitBert
from rbert.systems.base import TaskSystem
from rbert.systems.distill import Teacher, check_kd, kd_term


class MultiExitSystem(TaskSystem):
    """Base: a multi-exit network whose ``forward`` returns every exit's logits.

    ``init_from``: a fine-tuned single-exit checkpoint of the same task and backbone (the
    plain ``model=bert`` run): its backbone and classifier become this model's backbone and
    final exit when training starts, the internal exits keep their fresh initialisation. With
    DeeBERT and ``model.stage_epochs=[0, N]`` this is DeeBERT's second stage on a model the
    user already fine-tuned: the final exit *is* that model, so early exit is judged against
    exactly what it replaces, and the first stage's epochs are not spent twice.
    """

    def __init__(self, task: TaskSpec, net: MultiExitBert, optimizer: Callable[..., torch.optim.Optimizer],
                 warmup_ratio: float = 0.1, self_sampling: dict | None = None, init_from: str | None = None):
        super().__init__(task, optimizer, warmup_ratio, exit_layers=net.exit_layers)
        self.net = net
        self.init_from = str(init_from) if init_from else None
        self._initialised = False
        self.self_sampling = None
        if self_sampling:  # token-level early exit's fine-tuning (rbert/systems/self_sampling.py)
            if task.kind != "tagging":
                raise ConfigError("model.self_sampling is token-level early exit's fine-tuning: tagging tasks only")
            from rbert.systems.self_sampling import SelfSampling

            self.self_sampling = SelfSampling(**dict(self_sampling))

    def setup(self, stage: str) -> None:
        # Here, not in __init__: a checkpoint rebuilt for inference must not open init_from
        # again, and a resumed run restores its own weights after this (Lightning's order).
        if stage == "fit" and self.init_from and not self._initialised:
            self.load_fine_tuned(self.init_from)
        self._initialised = True

    def load_fine_tuned(self, ckpt_path: str) -> None:
        """Backbone and final exit from a fine-tuned single-exit checkpoint (see the class docstring)."""
        from rbert.build import load_system  # systems are built by rbert.build: import at use
        from rbert.models.multi_exit import as_final_exit

        try:
            plain, _, _ = load_system(ckpt_path)
        except ConfigError as err:
            raise ConfigError(f"model.init_from: {err}") from err
        if getattr(plain, "task", None) is None or plain.task.num_labels != self.task.num_labels \
                or isinstance(plain, MultiExitSystem):
            raise ConfigError(f"model.init_from: {ckpt_path} is not a single-exit model fine-tuned with "
                              f"{self.task.num_labels} label(s) (model=bert on task {self.task.name})")
        weights = as_final_exit(plain.net, len(self.net.exits) - 1)
        own = self.net.state_dict()
        misfit = sorted(k for k in weights if k not in own or own[k].shape != weights[k].shape)
        untouched = sorted(k for k in own.keys() - weights.keys() if not k.startswith("exits."))
        if misfit or untouched:
            raise ConfigError(f"model.init_from: {ckpt_path} does not fit this model ({(misfit or untouched)[0]}"
                              f" {'differs' if misfit else 'is missing there'}): same backbone and num_layers?")
        self.net.load_state_dict(weights, strict=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if self.training and self.self_sampling is not None:  # words halted as they would at inference
            halt = self.self_sampling.halt_after(self.net, batch)
            return self.net(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"), halt)
        return self.net(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))


class PABEE(MultiExitSystem):
    """One stage; loss = sum_i i * L_i / sum_i i over exits at layers i (CE, or MSE for regression)."""

    def training_loss(self, batch):
        logits, labels = self.scored(batch)
        weights = torch.tensor(self.exit_layers, dtype=torch.float32, device=labels.device)
        losses = torch.stack([self.loss(z, labels) for z in logits])
        return (weights * losses).sum() / weights.sum(), {}


class DeeBERT(MultiExitSystem):
    """Two stages.

    1. backbone + final exit on the final exit's loss (internal exits frozen);
    2. internal exits only, on the sum of their losses; the backbone and the final exit
       are frozen (no gradient, not in the optimiser), so they come out bit-for-bit unchanged.

    Each stage is its own ``Trainer.fit`` (see :func:`rbert.fit.fit`), with a fresh
    optimiser and schedule, as in the reference code.
    """

    def __init__(self, task: TaskSpec, net: MultiExitBert, optimizer: Callable[..., torch.optim.Optimizer],
                 warmup_ratio: float = 0.1, stage_epochs: tuple[int, int] = (1, 1), self_sampling: dict | None = None,
                 init_from: str | None = None):
        super().__init__(task, net, optimizer, warmup_ratio, self_sampling, init_from)
        if len(stage_epochs) != 2 or min(stage_epochs) < 0:
            raise ConfigError(f"model.stage_epochs must give two epoch counts, got {stage_epochs}")
        if stage_epochs[0] == 0 and not init_from:
            raise ConfigError("model.stage_epochs=[0, N] skips the stage that trains the backbone and final exit: "
                              "give model.init_from=<a fine-tuned model=bert checkpoint>")
        self.stage_epochs = list(stage_epochs)
        self.set_stage(0)

    def set_stage(self, stage: int) -> None:
        super().set_stage(stage)
        for p in self.net.parameters():  # backbone and final exit: trained in stage 1 only
            p.requires_grad_(stage == 0)
        for head in self.net.exits[:-1]:
            for p in head.parameters():
                p.requires_grad_(stage == 1)

    def monitor(self) -> tuple[str, str] | None:
        # Stage 2 cannot change the final exit, which the task's metric watches: keep the last weights.
        return super().monitor() if self.stage == 0 else None

    def trained_exit_layers(self) -> list[int]:
        # In stage 1 the internal exits are still at their initialisation.
        return list(self.exit_layers) if self.stage >= 1 else self.exit_layers[-1:]

    def training_loss(self, batch):
        logits, labels = self.scored(batch)
        if self.stage == 0:
            return self.loss(logits[-1], labels), {}
        return torch.stack([self.loss(z, labels) for z in logits[:-1]]).sum(), {}


class RomeBERT(MultiExitSystem):
    """One stage, exits and backbone together, with self-distillation (SD) and gradient regularisation (GR).

    Loss, with z_L the final exit's logits (detached: the teacher), T the temperature and
    gamma the distillation weight:
        L = CE(z_L, y) + sum_{i<L} [(1 - gamma) CE(z_i, y) + gamma T^2 KL(softmax(z_L/T) || softmax(z_i/T))]
    For regression the distillation term is the MSE to the teacher's prediction.
    ``self_distillation=false`` gives the plain joint loss (sum of every exit's loss).

    ``teacher``: a fine-tuned checkpoint (e.g. the plain ``model=bert``) whose logits replace
    z_L as the distillation target, for every exit, the final one included (its term is then
    (1 - gamma) CE + gamma KD like the others'); see :mod:`rbert.systems.distill`.

    ``kd_reduction`` is how the KL term is averaged: ``mean`` (the reference code's
    ``nn.KLDivLoss()`` default: the summed KL divided by batch x classes) or ``batchmean``
    (divided by the batch: the textbook KL per sample, C times stronger on C classes).

    GR splits L into the final term and the exit terms; ``anchor`` says which one keeps its
    gradient g_A (``final``, ``exits``, or ``auto``: ``final`` for MNLI and QQP, ``exits``
    elsewhere, as in the reference code); the other's gradient g_M loses its component
    along g_A when <g_M, g_A> < 0. Only the weight matrices of encoder layers 1..L-1 are
    regularised; every other parameter gets the plain sum.
    """

    def __init__(self, task: TaskSpec, net: MultiExitBert, optimizer: Callable[..., torch.optim.Optimizer],
                 warmup_ratio: float = 0.1, self_distillation: bool = True, temperature: float = 3.0,
                 gamma: float = 0.9, gradient_regularization: bool = True, anchor: str = "auto",
                 kd_reduction: str = "mean", teacher: str | None = None, self_sampling: dict | None = None,
                 init_from: str | None = None):
        super().__init__(task, net, optimizer, warmup_ratio, self_sampling, init_from)
        check_kd(temperature, gamma, kd_reduction)
        if anchor == "auto":
            anchor = "final" if task.name in ("mnli", "qqp") else "exits"
        if anchor not in ("final", "exits"):
            raise ConfigError(f"model.anchor must be final, exits or auto, got {anchor!r}")
        if teacher and not self_distillation:
            raise ConfigError("model.teacher needs model.self_distillation=true (the teacher's logits are its target)")
        self.self_distillation = self_distillation
        self.kd_reduction = kd_reduction
        self.temperature = temperature
        self.gamma = gamma
        self.gradient_regularization = gradient_regularization
        self.anchor = anchor
        self.teacher = Teacher(teacher, task) if teacher else None
        # The weights of the layers below the last; ALBERT's shared layer counts once.
        params = {id(p): p for layer in list(net.bert.layers)[:-1] for name, p in layer.named_parameters()
                  if name.endswith("weight") and p.ndim == 2}
        self.gr_params = list(params.values())
        self._g_anchor: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ loss
    def exit_term(self, z: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.self_distillation:
            return self.loss(z, labels)
        distill = kd_term(z, teacher, self.temperature, self.kd_reduction, self.task.is_regression)
        return (1 - self.gamma) * self.loss(z, labels) + self.gamma * distill

    def loss_terms(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(final-exit term, sum of internal-exit terms)."""
        logits, labels = self.scored(batch)
        if self.teacher is not None:
            teacher = self.rows(self.teacher.logits(batch), batch)
            final = self.exit_term(logits[-1], teacher, labels)
        else:
            teacher = logits[-1].detach()
            final = self.loss(logits[-1], labels)
        exits = torch.stack([self.exit_term(z, teacher, labels) for z in logits[:-1]]).sum()
        return final, exits

    def training_loss(self, batch):
        final, exits = self.loss_terms(batch)
        logs = {"loss_final": final.detach(), "loss_exits": exits.detach()}
        if self.gradient_regularization and self.gr_params:
            self._accumulate_anchor_grad(final if self.anchor == "final" else exits)
        return final + exits, logs

    # ------------------------------------------------------------------ gradient regularisation
    def _scaler(self):
        return getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer else None

    def _accumulate_anchor_grad(self, anchor_loss: torch.Tensor) -> None:
        # Scaled like the loss Lightning back-propagates: divided by the accumulation steps,
        # multiplied by the fp16 loss scale (unscaled again in on_before_optimizer_step).
        accumulate = self.trainer.accumulate_grad_batches if self._trainer else 1
        scaled = anchor_loss / accumulate
        scaler = self._scaler()
        if scaler is not None:
            scaled = scaler.scale(scaled)
        grads = torch.autograd.grad(scaled, self.gr_params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.gr_params, grads)]
        if self._g_anchor is None:
            self._g_anchor = [g.float() for g in grads]
        else:
            for total, g in zip(self._g_anchor, grads):
                total.add_(g.float())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._g_anchor is None:
            return
        g_a = torch.cat([g.flatten() for g in self._g_anchor])
        self._g_anchor = None
        scaler = self._scaler()
        if scaler is not None:  # .grad was unscaled already; g_A not yet
            g_a = g_a / scaler.get_scale()
        g_a = self.trainer.strategy.reduce(g_a, reduce_op="mean")  # .grad is a DDP mean as well
        if not torch.isfinite(g_a).all():
            # The separate anchor pass overflowed (fp16) where the total may not have: leave
            # .grad as it is (the scaler skips the step if the total is not finite either).
            self.log_dict({"train/gr_skipped": 1.0})
            return
        total = torch.cat([p.grad.float().flatten() for p in self.gr_params])
        stats = project_conflict(g_a, total - g_a)
        new = g_a + stats.pop("g_m")
        offset = 0
        for p in self.gr_params:
            n = p.numel()
            p.grad.copy_(new[offset:offset + n].view_as(p))
            offset += n
        self.log_dict({f"train/gr_{k}": v for k, v in stats.items()})


def project_conflict(g_a: torch.Tensor, g_m: torch.Tensor, eps: float = 1e-20) -> dict[str, torch.Tensor]:
    """Remove from g_M its component along g_A if the two conflict (<g_M, g_A> < 0).

    Returns the new g_M and, for logging, the angle between the original gradients
    (degrees), their norms, and whether a projection happened. fp32 throughout.
    """
    g_a, g_m = g_a.float(), g_m.float()
    dot = torch.dot(g_m, g_a)
    norm_a, norm_m = g_a.norm(), g_m.norm()
    cos = dot / (norm_a * norm_m).clamp_min(eps)
    conflict = dot < 0
    projected = torch.where(conflict, g_m - dot / (norm_a * norm_a).clamp_min(eps) * g_a, g_m)
    angle = torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))
    return {"g_m": projected, "angle": angle, "norm_anchor": norm_a, "norm_other": norm_m,
            "projected": conflict.float(), "cos": cos}


__all__ = ["DeeBERT", "MultiExitSystem", "PABEE", "RomeBERT", "project_conflict"]
