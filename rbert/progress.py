"""Progress that reads well in a terminal and in a log file.

In a terminal (stderr is a TTY) progress is a live bar: tqdm here, Lightning's own bar in
training. Without one (SLURM, CI, ``> run.log``) a bar's carriage-return redraws pile up
into one unreadable line, or, for Rich, print nothing until the end; there progress is a
plain log line every ``interval`` seconds (and at the end):

    timing sweep points: 6/15 (40%), 2.1 s/it, 19 s left

:func:`track` wraps an iterable either way; :class:`LogProgress` is the same for Lightning's
training, validation and test loops; :func:`quiet_libraries` turns off the bars that
``datasets`` and ``transformers`` draw (data preparation) when there is no terminal.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar

log = logging.getLogger("rbert")
T = TypeVar("T")
INTERVAL = 30.0  # seconds between two progress lines in a log file


def interactive() -> bool:
    """Whether progress can be drawn as a live bar (stderr is a terminal)."""
    return sys.stderr.isatty()


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class LineProgress:
    """Counts steps and logs ``desc: n/total (pct), rate, time left`` at most every ``interval`` seconds."""

    def __init__(self, desc: str, total: int | float | None, interval: float = INTERVAL):
        self.desc, self.total, self.interval = desc, total, interval
        self.n = 0
        self.start = self.last = time.perf_counter()

    def line(self, extra: str = "") -> str:
        elapsed = time.perf_counter() - self.start
        rate = elapsed / self.n if self.n else 0.0
        rate_text = f"{rate:.2f} s/it" if rate >= 1 else f"{1 / rate:.1f} it/s" if rate else "-"
        if self.total and self.total != float("inf"):
            total = int(self.total)
            left = rate * (total - self.n)
            text = f"{self.desc}: {self.n}/{total} ({100 * self.n / total:.0f}%), {rate_text}, {duration(left)} left"
        else:
            text = f"{self.desc}: {self.n}, {rate_text}, {duration(elapsed)} so far"
        return f"{text}{', ' + extra if extra else ''}"

    def update(self, n: int = 1, extra: str = "", force: bool = False) -> None:
        self.n += n
        now = time.perf_counter()
        if force or now - self.last >= self.interval:
            self.last = now
            log.info(self.line(extra))


def track(iterable: Iterable[T], desc: str, total: int | None = None, interval: float = INTERVAL) -> Iterator[T]:
    """``iterable``, with a tqdm bar in a terminal or a progress line every ``interval`` s otherwise."""
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    if interactive():
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, total=total, leave=False)
        return
    progress = LineProgress(desc, total, interval)
    for item in iterable:
        yield item
        progress.update(force=progress.n + 1 == total)


def quiet_libraries() -> None:
    """Without a terminal, turn off the bars of ``datasets`` (tokenising) and ``transformers``."""
    if interactive():
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


class LogProgress(ProgressBar):
    """Lightning's loops as log lines: training every ``interval`` seconds (step, epoch, rate, time
    left, the progress-bar metrics), one line per validation or test with its metrics."""

    def __init__(self, interval: float = INTERVAL):
        super().__init__()
        self.interval = interval
        self._enabled = True
        self._train: LineProgress | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefixes: tuple[str, ...]) -> str:
        items = self.get_metrics(trainer, pl_module)
        items.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefixes)})
        items.pop("v_num", None)
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(items.items()))

    def on_train_start(self, trainer, pl_module) -> None:
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        total = max_steps or trainer.num_training_batches * max(trainer.max_epochs or 1, 1)
        self._train = LineProgress("train steps", total - trainer.global_step, self.interval)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._enabled and self._train is not None:
            self._train.update(extra=f"epoch {trainer.current_epoch}, "
                                     f"{self._metrics(trainer, pl_module, ('train/loss',))}")

    def on_train_end(self, trainer, pl_module) -> None:
        if self._enabled and self._train is not None:
            self._train.update(0, extra=f"epoch {trainer.current_epoch}", force=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._enabled and not trainer.sanity_checking:
            log.info("validation at step %s: %s", self._step(trainer, pl_module),
                     self._metrics(trainer, pl_module, ("val",)) or "no metrics")

    @staticmethod
    def _step(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """The run's step, not the stage's: a multi-stage system fits each stage anew."""
        stages = getattr(pl_module, "num_stages", 1)
        if stages <= 1:
            return str(trainer.global_step)
        return f"{pl_module.steps_before_stage() + trainer.global_step} (stage {pl_module.stage + 1}/{stages})"

    def on_test_end(self, trainer, pl_module) -> None:
        if self._enabled:
            log.info("test: %s", self._metrics(trainer, pl_module, ("test",)))


def progress_bar(interval: float = INTERVAL) -> ProgressBar:
    """Lightning's tqdm bar in a terminal, :class:`LogProgress` lines in a log file."""
    return TQDMProgressBar() if interactive() else LogProgress(interval)
