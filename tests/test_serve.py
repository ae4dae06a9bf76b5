"""mode=export end to end, and the HTTP endpoint: answers, micro-batching, and a clear 4xx for
every kind of bad request (never a crash)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from rbert.deploy import EarlyExitModel, OnnxEarlyExitModel, read_spec
from rbert.deploy.server import BadRequest, Limits, MicroBatcher, create_app
from tests.test_run import run_cli


@pytest.fixture(scope="module")
def exported_run(romebert_ckpt, glue_dir, tmp_path_factory):
    """``mode=export`` of the tiny RomeBERT checkpoint, the threshold chosen by a budget on the dev set."""
    out = tmp_path_factory.mktemp("exported")
    proc = run_cli(out / "run", "mode=export", f"ckpt_path={romebert_ckpt}", f"export_dir={out / 'model'}",
                   "exit_policy=budget", "exit_policy.max_drop=5", f"data_dir={glue_dir}")
    return out / "model", proc


def test_export_writes_a_folder_with_the_chosen_policy(exported_run, romebert_ckpt, glue_dir, tmp_path):
    folder, proc = exported_run
    assert "early-exit model written to" in proc.stdout
    spec = read_spec(folder)
    assert spec.objective == "RomeBERT" and spec.task == "sst2" and spec.labels == ["0", "1"]
    assert spec.policy["name"] == "entropy" and spec.policy_choice["target"] == "budget(entropy, drop<=5)"
    assert spec.policy["threshold"] == spec.policy_choice["threshold"]
    assert [s.exit for s in spec.segments] == spec.consulted_exits == spec.trained_exits
    assert {"model.safetensors", "config.json", "tokenizer.json", "onnx"} <= {p.name for p in folder.iterdir()}
    # The exported folder answers as mode=predict does with that policy.
    texts = tmp_path / "texts.txt"
    sentences = ["a fine , moving film", "dull and lifeless", "it 's not bad", "an utter mess of a movie"]
    texts.write_text("\n".join(sentences) + "\n")
    threshold = spec.policy["threshold"]
    run_cli(tmp_path / "pred", "mode=predict", f"ckpt_path={romebert_ckpt}", f"predict.input={texts}",
            f"exit_policy.threshold={threshold}", f"data_dir={glue_dir}")
    rows = [line.split("\t") for line in (tmp_path / "pred" / "predictions.tsv").read_text().splitlines()[1:]]
    for cls in (EarlyExitModel, OnnxEarlyExitModel):
        answers = cls.from_pretrained(folder).predict(sentences)
        assert [a["label"] for a in answers] == [r[1] for r in rows], cls.__name__
        assert [a["exit_layer"] for a in answers] == [int(r[3]) for r in rows], cls.__name__


@pytest.mark.parametrize(("task", "policy"), [
    ("mrpc", ["exit_policy=entropy", "exit_policy.threshold=0.6"]),
    ("stsb", ["exit_policy=patience", "exit_policy.patience=1", "exit_policy.tolerance=0.2"]),
])
def test_pair_and_regression_exports_answer_as_mode_predict(task, policy, glue_dir, tmp_path):
    """A two-text task and a regression through mode=export: both runtimes give mode=predict's
    answers (label or score, and exit layer) on the same pairs."""
    run_cli(tmp_path / "run", f"task={task}", "model=romebert", f"data_dir={glue_dir}", "trainer.max_epochs=2",
            "model.optimizer.lr=2e-3", "logger=none", "test=false", "eval.after_train=false")
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    run_cli(tmp_path / "exp", "mode=export", f"ckpt_path={ckpt}", f"export_dir={tmp_path / 'm'}",
            f"data_dir={glue_dir}", *policy)
    pairs = [["a man is singing", "a person sings"], ["the cat sat", "stocks fell sharply today"],
             ["he said it was fine", "he said that it was fine"], ["rain", "a long , wet afternoon in the city"]]
    (tmp_path / "pairs.txt").write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    run_cli(tmp_path / "pred", "mode=predict", f"ckpt_path={ckpt}", f"predict.input={tmp_path / 'pairs.txt'}",
            f"data_dir={glue_dir}", *policy)
    rows = [line.split("\t") for line in (tmp_path / "pred" / "predictions.tsv").read_text().splitlines()[1:]]
    assert read_spec(tmp_path / "m").text_fields == ["sentence1", "sentence2"]
    for cls in (EarlyExitModel, OnnxEarlyExitModel):
        answers = cls.from_pretrained(tmp_path / "m").predict(pairs)
        assert [a["exit_layer"] for a in answers] == [int(r[4]) for r in rows], cls.__name__
        if task == "stsb":
            assert [round(a["score"], 3) for a in answers] == pytest.approx([float(r[2]) for r in rows], abs=2e-3)
        else:
            assert [a["label"] for a in answers] == [r[2] for r in rows], cls.__name__


def test_export_refuses_a_used_folder_and_bad_options(exported_run, romebert_ckpt, tmp_path):
    folder, _ = exported_run
    proc = run_cli(tmp_path / "run", "mode=export", f"ckpt_path={romebert_ckpt}", f"export_dir={folder}", check=False)
    assert proc.returncode == 2 and "error: export_dir: " in proc.stderr and "is not an empty folder" in proc.stderr
    proc = run_cli(tmp_path / "run2", "mode=export", f"ckpt_path={romebert_ckpt}", "--config-name", "pretrain",
                   backbone=False, check=False)
    assert proc.returncode == 2 and "is a fine-tuned checkpoint" in proc.stderr


def test_single_exit_checkpoint_exports(glue_dir, tmp_path):
    run_cli(tmp_path / "bert", "model=bert", f"data_dir={glue_dir}", "trainer.max_epochs=1", "logger=none",
            "test=false", "eval.after_train=false")
    run_cli(tmp_path / "exp", "mode=export", f"ckpt_path={tmp_path / 'bert' / 'checkpoints' / 'best.ckpt'}",
            f"export_dir={tmp_path / 'model'}", "export_onnx=false")
    spec = read_spec(tmp_path / "model")
    assert spec.exit_layers == spec.consulted_exits == [4] and spec.policy == {"name": "none"} and not spec.onnx
    answers = EarlyExitModel.from_pretrained(tmp_path / "model").predict(["fine", "bad"])
    assert [a["exit_layer"] for a in answers] == [4, 4]


# ---------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def client(exported_run):
    folder, _ = exported_run
    app = create_app(OnnxEarlyExitModel.from_pretrained(folder), Limits(max_texts=4, max_request_bytes=2000,
                                                                        max_batch=8, max_wait_ms=20))
    with TestClient(app) as c:
        yield c


def test_health_and_predict(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["task"] == "sst2" and health["policy"].startswith("entropy")
    r = client.post("/predict", json={"texts": ["a fine film", "dull"]})
    assert r.status_code == 200
    answers = r.json()["predictions"]
    assert len(answers) == 2 and all(set(a) == {"label", "probabilities", "exit_layer"} for a in answers)


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{not json", 400, "malformed JSON"),
    (b"\xff\xfe", 400, "malformed JSON"),
    (b"[1, 2]", 422, 'expected a JSON object {"texts"'),
    (b'{"text": ["a"]}', 422, 'expected a JSON object {"texts"'),
    (b'{"texts": ["a"], "extra": 1}', 422, "unknown field"),
    (b'{"texts": "a film"}', 422, "texts: expected a non-empty list"),
    (b'{"texts": []}', 422, "texts: expected a non-empty list"),
    (b'{"texts": ["a", 3]}', 422, r"texts\[1\]: expected a string, got int"),
    (b'{"texts": [["a", "b"]]}', 422, r"texts\[0\]: expected a string, got list"),
    (b'{"texts": ["fine", "   "]}', 422, r"texts\[1\]: empty or whitespace-only"),
    (b'{"texts": ["a", "b", "c", "d", "e"]}', 422, "5 texts; at most 4"),
    (json.dumps({"texts": ["word " * 200]}).encode(), 422, r"texts\[0\]: \d+ tokens; the model reads at most 128"),
    (json.dumps({"texts": ["x" * 3000]}).encode(), 413, "request body over 2000 bytes"),
    (b"[" * 1500, 400, "malformed JSON: maximum recursion depth"),
    (b'{"texts": ["\\ud800 film"]}', 422, r"texts\[0\]: not valid Unicode \(surrogates not allowed\)"),
    (b'{"texts": null}', 422, "texts: expected a non-empty list"),
])
def test_bad_requests_get_a_clear_4xx(client, body, status, message):
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    import re

    assert re.search(message, r.json()["error"]), r.json()
    assert client.get("/health").status_code == 200  # still up


@pytest.mark.parametrize(("method", "path", "status"), [("get", "/nope", 404), ("get", "/predict", 405),
                                                     ("delete", "/health", 405)])
def test_every_error_has_the_same_shape(client, method, path, status):
    r = getattr(client, method)(path)
    assert r.status_code == status and set(r.json()) == {"error"} and path in r.json()["error"], r.text


def test_ready_and_metrics(client):
    assert client.get("/ready").json() == {"ready": True}
    client.post("/predict", json={"texts": ["a fine film", "dull", "ok"]})
    client.post("/predict", json={"texts": []})
    client.get("/nope")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()

    def value(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    assert value('rbert_requests_total{path="/predict",status="200"}') >= 1
    assert value('rbert_requests_total{path="/predict",status="422"}') >= 1
    assert value('rbert_requests_total{path="other",status="404"}') >= 1  # unknown paths: one label value
    assert value("rbert_request_seconds_count") >= 2
    assert value("rbert_batch_texts_sum") >= 3
    assert value('rbert_exit_layer_bucket{le="+Inf"}') >= 3  # one observation per answered text


def test_ready_is_503_before_the_worker_runs(exported_run):
    folder, _ = exported_run
    app = create_app(OnnxEarlyExitModel.from_pretrained(folder))
    with TestClient(app) as c:  # the lifespan started the worker
        app.state.batcher.worker.cancel()
        time.sleep(0.1)
        r = c.get("/ready")
    assert r.status_code == 503 and r.json() == {"ready": False}


def test_truncate_answers_what_the_default_refuses(exported_run):
    folder, _ = exported_run
    long = {"texts": ["word " * 200]}
    with TestClient(create_app(OnnxEarlyExitModel.from_pretrained(folder), Limits(truncate=True))) as c:
        r = c.post("/predict", json=long)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    with TestClient(create_app(OnnxEarlyExitModel.from_pretrained(folder))) as c:
        assert c.post("/predict", json=long).status_code == 422


def test_an_integer_too_long_for_python_is_malformed_json(exported_run):
    folder, _ = exported_run
    with TestClient(create_app(OnnxEarlyExitModel.from_pretrained(folder))) as c:
        r = c.post("/predict", content=b'{"texts": [' + b"9" * 5000 + b"]}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON: Exceeds the limit"), r.text


def test_a_body_without_length_is_bounded_too(client):
    def chunks():
        for _ in range(30):
            yield b"x" * 100

    r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_a_failing_model_answers_500_and_the_server_goes_on(exported_run):
    folder, _ = exported_run
    model = OnnxEarlyExitModel.from_pretrained(folder)
    real = model.predict
    model.predict = lambda texts, batch_size=32: (_ for _ in ()).throw(RuntimeError("boom")) \
        if texts[0] == "fail" else real(texts, batch_size)
    with TestClient(create_app(model, Limits(max_wait_ms=0))) as c:
        r = c.post("/predict", json={"texts": ["fail"]})
        assert r.status_code == 500 and "boom" in r.json()["error"]
        assert c.post("/predict", json={"texts": ["fine"]}).status_code == 200


def test_a_failing_request_does_not_fail_the_others_in_its_batch(exported_run):
    folder, _ = exported_run
    model = OnnxEarlyExitModel.from_pretrained(folder)
    real = model.predict

    def predict(texts, batch_size=32):
        if "fail" in texts:
            raise RuntimeError("boom")
        return real(texts, batch_size)

    model.predict = predict
    with TestClient(create_app(model, Limits(max_batch=8, max_wait_ms=300))) as c:
        results = {}

        def ask(text):
            results[text] = c.post("/predict", json={"texts": [text]})

        threads = [threading.Thread(target=ask, args=(t,)) for t in ("fine", "fail", "dull", "good")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert c.get("/health").json()["batching"]["largest"] > 1  # they did share a batch
    assert results["fail"].status_code == 500 and "boom" in results["fail"].json()["error"]
    assert all(results[t].status_code == 200 for t in ("fine", "dull", "good"))


def test_a_full_queue_answers_503_and_bad_limits_are_refused():
    async def main():
        batcher = MicroBatcher(lambda texts: time.sleep(0.2) or texts, max_batch=1, max_wait_ms=0, max_queue=1)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit([str(i)]) for i in range(4)), return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    busy = [r for r in results if isinstance(r, BadRequest)]
    assert busy and all(r.status == 503 and "busy" in str(r) for r in busy)
    assert [r for r in results if not isinstance(r, Exception)]  # the ones queued were answered
    with pytest.raises(ValueError, match="max_batch must be > 0, got 0"):
        Limits(max_batch=0)


def test_stopping_answers_every_waiting_request():
    async def main():
        batcher = MicroBatcher(lambda texts: time.sleep(0.3) or texts, max_batch=2, max_wait_ms=0)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit([str(i)])) for i in range(5)]
        await asyncio.sleep(0.1)  # the first batch is in the model, the rest wait
        await batcher.stop()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)

    results = asyncio.run(main())
    assert all(isinstance(r, BadRequest) and r.status == 503 for r in results), results


def test_concurrent_requests_are_answered_together(exported_run):
    folder, _ = exported_run
    with TestClient(create_app(OnnxEarlyExitModel.from_pretrained(folder), Limits(max_batch=8,
                                                                                    max_wait_ms=200))) as c:
        results = {}

        def ask(i):
            results[i] = c.post("/predict", json={"texts": [f"sentence number {i}"]})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.status_code == 200 for r in results.values()) and len(results) == 6
        stats = c.get("/health").json()["batching"]
        assert stats["texts"] == 6 and stats["largest"] > 1 and stats["batches"] < 6, stats


def test_micro_batcher_caps_batches_and_keeps_request_order():
    calls = []

    def predict(texts):
        calls.append(list(texts))
        time.sleep(0.01)
        return [t.upper() for t in texts]

    async def main():
        batcher = MicroBatcher(predict, max_batch=4, max_wait_ms=50)
        await batcher.start()
        requests = [["a"], ["b", "c"], ["d"], ["e", "f", "g"], ["h"], ["i", "j", "k", "l", "m"]]
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.stop()
        return requests, answers

    requests, answers = asyncio.run(main())
    assert answers == [[t.upper() for t in r] for r in requests]
    assert all(len(c) <= 4 for c in calls if len(c) != 5)  # only the 5-text request is over the cap, alone
    assert [len(c) for c in calls if len(c) > 4] == [5] and len(calls) < len(requests)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_mode_runs_uvicorn_with_a_policy_override(exported_run, tmp_path):
    """``python run.py mode=serve`` for real: uvicorn on loopback, ``exit_policy=none`` forcing full depth."""
    import os
    import subprocess
    import sys

    import httpx2

    from tests.test_run import REPO

    folder, _ = exported_run
    port = free_port()
    cmd = [sys.executable, "run.py", "mode=serve", f"serve.folder={folder}", f"serve.port={port}",
           "exit_policy=none", f"hydra.run.dir={tmp_path / 'serve'}"]
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                health = httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx2.TransportError:
                assert server.poll() is None and time.time() < deadline, server.stdout.read()
                time.sleep(0.5)
        assert health["policy"] == "none" and health["exits"] == [4]
        r = httpx2.post(f"http://127.0.0.1:{port}/predict", json={"texts": ["fine", "bad"]}, timeout=10)
        assert [a["exit_layer"] for a in r.json()["predictions"]] == [4, 4]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sigterm_answers_the_requests_in_flight_and_exits_0(exported_run):
    """The batcher holds each request for 1.5 s; SIGTERM arrives meanwhile: every request
    already sent is answered, then the process ends with status 0."""
    import signal
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import httpx2

    folder, _ = exported_run
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "rbert.deploy.server", str(folder), "--port", str(port),
                               "--max-wait-ms", "1500"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                assert httpx2.get(f"http://127.0.0.1:{port}/ready", timeout=2).json() == {"ready": True}
                break
            except httpx2.TransportError:
                assert server.poll() is None and time.time() < deadline, server.stdout.read()
                time.sleep(0.2)
        with ThreadPoolExecutor(4) as pool:
            sent = [pool.submit(httpx2.post, f"http://127.0.0.1:{port}/predict", json={"texts": [f"film {i}"]},
                                timeout=30) for i in range(4)]
            time.sleep(0.5)  # the requests are in the batcher's queue
            server.send_signal(signal.SIGTERM)
            statuses = [f.result().status_code for f in sent]
        assert statuses == [200] * 4
        assert server.wait(timeout=30) == 0
        log = server.stdout.read()
        assert "stopped by SIGTERM" in log and log.count('"POST /predict" 200') == 4, log
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.parametrize(("overrides", "message"), [
    ([], "serve.folder: mode=serve needs an exported folder"),
    (["serve.folder=/nonexistent"], "serve.folder: /nonexistent: no config.json"),
    (["serve.folder=/nonexistent", "exit_policy=budget"], "exit_policy: a budget's threshold is chosen"),
])
def test_serve_mode_bad_input(overrides, message, tmp_path):
    proc = run_cli(tmp_path / "s", "mode=serve", *overrides, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
