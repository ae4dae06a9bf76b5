"""Training data that resumes mid-epoch at the same position (both datamodules use this).

Lightning restores the model, optimiser and loop counters from a checkpoint, but a plain
DataLoader starts its epoch over. :class:`ResumableData` stores where training stands in its
datamodule's ``state_dict`` (which Lightning saves in every checkpoint): the epoch and the
batches already trained on (``batch_progress.current.processed``: a checkpoint is written
after its batch's step, and Lightning prefetches one batch, so the loader's own position
would be one ahead). :class:`ResumableSampler` then skips those batches.
"""

from __future__ import annotations

from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler's seeded per-epoch shuffle (one process: ``num_replicas=1``) that can
    start epoch ``resume_epoch`` after the first ``resume_batches`` batches of this rank."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, resume_epoch: int = -1, resume_batches: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.resume_epoch = resume_epoch
        self.resume_batches = resume_batches

    def __iter__(self):
        indices = list(super().__iter__())
        if self.epoch == self.resume_epoch:
            indices = indices[self.resume_batches * self.batch_size:]
        return iter(indices)


class ResumableData:
    """Mixin for a LightningDataModule: the training position in checkpoints, and a sampler that starts there."""

    _resume: tuple[int, int] = (-1, 0)  # (epoch, batches trained on in it), from a checkpoint

    def train_sampler(self, dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True) -> ResumableSampler:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # Lightning leaves a DistributedSampler in place under DDP: this one splits the data itself.
        return ResumableSampler(dataset, batch_size, seed, num_replicas=world, rank=rank, shuffle=shuffle,
                                resume_epoch=self._resume[0], resume_batches=self._resume[1])

    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        epochs = trainer.fit_loop.epoch_progress.current
        # Between epochs (the last one started has completed) the batch counts are the old epoch's.
        in_epoch = epochs.ready > epochs.completed
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed if in_epoch else 0
        return {"epoch": trainer.current_epoch, "batches": batches}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume = (int(state["epoch"]), int(state["batches"]))

    def forget_position(self) -> None:
        """After the resumed stage: a later stage (a new fit, epochs from 0) starts its data afresh."""
        self._resume = (-1, 0)
