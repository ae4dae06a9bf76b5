"""The GPU evidence script's dry run: every step, tiny sizes, on CPU, so it cannot rot before a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.test_run import REPO


def test_dry_run_runs_every_step(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_evidence.py", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("gpu evidence: 6 steps, expected 7.5 min at most")
    report = json.loads((tmp_path / "gpu_evidence.json").read_text())
    assert [e["step"] for e in report] == ["smoke", "throughput", "early_exit", "core_kernels", "pretrain",
                                           "romebert_deebert"]
    failed = [(e["step"], c["cmd"], c["status"], c.get("tail", "")[-800:]) for e in report for c in e["commands"]
              if c["status"] != "ok"]
    assert not failed, failed
    results = {k for e in report for k in e["results"]}
    assert {"throughput_none.json", "early_exit.json", "core_kernels.json", "pre_scratch/results.json",
            "pre_core/results.json", "ft_scratch/results.json", "ft_core/results.json", "ft_random/results.json",
            "ref_romebert/results.json", "ref_deebert/results.json"} <= results, results
    assert (tmp_path / "gpu_evidence.md").read_text().startswith("| step | command | status | seconds |")
