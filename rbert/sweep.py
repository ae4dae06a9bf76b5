"""The end of a Hydra multirun: one table across its jobs, so a user compares without opening W&B.

:class:`SweepSummary` (a Hydra callback, ``conf/hydra/default.yaml``) reads every job folder of
the sweep (``.hydra/overrides.yaml``, then ``results.json``, or ``failed.json`` for a job that
failed), groups the jobs by their overrides without ``seed``, and prints the mean and standard
deviation over seeds of each group's objective (the validation score sweepers optimise), its
final metrics and, for multi-exit models, the early-exit speed-up; ``summary.csv`` and
``summary.json`` in the sweep folder hold the same. A sweep with failed jobs lists them and
exits with status 1 once the summary is written.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rbert.report import atomic_write_text, format_table, write_json

log = logging.getLogger("rbert")


def job_metrics(results: dict) -> dict[str, float]:
    """The numbers of one job's ``results.json`` worth comparing: the objective, the final
    exit's (or pre-training's final) metrics, and the early-exit speed-up and drop."""
    metrics = {k: v for k, v in (results.get("objective") or {}).items() if v is not None}
    metrics.update({k: v for k, v in (results.get("test") or {}).items()  # the final exit, no losses
                    if "/exit_" not in k and not k.endswith("/loss")})
    metrics.update(results.get("final") or {})  # pre-training: every evaluation set's loss, perplexity, accuracy
    early = results.get("early_exit") or {}
    metrics.update({f"early_exit/{k}": early[k] for k in ("layer_speedup", "measured_speedup_bs1", "drop")
                    if k in early})
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def read_jobs(sweep_dir: Path) -> list[dict]:
    """Every job folder of a sweep: its number, overrides, and metrics or error."""
    jobs = []
    for folder in sorted((p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()),
                         key=lambda p: (len(p.name), p.name)):
        overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or []
        job = {"job": folder.name, "overrides": [str(o) for o in overrides]}
        if (folder / "failed.json").is_file():
            job["error"] = json.loads((folder / "failed.json").read_text())["error"]
        elif (folder / "results.json").is_file():
            job["metrics"] = job_metrics(json.loads((folder / "results.json").read_text()))
        else:
            job["error"] = "no results.json (the job did not finish)"
        jobs.append(job)
    return jobs


def summarise(jobs: list[dict], within: tuple[str, ...] = ("seed",)) -> list[dict]:
    """One row per configuration (overrides without those in ``within``): job count, seeds, and
    each metric's mean and standard deviation over its finished jobs."""
    groups: dict[str, list[dict]] = {}
    for job in jobs:
        key = " ".join(o for o in job["overrides"] if o.split("=", 1)[0].lstrip("+~") not in within)
        groups.setdefault(key or "(no overrides)", []).append(job)
    rows = []
    for key, members in groups.items():
        done = [j for j in members if "metrics" in j]
        row: dict[str, object] = {"configuration": key, "jobs": len(members), "failed": len(members) - len(done)}
        names = list(dict.fromkeys(name for j in done for name in j["metrics"]))
        for name in names:
            values = [j["metrics"][name] for j in done if name in j["metrics"]]
            row[f"{name} mean"] = statistics.mean(values)
            row[f"{name} std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, the table of :func:`summarise` (terminal, CSV, JSON).

    Args:
        within: overrides whose values vary *within* a configuration (averaged over): ``seed``.
    """

    def __init__(self, within: list[str] | tuple[str, ...] = ("seed",)):
        self.within = tuple(within)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        jobs = read_jobs(sweep_dir)
        if not jobs:
            return
        rows = summarise(jobs, self.within)
        print(f"\nsweep summary: {len(jobs)} jobs in {sweep_dir} (mean and std over {', '.join(self.within)})\n"
              f"{format_table(rows)}\n")
        buffer = io.StringIO()
        columns = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(sweep_dir / "summary.csv", buffer.getvalue())
        write_json(sweep_dir / "summary.json", {"configurations": rows, "jobs": jobs})
        failed = [j for j in jobs if "error" in j]
        for job in failed:
            log.error("job %s (%s) failed: %s", job["job"], " ".join(job["overrides"]), job["error"])
        if failed:
            raise SystemExit(f"{len(failed)} of {len(jobs)} jobs failed (see {sweep_dir / 'summary.json'})")
