"""``model=core``: CoRe coarse-refined pre-training, both phases in one run.

Phase 1 (stage 0) trains a *relaxed* BERT: linear attention and low-rank feed-forward
projections (:mod:`rbert.models.relaxed`), cheaper per step. At the switch, phase 2
(stage 1) expands it into a standard BERT (W <- U V exactly; attention keeps its Q/K/V/O
weights and switches to softmax, at once or over ``transition_steps``) and trains on.

Choices (docs/design.md explains why):

* one learning-rate schedule over the whole budget (``total_steps``): warm-up, then linear
  decay, as for the from-scratch baseline; phase 2 re-warms up over ``rewarmup_steps`` to
  where that schedule stands;
* the optimiser state of parameters the expansion keeps (embeddings, attention, LayerNorms,
  biases, MLM head) carries over; the dense feed-forward weights start with fresh Adam
  moments, which cannot be derived from those of U and V (``keep_optimizer_state=false``:
  everything fresh);
* each phase is a training stage (its own ``Trainer.fit``, checkpoints under ``stage1/``
  and ``stage2/``); checkpoints record the phase, so a run resumes on either side of the switch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from rbert.errors import ConfigError
from rbert.models.mlm import BertForMaskedLM
from rbert.models.relaxed import expand, set_blend
from rbert.systems.mlm import MaskedLM

RELAXED, EXPANDED = 0, 1  # the stages (phases 1 and 2)


def as_steps(value: int | float, total: int, name: str) -> int:
    """A step count given as steps (int) or as a fraction of ``total`` (float below 1)."""
    steps = round(value * total) if isinstance(value, float) and value < 1 else int(value)
    if steps < 0:
        raise ConfigError(f"model.{name}={value} must not be negative")
    return steps


class CoRe(MaskedLM):
    """Both CoRe phases over one stream of training data: phase 2 sees the batches a
    from-scratch run sees at the same steps.

    Args:
        net: the relaxed masked-LM BERT (``attention="linear"``, ``feed_forward="low_rank"``).
        optimizer, warmup_ratio: as for :class:`~rbert.systems.mlm.MaskedLM` (warm-up is a
            fraction of ``total_steps``).
        total_steps: optimiser steps of both phases together (``trainer.max_steps``).
        switch: phase-1 length, in steps or as a fraction of ``total_steps``.
        rewarmup_steps: phase 2's learning-rate re-warm-up (steps or fraction of ``total_steps``).
        transition_steps: 0 switches to softmax attention at once; N blends
            ``(1 - a) linear + a softmax`` with ``a`` ramping 0 -> 1 over N steps.
        keep_optimizer_state: carry the Adam moments of the parameters the expansion keeps.
    """

    continue_data = True  # phase 2 goes on with the data where phase 1 stopped

    def __init__(self, net: BertForMaskedLM, optimizer: Callable[..., torch.optim.Optimizer], total_steps: int,
                 switch: int | float = 0.5, warmup_ratio: float = 0.06, rewarmup_steps: int | float = 0.02,
                 transition_steps: int | float = 0, keep_optimizer_state: bool = True):
        super().__init__(net, optimizer, warmup_ratio)
        if not self.is_relaxed:
            raise ConfigError("model=core: model.net is a standard BERT; phase 1 needs a relaxed one "
                              "(model.net.attention=linear and/or model.net.feed_forward=low_rank)")
        if total_steps is None or int(total_steps) < 2:
            raise ConfigError(f"model.total_steps={total_steps}: CoRe needs a step budget (trainer.max_steps >= 2)")
        self.total_steps = int(total_steps)
        switch_step = as_steps(switch, self.total_steps, "switch")
        if not 0 < switch_step < self.total_steps:
            raise ConfigError(f"model.switch={switch}: the switch must fall inside the budget "
                              f"(1..{self.total_steps - 1} steps, or a fraction in (0, 1))")
        self.stage_steps = [switch_step, self.total_steps - switch_step]
        self.rewarmup_steps = as_steps(rewarmup_steps, self.total_steps, "rewarmup_steps")
        self.transition_steps = as_steps(transition_steps, self.total_steps, "transition_steps")
        self.keep_optimizer_state = keep_optimizer_state
        self._carried_state: dict[str, dict] | None = None  # Adam moments by parameter name, at the switch

    # ------------------------------------------------------------------ the switch
    def set_stage(self, stage: int) -> None:
        super().set_stage(stage)
        if stage >= EXPANDED and self.is_relaxed:
            self.net = expand(self.net, attention="blend" if self.transition_steps else "softmax")

    @property
    def is_relaxed(self) -> bool:
        return self.net.bert.attention_type == "linear" or self.net.bert.feed_forward_type != "dense"

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.stage == RELAXED and self.keep_optimizer_state and self.trainer.optimizers:
            optimizer = self.trainer.optimizers[0]
            self._carried_state = {name: {k: v.clone() for k, v in optimizer.state[p].items()}
                                   for name, p in self.named_parameters() if p in optimizer.state}

    def configure_optimizers(self):
        config = super().configure_optimizers()
        if self.stage == EXPANDED and self._carried_state:
            optimizer = config["optimizer"]
            for name, param in self.named_parameters():
                state = self._carried_state.get(name)
                if state is not None and all(v.shape == param.shape for v in state.values() if v.dim()):
                    optimizer.state[param] = {k: v.to(param.device) for k, v in state.items()}
            self._carried_state = None
        return config

    def lr_scheduler(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        """One warm-up + linear-decay schedule over both phases; phase 2 re-warms up to it."""
        total, offset = self.total_steps, self.steps_before_stage()
        warmup = int(self.warmup_ratio * total)
        rewarmup = self.rewarmup_steps if self.stage == EXPANDED else 0

        def factor(step: int) -> float:
            s = offset + step
            base = s / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
            return base * min(1.0, (step + 1) / rewarmup) if rewarmup else base

        return LambdaLR(optimizer, factor)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.stage == EXPANDED and self.transition_steps:
            mix = min(1.0, self.global_step / self.transition_steps)
            set_blend(self.net, mix)
            self.log("train/softmax_share", mix)

    # ------------------------------------------------------------------ export
    def check_exportable(self) -> None:
        pass  # phase 2 is a standard BERT; a phase-1 checkpoint is expanded on export

    def export_net(self) -> BertForMaskedLM:
        return expand(self.net, attention="softmax")
