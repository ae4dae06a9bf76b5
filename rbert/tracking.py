"""Weights & Biases beyond what Lightning's ``WandbLogger`` logs (the resolved config, every
``self.log`` metric): tables with line plots, histograms and run summaries.

Every function takes the run's loggers and does nothing unless one is a ``WandbLogger``, so
callers need no W&B checks; on DDP ranks other than 0 the logger's experiment is a no-op.
``WANDB_MODE=offline`` keeps all of it on disk (``wandb sync`` uploads it later).
"""

from __future__ import annotations

from collections.abc import Sequence

from pytorch_lightning.loggers import WandbLogger


def _experiments(loggers: Sequence) -> list:
    return [lg.experiment for lg in loggers if isinstance(lg, WandbLogger)]


def log_curve(loggers: Sequence, key: str, rows: list[dict], x: str, y: str, title: str) -> None:
    """``rows`` as a W&B table (``<key>_table``) and a line plot of ``y`` against ``x`` (``key``)."""
    experiments = _experiments(loggers)
    if not experiments or not rows:
        return
    import wandb

    columns = list(rows[0])
    table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
    for experiment in experiments:
        experiment.log({f"{key}_table": table, key: wandb.plot.line(table, x, y, title=title)})


def log_histogram(loggers: Sequence, key: str, values, summary: dict | None = None) -> None:
    """A histogram of ``values`` (e.g. the layer each dev sample left at), and ``summary`` into the run summary."""
    experiments = _experiments(loggers)
    if not experiments:
        return
    import wandb

    for experiment in experiments:
        experiment.log({key: wandb.Histogram([float(v) for v in values])})
        if summary:
            experiment.summary.update({f"{key.rsplit('/', 1)[0]}/{k}": v for k, v in summary.items()
                                       if isinstance(v, int | float | str | bool)})


def log_summary(loggers: Sequence, values: dict) -> None:
    """Final numbers into the W&B run summary (what the runs table shows)."""
    for experiment in _experiments(loggers):
        experiment.summary.update(values)
