"""Training data that resumes mid-epoch at the same position, and evaluation data split over
DDP ranks without repeats (both datamodules use this).

Lightning restores the model, optimiser and loop counters from a checkpoint, but a plain
DataLoader starts its epoch over. :class:`ResumableData` stores where training stands in its
datamodule's ``state_dict`` (which Lightning saves in every checkpoint): the epoch and the
batches already trained on (``batch_progress.current.processed``: a checkpoint is written
after its batch's step, and Lightning prefetches one batch, so the loader's own position
would be one ahead). :class:`ResumableSampler` then skips those batches.

A later training stage (a new ``Trainer.fit``, whose epochs count from 0 again) either starts
the data afresh (DeeBERT's stages each make a pass) or, with :meth:`ResumableData.continue_from`,
goes on where the previous stage stopped (CoRe's phase 2 sees the batches the from-scratch
run would see at those steps): an epoch offset maps the new fit's epochs onto the data's.
"""

from __future__ import annotations

from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler's seeded per-epoch shuffle (one process: ``num_replicas=1``) that can
    start epoch ``resume_epoch`` after the first ``resume_batches`` batches of this rank.

    ``with_epoch``: yield ``(data epoch, index)`` instead of ``index``, for a dataset whose items
    depend on the epoch (the text datamodule's masks)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, resume_epoch: int = -1, resume_batches: int = 0, epoch_offset: int = 0,
                 with_epoch: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.resume_epoch = resume_epoch
        self.resume_batches = resume_batches
        self.epoch_offset = epoch_offset
        self.epoch = epoch_offset
        self.with_epoch = with_epoch

    def set_epoch(self, epoch: int) -> None:
        """``epoch`` is the fit's own count; the data's epoch is ``epoch_offset`` further on."""
        super().set_epoch(epoch + self.epoch_offset)

    def __iter__(self):
        indices = list(super().__iter__())
        if self.epoch == self.resume_epoch:
            indices = indices[self.resume_batches * self.batch_size:]
        return iter([(self.epoch, i) for i in indices] if self.with_epoch else indices)


class ResumableData:
    """Mixin for a LightningDataModule: the training position in checkpoints, and a sampler that starts there."""

    _resume: tuple[int, int] = (-1, 0)  # (data epoch, batches trained on in it): where the sampler starts
    # Stages that continue the data: the data epoch of this fit's epoch 0, and the batches of that
    # epoch an earlier stage trained on (this fit's own batch counter does not include them).
    _epoch_offset = 0
    _carry: tuple[int, int] = (-1, 0)

    def train_sampler(self, dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True,
                      with_epoch: bool = False) -> ResumableSampler:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # Lightning leaves a DistributedSampler in place under DDP: this one splits the data itself.
        return ResumableSampler(dataset, batch_size, seed, num_replicas=world, rank=rank, shuffle=shuffle,
                                resume_epoch=self._resume[0], resume_batches=self._resume[1],
                                epoch_offset=self._epoch_offset, with_epoch=with_epoch)

    def eval_sampler(self, dataset: Dataset) -> UnrepeatedDistributedSampler | None:
        """Under DDP, each rank's share of an evaluation set, every sample exactly once (Lightning's
        own sampler would pad the set with repeats to split it evenly); None in one process."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return None
        return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                            shuffle=False)

    def _trained_in(self, epoch: int, processed: int) -> int:
        """Batches of data epoch ``epoch`` trained on, given this fit's own count in it."""
        return processed + (self._carry[1] if epoch == self._carry[0] else 0)

    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        epochs = trainer.fit_loop.epoch_progress.current
        # Between epochs (the last one started has completed) the batch counts are the old epoch's.
        in_epoch = epochs.ready > epochs.completed
        epoch = trainer.current_epoch + self._epoch_offset
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed if in_epoch else 0
        return {"epoch": epoch, "batches": self._trained_in(epoch, processed) if in_epoch else 0,
                "epoch_offset": self._epoch_offset, "carry": list(self._carry)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume = (int(state["epoch"]), int(state["batches"]))
            self._epoch_offset = int(state.get("epoch_offset", 0))
            self._carry = tuple(state.get("carry", (-1, 0)))

    def forget_position(self) -> None:
        """After the resumed stage: a later stage (a new fit, epochs from 0) starts its data afresh."""
        self._resume, self._epoch_offset, self._carry = (-1, 0), 0, (-1, 0)

    def continue_from(self, trainer) -> None:
        """The next stage (a new fit) goes on with the data where ``trainer``'s finished fit stopped."""
        last = max(trainer.fit_loop.epoch_progress.current.ready - 1, 0) + self._epoch_offset  # last epoch started
        batches = self._trained_in(last, trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        if batches >= trainer.num_training_batches:  # that epoch ran to its end
            last, batches = last + 1, 0
        self._resume = self._carry = (last, batches)
        self._epoch_offset = last
