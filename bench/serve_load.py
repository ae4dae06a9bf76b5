"""A load test of ``rbert.deploy.server`` on loopback: early exit vs the same server at full depth.

Starts two servers on 127.0.0.1 (free ports), one with the exported policy and one with
``{"name": "none"}``. At each concurrency (``--concurrency``, default 1, 8, 32) that many
clients send SST-2 dev sentences, one a request, to one server until ``--requests`` are
answered or ``--seconds`` pass (it stops by itself), then to the other; ``--rounds`` times,
the order alternating. Reports every request's status, p50 / p99 latency, throughput, the
mean exit layer answered, and the server's micro-batch sizes.

    python bench/serve_load.py logs/export_minilm --glue ../shared/data/glue --out logs/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.deploy_speed import dev_set  # noqa: E402
from rbert.report import format_table, write_json  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int, policy: str | None, runtime: str, max_batch: int,
                 max_wait_ms: float) -> subprocess.Popen:
    import httpx2

    cmd = [sys.executable, "-m", "rbert.deploy.server", str(folder), "--port", str(port), "--runtime", runtime,
           "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)] + (["--policy", policy] if policy else [])
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed with the server); a pipe nobody reads would block it
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    server.log = log
    deadline = time.time() + 180
    while True:
        try:
            httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except httpx2.TransportError as err:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                log.seek(0)
                raise SystemExit(f"server did not start: {log.read()[-2000:]}") from err
            time.sleep(0.5)


async def load(port: int, texts: list[str], concurrency: int, requests: int, seconds: float) -> dict:
    import httpx2

    latencies, statuses, exits, next_text = [], {}, [], 0
    deadline = time.perf_counter() + seconds

    async def client(http):
        nonlocal next_text
        while len(latencies) + sum(v for k, v in statuses.items() if k != 200) < requests \
                and time.perf_counter() < deadline:
            text = texts[next_text % len(texts)]
            next_text += 1
            start = time.perf_counter()
            try:
                r = await http.post("/predict", json={"texts": [text]})
                status = r.status_code
            except httpx2.HTTPError as err:
                status = type(err).__name__
            if status == 200:
                latencies.append(time.perf_counter() - start)
                exits.append(r.json()["predictions"][0]["exit_layer"])
            else:
                statuses[status] = statuses.get(status, 0) + 1

    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits) as http:
        await http.post("/predict", json={"texts": [texts[0]]})  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"latencies_ms": [1000 * x for x in latencies], "failed": statuses, "exits": exits, "seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--glue", type=Path, default=Path("../shared/data/glue"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=200, help="per server, concurrency level and round")
    parser.add_argument("--rounds", type=int, default=2, help="per concurrency level, the servers' order alternating")
    parser.add_argument("--seconds", type=float, default=60, help="per server, concurrency level and round, at most")
    parser.add_argument("--runtime", choices=["onnx", "torch"], default="onnx")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("logs/serve_load.json"))
    args = parser.parse_args()
    import httpx2

    texts, _ = dev_set(args.glue)
    # Both servers run from the start (an idle one sleeps: its threads do not spin) and take
    # turns at each concurrency, early exit first in one round and full depth first in the
    # next, so a slow spell of the machine does not fall on one of them only.
    servers = {}
    try:
        for label, policy in (("early exit", None), ("full depth", json.dumps({"name": "none"}))):
            port = free_port()
            servers[label] = (port, start_server(args.folder, port, policy, args.runtime, args.max_batch,
                                                 args.max_wait_ms))
        rows = []
        for c in args.concurrency:
            runs = {label: [] for label in servers}
            for r in range(args.rounds):
                for label in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                    port = servers[label][0]
                    before = httpx2.get(f"http://127.0.0.1:{port}/health").json()["batching"]
                    result = asyncio.run(load(port, texts, c, args.requests, args.seconds))
                    after = httpx2.get(f"http://127.0.0.1:{port}/health").json()["batching"]
                    result["batches"] = after["batches"] - before["batches"]
                    result["texts"] = after["texts"] - before["texts"]
                    runs[label].append(result)
            for label, results in runs.items():
                row = summarise(label, c, results)
                rows.append(row)
                print(f"{label}, concurrency {c}: {row['answered']} answered, p50 {row['p50_ms']:.1f} ms, "
                      f"p99 {row['p99_ms']:.1f} ms, {row['throughput_rps']:.1f} req/s", flush=True)
    finally:
        for label, (_, server) in servers.items():
            server.terminate()
            server.wait(timeout=30)
            server.log.seek(0)
            errors = [line for line in server.log.read().splitlines() if "Error" in line or "failed" in line]
            server.log.close()
            if errors:  # what a failed request's 500 was
                print(f"{label} server logged {len(errors)} error lines, the last: {errors[-3:]}")
    for row in rows:
        full = next(r for r in rows if r["server"] == "full depth" and r["concurrency"] == row["concurrency"])
        row["throughput vs full depth"] = row["throughput_rps"] / full["throughput_rps"]
    print(format_table([{k: v for k, v in r.items() if k != "seconds"} for r in rows], floatfmt="{:.2f}"))
    write_json(args.out, {"folder": str(args.folder), "runtime": args.runtime, "max_batch": args.max_batch,
                          "max_wait_ms": args.max_wait_ms, "requests": args.requests, "rounds": args.rounds,
                          "rows": rows})


def summarise(label: str, concurrency: int, results: list[dict]) -> dict:
    """One row from a server's rounds at one concurrency: latencies pooled, throughput over their time."""
    ms = np.concatenate([r["latencies_ms"] for r in results])
    failed: dict = {}
    for r in results:
        for status, n in r["failed"].items():
            failed[status] = failed.get(status, 0) + n
    wall = sum(r["seconds"] for r in results)
    return {"server": label, "concurrency": concurrency, "answered": len(ms), "failed": failed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "throughput_rps": len(ms) / wall, "mean_exit_layer": float(np.mean(np.concatenate(
                [r["exits"] for r in results]))),
            "mean_batch": sum(r["texts"] for r in results) / max(1, sum(r["batches"] for r in results)),
            "seconds": wall}


if __name__ == "__main__":
    main()
