"""What every training system shares, and what every fine-tuning objective shares.

:class:`BaseSystem` holds what any objective needs, task or no task: optimiser parameter
groups, the warm-up + linear-decay schedule, the stage protocol (objectives trained in
several stages, each its own ``Trainer.fit``), the metric that picks the best checkpoint
(with its direction), the wall-clock training time, and what every checkpoint records.

:class:`TaskSystem` adds a task: loss, per-exit metrics. Its ``forward(batch)`` returns one
logits tensor per exit, the final exit last; a plain classifier has one exit. Metrics are
logged as ``{prefix}/{metric}`` for the final exit and ``{prefix}/exit_{i}/{metric}`` for
every exit (1-based layer numbers) when there are several, where ``prefix`` is ``val``,
``val_mm``, ``test``, ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MeanMetric
from transformers import get_scheduler

from rbert.data.tasks import TaskSpec
from rbert.errors import ConfigError
from rbert.inference.words import IGNORE
from rbert.metrics import build_metrics, predictions

# model.schedule -> transformers' scheduler name (each with linear warm-up)
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


class BaseSystem(pl.LightningModule):
    """Base LightningModule of every objective.

    Args:
        optimizer: a partial optimiser (``torch.optim.AdamW`` with lr, weight_decay...);
            1-D parameters (biases, norm weights) get no weight decay.
        warmup_ratio: linear warm-up over this fraction of the training steps, then ``schedule``.
        schedule: after warm-up, ``linear`` decay to 0 (BERT's), ``cosine`` or ``constant``
            (``transformers.get_scheduler``). With ``warmup_ratio=0.5``, ``linear`` is the
            triangular one-cycle schedule of Cramming.
    """

    # Objectives trained in several stages (DeeBERT; CoRe's two phases) set one of these to
    # one epoch (or step) count per stage; the training pipeline then runs one fit per stage.
    stage_epochs: list[int] | None = None
    stage_steps: list[int] | None = None
    # Whether a later stage goes on with the training data where the previous one stopped
    # (CoRe: one data stream over both phases) instead of starting it afresh (DeeBERT).
    continue_data = False

    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer], warmup_ratio: float,
                 schedule: str = "linear"):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ConfigError(f"model.schedule: unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        self.optimizer_factory = optimizer
        self.warmup_ratio = warmup_ratio
        self.schedule = schedule
        # Filled by the pipeline: the composed config, stored in every checkpoint so it can be rebuilt.
        self.run_config: dict | None = None
        self.stage = 0
        # Seconds spent training (validation excluded), carried across resumes: loss-vs-time curves.
        self.train_seconds = 0.0
        self._clock: float | None = None

    # ------------------------------------------------------------------ stages
    @property
    def num_stages(self) -> int:
        return len(self.stage_epochs or self.stage_steps or [None])

    def stage_overrides(self, stage: int) -> dict:
        """Trainer settings of one stage (its length) when there are several."""
        if self.stage_epochs:
            return {"max_epochs": self.stage_epochs[stage]}
        if self.stage_steps:
            return {"max_steps": self.stage_steps[stage], "max_epochs": -1}
        return {}

    def set_stage(self, stage: int) -> None:
        self.stage = stage

    def monitor(self) -> tuple[str, str] | None:
        """(metric, ``min`` or ``max``) that picks the best checkpoint in the current stage (None: keep the last)."""
        return None

    # ------------------------------------------------------------------ training clock
    def on_train_start(self) -> None:
        self._clock = time.perf_counter()

    def _stop_clock(self) -> None:
        if self._clock is not None:
            self.train_seconds += time.perf_counter() - self._clock
            self._clock = None

    def on_validation_start(self) -> None:
        self._stop_clock()

    def _fitting(self) -> bool:
        return self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING

    def on_validation_end(self) -> None:
        if self._fitting() and not self.trainer.sanity_checking:
            self._clock = time.perf_counter()

    def on_train_end(self) -> None:
        self._stop_clock()

    def steps_before_stage(self) -> int:
        """Optimiser steps of the earlier stages, when stages are counted in steps (each stage's
        Trainer counts its own steps from 0)."""
        return sum(self.stage_steps[: self.stage]) if self.stage_steps else 0

    def on_validation_epoch_end(self) -> None:
        # Beside every validation: training time and steps so far, for loss-vs-time curves.
        if self._fitting():
            self.log("time/train_seconds", self.train_seconds, sync_dist=True)  # ranks' clocks: their mean
            self.log("time/step", float(self.steps_before_stage() + self.global_step), sync_dist=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 else decay).append(param)  # biases, norms (every family's names)
        optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    def lr_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Warm-up over ``warmup_ratio`` of this fit's optimiser steps, then the schedule."""
        total = self.trainer.estimated_stepping_batches
        return get_scheduler(SCHEDULES[self.schedule], optimizer, int(self.warmup_ratio * total), total)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["rbert_config"] = self.run_config
        checkpoint["rbert_stage"] = self.stage
        checkpoint["rbert_train_seconds"] = self.train_seconds + (
            time.perf_counter() - self._clock if self._clock is not None else 0.0)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Before the optimiser is rebuilt and restored: it must be the stage's optimiser.
        self.set_stage(checkpoint.get("rbert_stage", 0))
        self.train_seconds = float(checkpoint.get("rbert_train_seconds", 0.0))


class TaskSystem(BaseSystem):
    """Base LightningModule of a fine-tuning objective on a task.

    Args:
        task: the task (loss type, metrics).
        optimizer, warmup_ratio: see :class:`BaseSystem`.
        exit_layers: the layer number of each exit, in order (``[L]`` for a single exit).
    """

    def __init__(self, task: TaskSpec, optimizer: Callable[..., torch.optim.Optimizer], warmup_ratio: float,
                 exit_layers: Sequence[int]):
        super().__init__(optimizer, warmup_ratio)
        self.task = task
        self.exit_layers = list(exit_layers)
        self.metrics = nn.ModuleDict()
        # The final exit's loss per evaluation set, averaged over samples: a metric, so that
        # under DDP it is the mean over every rank's samples (uneven shards included).
        self.eval_losses = nn.ModuleDict()
        multi = len(self.exit_layers) > 1
        for stage in ("val", "test"):
            for prefix in task.prefixes(stage):
                self.eval_losses[prefix] = MeanMetric()
                names = {i: f"{prefix}/exit_{layer}/" if multi else f"{prefix}/"
                         for i, layer in enumerate(self.exit_layers)}
                if multi:  # the final exit also under the plain name
                    names["final"] = f"{prefix}/"
                for key, name in names.items():
                    # Per-type F1 (tagging) for the final exit only: the other exits' are in eval's tables.
                    final = key == "final" or not multi
                    self.metrics[self._metric_key(prefix, key)] = build_metrics(task, name, per_type=final)

    def monitor(self) -> tuple[str, str] | None:
        return self.task.monitor_key, "max"  # every task metric improves upwards

    def trained_exit_layers(self) -> list[int]:
        """The exits the objective has trained so far (stored in checkpoints: early exit uses only these)."""
        return list(self.exit_layers)

    # ------------------------------------------------------------------ naming
    @staticmethod
    def _metric_key(prefix: str, exit_index: int | str) -> str:
        return f"{prefix}-{exit_index}"

    # ------------------------------------------------------------------ to be defined by subclasses
    def forward(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Logits of every exit, final exit last."""
        raise NotImplementedError

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective and any extra values to log."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared pieces
    def scored(self, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every exit's logits and the labels, one row per scored sample.

        A sample is a sentence, or, for a tagging task, a labelled word (its first piece). The
        objectives' losses (cross-entropy, distillation, layer weights, gradient
        regularisation) then hold per word with no token code of their own.
        """
        logits, labels = self(batch), batch["labels"]
        return [self.rows(z, batch) for z in logits], self.rows(labels, batch)

    def rows(self, values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``values`` per sample (a teacher's logits too): per labelled word for a tagging task."""
        if self.task.kind != "tagging":
            return values
        return values[batch["labels"] != IGNORE]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task.is_regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logs = self.training_loss(batch)
        size = batch["labels"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if logs:
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        return loss

    def _eval_step(self, stage: str, batch: dict[str, torch.Tensor], dataloader_idx: int) -> None:
        prefix = self.task.prefixes(stage)[dataloader_idx]
        labels = batch["labels"]
        all_logits = self(batch)
        losses = self.eval_losses[prefix]
        final, scored = self.rows(all_logits[-1], batch), self.rows(labels, batch)
        losses.update(self.loss(final, scored), weight=scored.shape[0])
        self.log(f"{prefix}/loss", losses, add_dataloader_idx=False)
        keys = list(range(len(all_logits))) + (["final"] if len(all_logits) > 1 else [])
        for key in keys:
            logits = all_logits[-1] if key == "final" else all_logits[key]
            collection = self.metrics[self._metric_key(prefix, key)]
            collection.update(predictions(logits, self.task, labels), labels, sentence=batch.get("sentence"),
                              window=batch.get("window"))
            self.log_dict(collection, batch_size=labels.shape[0], add_dataloader_idx=False)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rbert_trained_exits"] = self.trained_exit_layers()
