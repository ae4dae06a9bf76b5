"""Cold start and memory of a serving process: the torch-free server against ``mode=serve``.

For each exported folder (``--folders``, e.g. fp32 and int8) and each way to serve it, starts
the process on a free port and times process start to the first answered ``POST /predict``
(one SST-2 sentence), then reads the process's resident memory (VmRSS, and its peak VmHWM)
from /proc; ``--repeats`` starts each, the order rotating, median reported. Ways:

* ``rbert-serve``: ``python -m rbert.deploy.server FOLDER`` (onnxruntime, tokenizers, FastAPI;
  no torch, transformers, Lightning or Hydra imported);
* ``mode=serve``: ``python run.py mode=serve serve.folder=FOLDER`` of this checkout (Hydra
  on top of the same server);
* ``mode=serve, before``: the same command in ``--before-dir``, a checkout of a commit from
  before the torch-free runtime (policies in torch, the tokenizer from transformers), on
  ``--before-folder``, the same checkpoint exported by that checkout (fp32: it had no int8),
  so that "today's" server is measured in the same run. Ratios are against that row.

    git worktree add /tmp/before 9c5036c && (cd /tmp/before && python run.py mode=export ...)
    python bench/serve_start.py --folders logs/deploy_int8/ee_fp32 logs/deploy_int8/ee_int8 \
        --before-dir /tmp/before --before-folder logs/deploy_int8/ee_fp32_before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_load import free_port  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402


def memory_mb(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start(cmd: list[str], cwd: Path, port: int, timeout: float = 120) -> dict:
    """Seconds from starting ``cmd`` to its first answer, and its memory then."""
    body = json.dumps({"texts": ["a gripping , funny and touching film"]}).encode()
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed below)
    began = time.perf_counter()
    server = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(cwd)})
    try:
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=body, method="POST",
                                                 headers={"content-type": "application/json"})
                with urllib.request.urlopen(request, timeout=5) as r:
                    json.load(r)
                break
            except OSError:
                if server.poll() is not None or time.perf_counter() - began > timeout:
                    log.seek(0)
                    raise SystemExit(f"{' '.join(cmd)} did not answer:\n{log.read()[-3000:]}") from None
                time.sleep(0.02)
        seconds = time.perf_counter() - began
        rss, peak = memory_mb(server.pid)
        return {"seconds": seconds, "rss_mb": rss, "peak_mb": peak}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", type=Path, nargs="+", required=True)
    parser.add_argument("--before-dir", type=Path, required=True, help="a checkout of the commit to compare with")
    parser.add_argument("--before-folder", type=Path, required=True, help="the folder that checkout exported")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_start.json")
    args = parser.parse_args()
    ways = {"rbert-serve": (REPO, lambda f, p: [sys.executable, "-m", "rbert.deploy.server", str(f), "--port",
                                                str(p)]),
            "mode=serve": (REPO, lambda f, p: [sys.executable, "run.py", "mode=serve", f"serve.folder={f}",
                                               f"serve.port={p}", "hydra.run.dir=" + tempfile.mkdtemp()])}
    jobs = [(folder, way) for folder in args.folders for way in ways]
    jobs.append((args.before_folder, "mode=serve, before"))
    ways["mode=serve, before"] = (args.before_dir.resolve(), ways["mode=serve"][1])
    runs: dict[tuple, list[dict]] = {}
    for r in range(args.repeats):
        for folder, way in jobs[r % len(jobs):] + jobs[:r % len(jobs)]:  # the order rotating
            cwd, command = ways[way]
            port = free_port()
            runs.setdefault((folder.name, way), []).append(start(command(folder.resolve(), port), cwd, port))
    rows = []
    for (folder, way), results in runs.items():
        rows.append({"folder": folder, "way": way,
                     **{k: statistics.median(x[k] for x in results) for k in ("seconds", "rss_mb", "peak_mb")}})
    base = rows[-1]
    for row in rows:
        row["start vs before"] = row["seconds"] / base["seconds"]
        row["memory vs before"] = row["rss_mb"] / base["rss_mb"]
    print(f"process start to first answer, median of {args.repeats}; memory when it answered")
    print(format_table(rows, floatfmt="{:.2f}"))
    write_json(args.out, {"rows": rows, "runs": {f"{k[0]} / {k[1]}": v for k, v in runs.items()},
                          "before": str(args.before_dir), "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
