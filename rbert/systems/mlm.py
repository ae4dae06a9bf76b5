"""``model=bert_mlm``: masked-language-model pre-training of a BERT (from scratch or not).

Batches come masked from :class:`~rbert.data.text.TextDataModule` (``input_ids`` with 15%
of the tokens selected, ``labels`` -100 elsewhere). Validation logs, for each evaluation
set ``prefix`` (``val``, ``val_wikitext2``, ...), the MLM loss averaged over all masked
tokens of the set, its perplexity (exp of that loss) and the masked-token accuracy, beside
the training time so far (``time/train_seconds``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torchmetrics import MeanMetric

from rbert.models.mlm import BertForMaskedLM
from rbert.systems.base import BaseSystem


class MaskedLM(BaseSystem):
    def __init__(self, net: BertForMaskedLM, optimizer: Callable[..., torch.optim.Optimizer],
                 warmup_ratio: float = 0.06):
        super().__init__(optimizer, warmup_ratio)
        self.net = net
        self.eval_metrics = nn.ModuleDict()  # prefix -> {loss, accuracy}, made on first use
        self.validated_at = -1  # global step of the last validation (the final one need not run twice)
        # (step over all stages, training minutes, each set's loss) at every validation of this fit
        # (loggers plot it against time: rbert.tracking.log_curve in mode=pretrain).
        self.history: list[dict] = []

    def monitor(self) -> tuple[str, str] | None:
        return "val/loss", "min"

    def check_exportable(self) -> None:
        """Raise ValueError if the trained model will have no Hugging Face format."""
        self.net.bert.check_standard()

    def export_net(self) -> BertForMaskedLM:
        """The model as a standard BERT, to save in the Hugging Face format."""
        self.check_exportable()
        return self.net

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.net(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"),
                        labels=batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        return self.global_token_mean(out.loss, out.labels.numel())

    def global_token_mean(self, loss: torch.Tensor, count: int) -> torch.Tensor:
        """Under DDP, ``loss`` (this rank's mean over its ``count`` masked tokens) rescaled so that
        DDP's average of the ranks' gradients is the gradient of the mean over *all* masked tokens,
        as in one process with the whole batch: ranks mask different numbers of tokens."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return loss
        total = self.trainer.strategy.reduce(torch.tensor(float(count), device=loss.device), reduce_op="sum")
        return loss * (count * world / total)

    # ------------------------------------------------------------------ evaluation
    def _eval_prefixes(self) -> list[str]:
        datamodule = self.trainer.datamodule if self._trainer else None
        return list(getattr(datamodule, "eval_splits", None) or ["val"])

    def _metrics(self, prefix: str) -> nn.ModuleDict:
        if prefix not in self.eval_metrics:
            self.eval_metrics[prefix] = nn.ModuleDict({"loss": MeanMetric(), "accuracy": MeanMetric()}).to(self.device)
        return self.eval_metrics[prefix]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self(batch)
        metrics = self._metrics(self._eval_prefixes()[dataloader_idx])
        count = out.labels.numel()
        if count:  # weighted by the masked tokens, so the set's loss is the mean over all of them
            metrics["loss"].update(out.loss.detach(), weight=count)
            metrics["accuracy"].update((out.logits.argmax(-1) == out.labels).float().mean(), weight=count)

    def on_validation_epoch_end(self) -> None:
        point = {"step": self.steps_before_stage() + self.global_step, "train_minutes": self.train_seconds / 60}
        for prefix, metrics in self.eval_metrics.items():
            if metrics["loss"].update_count == 0:
                continue
            # compute() gathers every DDP rank's tokens, so each rank logs the same global value.
            loss = metrics["loss"].compute()
            point[f"{prefix}/loss"] = float(loss)
            self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", sync_dist=True)
            self.log(f"{prefix}/perplexity", torch.exp(loss.clamp(max=math.log(1e30))), sync_dist=True)
            self.log(f"{prefix}/accuracy", metrics["accuracy"].compute(), sync_dist=True)
            metrics["loss"].reset()
            metrics["accuracy"].reset()
        if not self.trainer.sanity_checking:
            self.validated_at = self.global_step
            if self._fitting():
                self.history.append(point)
        super().on_validation_epoch_end()
