"""Lightning callbacks of rbert's own (the rest are Lightning's, configured in conf/callbacks/)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class CheckpointOnSigterm(pl.Callback):
    """Write ``last.ckpt`` when training is stopped by SIGTERM (cluster pre-emption, ``kill``).

    Lightning finishes the batch in flight, then raises ``SIGTERMException``; the loop state
    is consistent there, so ``ckpt_path=<dirpath>/last.ckpt`` resumes at the next batch.
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Also mid-validation (Lightning raises there too); the loops resume mid-evaluation.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            trainer.save_checkpoint(self.path)
            log.warning("SIGTERM: checkpoint written to %s (resume with ckpt_path=%s)", self.path, self.path)
