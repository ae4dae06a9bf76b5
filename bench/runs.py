"""One record of benchmark runs, keyed by their configuration, so a sweep skips what finished.

A bench that trains many configurations over several sessions (each of which may end
without warning) keeps one JSON-lines file per plan: a line per finished job, written
whole (append + flush + fsync of one line), holding the job's key, its ``run.py``
overrides, what it measured, and where its checkpoint lies. A job whose key is in the
file is skipped; a job that was killed left no line, and its run folder's ``last.ckpt``
lets ``run.py ckpt_path=auto`` go on where it stopped. The key hashes the overrides, so
changing a configuration makes it a new job rather than silently reusing an old result; it
does not hash the config files' defaults, so a plan states every setting it compares (or
takes a new name when a default it relies on changes).

The frontier bench (``bench/frontier.py``) uses it; so can any bench that trains.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def job_key(name: str, overrides: Sequence[str]) -> str:
    """``name`` plus a short hash of the overrides (order-free)."""
    digest = hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


class RunRecord:
    """The finished jobs of one plan (a JSON-lines file)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def entries(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:  # a line cut by a crash mid-write: say which, skip it
                print(f"{self.path}:{number}: unreadable record line skipped ({err})", file=sys.stderr)
        return out

    def done(self) -> dict[str, dict]:
        return {e["key"]: e for e in self.entries()}

    def add(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, sort_keys=True) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def train(overrides: Sequence[str], run_dir: Path, log_file: Path | None = None) -> None:
    """``python run.py`` with ``overrides`` in ``run_dir``, resuming from its ``last.ckpt`` if a
    previous attempt was killed (``ckpt_path=auto``). Raises if the run fails."""
    cmd = [sys.executable, str(REPO / "run.py"), *overrides, f"hydra.run.dir={run_dir}", "ckpt_path=auto"]
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_file or run_dir / "bench.log"
    with open(log_file, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log_file.read_text().splitlines()[-5:]
        raise RuntimeError(f"run.py failed ({done.returncode}) in {run_dir}; see {log_file}:\n" + "\n".join(tail))


def checkpoint(run_dir: Path) -> Path:
    """The checkpoint a finished run.py training folder answers with (DeeBERT: its second stage)."""
    for candidate in ("checkpoints/stage2/best.ckpt", "checkpoints/stage2/last.ckpt", "checkpoints/best.ckpt"):
        if (run_dir / candidate).is_file():
            return run_dir / candidate
    raise FileNotFoundError(f"no checkpoint under {run_dir}")


def machine() -> dict:
    """The CPU's model and the instruction sets timings depend on."""
    info = {"cpu": "unknown", "cores": os.cpu_count(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and info["cpu"] == "unknown":
            info["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["flags"] = sorted(f for f in flags if f.startswith(("avx512", "avx_vnni", "amx")) or f == "avx2")
            break
    return info
