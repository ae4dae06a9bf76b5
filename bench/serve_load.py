"""A load test of ``rbert.deploy.server`` on loopback: early exit vs the same server at full depth.

Starts the server on 127.0.0.1 (a free port) once with the exported policy and once with
``{"name": "none"}``; at each concurrency (``--concurrency``, default 1, 8, 32) that many
clients send SST-2 dev sentences, one a request, until ``--requests`` are answered or
``--seconds`` pass (it stops by itself). Reports every request's status, p50 / p99 latency,
throughput, the mean exit layer answered, and the server's micro-batch sizes.

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
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 180
    while True:
        try:
            httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except httpx2.TransportError as err:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise SystemExit(f"server did not start: {server.stderr.read()[-2000:]}") from err
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
    ms = np.array(latencies) * 1000
    return {"answered": len(latencies), "failed": statuses, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "throughput_rps": len(latencies) / wall,
            "mean_exit_layer": float(np.mean(exits)), "seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--glue", type=Path, default=Path("../shared/data/glue"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="per concurrency level")
    parser.add_argument("--seconds", type=float, default=60, help="per concurrency level, at most")
    parser.add_argument("--runtime", choices=["onnx", "torch"], default="onnx")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("logs/serve_load.json"))
    args = parser.parse_args()
    import httpx2

    texts, _ = dev_set(args.glue)
    rows = []
    for label, policy in (("early exit", None), ("full depth", json.dumps({"name": "none"}))):
        port = free_port()
        server = start_server(args.folder, port, policy, args.runtime, args.max_batch, args.max_wait_ms)
        try:
            for c in args.concurrency:
                before = httpx2.get(f"http://127.0.0.1:{port}/health").json()["batching"]
                result = asyncio.run(load(port, texts, c, args.requests, args.seconds))
                after = httpx2.get(f"http://127.0.0.1:{port}/health").json()["batching"]
                result["mean_batch"] = (after["texts"] - before["texts"]) / max(1, after["batches"] - before["batches"])
                rows.append({"server": label, "concurrency": c, **result})
                print(f"{label}, concurrency {c}: {result['answered']} answered, p50 {result['p50_ms']:.1f} ms, "
                      f"p99 {result['p99_ms']:.1f} ms, {result['throughput_rps']:.1f} req/s", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    for row in rows:
        full = next(r for r in rows if r["server"] == "full depth" and r["concurrency"] == row["concurrency"])
        row["throughput vs full depth"] = row["throughput_rps"] / full["throughput_rps"]
    print(format_table([{k: v for k, v in r.items() if k != "seconds"} for r in rows], floatfmt="{:.2f}"))
    write_json(args.out, {"folder": str(args.folder), "runtime": args.runtime, "max_batch": args.max_batch,
                          "max_wait_ms": args.max_wait_ms, "requests": args.requests, "rows": rows})


if __name__ == "__main__":
    main()
