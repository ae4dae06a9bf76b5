"""``model=bert_mlm``: masked-language-model pre-training of a BERT (from scratch or not).

Batches come masked from :class:`~rbert.data.text.TextDataModule` (``input_ids`` with 15%
of the tokens selected, ``labels`` -100 elsewhere). Validation logs, for each evaluation
set ``prefix`` (``val``, ``val_wikitext2``, ...), the MLM loss averaged over all masked
tokens of the set, its perplexity (exp of that loss) and the masked-token accuracy, beside
the training time so far (``time/train_seconds``), and two numbers that tell whether the
model has learnt anything beyond word frequencies:

* ``floor``: the loss of the best context-free guess, the training text's unigram
  distribution, on the same masked tokens; ``below_floor`` = floor - loss. Runs with
  different vocabularies compare on it, not on the loss;
* ``context_gain``: the loss with each block's unmasked tokens shuffled (masked positions
  and special tokens in place) minus the loss on the intact block. A model on the early
  word-frequency plateau gains ~0 from context; one that has left it gains a lot.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torchmetrics import MeanMetric

from rbert.models.mlm import IGNORE_INDEX, BertForMaskedLM
from rbert.systems.base import BaseSystem

EVAL_METRICS = ("loss", "accuracy", "floor", "shuffled_loss")


def shuffle_context(input_ids: torch.Tensor, labels: torch.Tensor, special_ids: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """``input_ids`` with each row's context tokens (not masked for prediction, not special)
    permuted among their own positions: the same words, without their order."""
    out = input_ids.clone()
    movable = (labels == IGNORE_INDEX) & ~torch.isin(input_ids, special_ids)
    for row in range(input_ids.shape[0]):
        where = movable[row].nonzero().squeeze(1)
        out[row, where] = input_ids[row, where[torch.randperm(where.numel(), generator=generator)]]
    return out


class MaskedLM(BaseSystem):
    def __init__(self, net: BertForMaskedLM, optimizer: Callable[..., torch.optim.Optimizer],
                 warmup_ratio: float = 0.06, context_gain: bool = True, schedule: str = "linear"):
        super().__init__(optimizer, warmup_ratio, schedule)
        self.net = net
        self.context_gain = context_gain  # a second forward pass per validation batch
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
            self.eval_metrics[prefix] = nn.ModuleDict({k: MeanMetric() for k in EVAL_METRICS}).to(self.device)
        return self.eval_metrics[prefix]

    def _unigram(self) -> torch.Tensor | None:
        """-log p(token) under the training text's unigram distribution (the datamodule's), if it has one."""
        datamodule = self.trainer.datamodule if self._trainer else None
        table = getattr(datamodule, "unigram_nll", None)
        return table.to(self.device) if table is not None else None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self(batch)
        metrics = self._metrics(self._eval_prefixes()[dataloader_idx])
        count = out.labels.numel()
        if not count:
            return
        # weighted by the masked tokens, so the set's loss is the mean over all of them
        metrics["loss"].update(out.loss.detach(), weight=count)
        metrics["accuracy"].update((out.logits.argmax(-1) == out.labels).float().mean(), weight=count)
        unigram = self._unigram()
        if unigram is not None:
            metrics["floor"].update(unigram[out.labels].mean(), weight=count)
        if self.context_gain:
            datamodule = self.trainer.datamodule
            special = torch.tensor(sorted(datamodule.tokenizer.all_special_ids), device=self.device)
            generator = torch.Generator().manual_seed(batch_idx)  # the same shuffles at every validation
            shuffled = shuffle_context(batch["input_ids"].cpu(), batch["labels"].cpu(), special.cpu(), generator)
            out = self({**batch, "input_ids": shuffled.to(self.device)})
            metrics["shuffled_loss"].update(out.loss.detach(), weight=count)

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
            if metrics["floor"].update_count:
                floor = metrics["floor"].compute()
                self.log(f"{prefix}/floor", floor, sync_dist=True)
                self.log(f"{prefix}/below_floor", floor - loss, sync_dist=True)
                point[f"{prefix}/below_floor"] = float(floor - loss)
            if metrics["shuffled_loss"].update_count:
                gain = metrics["shuffled_loss"].compute() - loss
                self.log(f"{prefix}/context_gain", gain, sync_dist=True)
                point[f"{prefix}/context_gain"] = float(gain)
            for metric in metrics.values():
                metric.reset()
        if not self.trainer.sanity_checking:
            self.validated_at = self.global_step
            if self._fitting():
                self.history.append(point)
        super().on_validation_epoch_end()
