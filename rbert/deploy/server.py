"""An HTTP endpoint for an exported early-exit model (FastAPI + uvicorn).

    rbert-serve exported/ --port 8000   # or: python -m rbert.deploy.server; rbert mode=serve serve.folder=...
    curl -s localhost:8000/predict -H 'content-type: application/json' -d '{"texts": ["a fine film"]}'

* ``POST /predict`` ``{"texts": [text, ...]}`` (a text is a string, or a list of two for
  pair tasks) answers ``{"predictions": [{"label", "probabilities", "exit_layer"}, ...]}``;
  a tagger's text is raw text or a list of words, answered ``{"words", "tags", "exit_layer"}``;
  ``GET /health`` says what is served.
* **Micro-batching**: concurrent requests are queued and answered together, up to
  ``max_batch`` texts or ``max_wait_ms`` after the first one arrived, so batched early exit
  serves many clients at once; one worker thread runs the model, so the event loop keeps
  accepting requests meanwhile.
* **Every request is validated and bounded**: the body's size (413), JSON (400), the field
  and its types, empty or whitespace texts, text that is not valid Unicode, too many texts
  and texts over the model's length (422; ``--truncate``: cut to the length instead), a full
  queue (503), each answered with a one-line ``{"error": ...}``, as are unknown paths (404)
  and methods (405). A failure inside the model answers 500 for the request that caused it
  only (a failing batch is retried request by request); the server goes on.
* **Operations**: ``GET /ready`` (200 once the model's worker runs, else 503, for a load
  balancer), ``GET /metrics`` for Prometheus (requests by status, latency, texts per model
  call, exit layers), one access-log line per request; on SIGTERM uvicorn stops accepting,
  answers the requests in flight, and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from rbert.deploy.predictor import Predictor

log = logging.getLogger("rbert.serve")
KNOWN_PATHS = ("/predict", "/health", "/ready", "/metrics")


@dataclass
class Limits:
    max_texts: int = 64             # texts in one request
    max_request_bytes: int = 1 << 20
    max_batch: int = 32             # requests are grouped up to this many texts (a larger one runs alone)
    max_wait_ms: float = 5.0        # how long the first queued request waits for company
    max_queue: int = 1024           # requests waiting; more are answered 503
    truncate: bool = False          # a text over the model's length: False refuses it (422), True cuts it

    def __post_init__(self):
        for name, value in vars(self).items():
            if name != "truncate" and not value > 0 and not (name == "max_wait_ms" and value == 0):
                raise ValueError(f"{name} must be > 0, got {value}")


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class MicroBatcher:
    """Collects concurrent requests into batches of at most ``max_batch`` texts for ``predict``.

    A request is never split; one larger than ``max_batch`` is answered alone. ``predict``
    runs in a worker thread, one batch at a time.
    """

    def __init__(self, predict: Callable[[list], list], max_batch: int, max_wait_ms: float, max_queue: int = 1024):
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1 and max_wait_ms >= 0, got {max_batch}, "
                             f"{max_queue}, {max_wait_ms}")
        self.predict, self.max_batch, self.max_wait = predict, max_batch, max_wait_ms / 1000
        self.max_queue = max_queue
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.stats = {"batches": 0, "texts": 0, "largest": 0}  # model calls and their sizes (/health)
        self.on_batch: Callable[[int], None] = lambda size: None  # /metrics' batch-size histogram

    async def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self.worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        """Stop the worker; requests still waiting fail (503) instead of waiting forever."""
        if self.worker is not None:
            self.worker.cancel()
            with suppress(asyncio.CancelledError):
                await self.worker
        while self.queue is not None and not self.queue.empty():
            _, future = self.queue.get_nowait()
            if not future.done():
                future.set_exception(BadRequest(503, "the server is shutting down"))

    async def submit(self, texts: list) -> list:
        if self.worker is None or self.worker.done():
            raise BadRequest(503, "the model's worker is not running")
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((texts, future))
        except asyncio.QueueFull:
            raise BadRequest(503, f"busy: {self.max_queue} requests waiting; try again") from None
        return await future

    async def _work(self) -> None:
        held: list = []  # the requests taken off the queue and not answered yet
        try:
            await self._batches(held)
        finally:  # cancelled by stop(), or broken: none of them may wait forever
            for _, future in held:
                self._settle(future, error=BadRequest(503, "the server stopped before answering"))

    async def _batches(self, held: list) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not held:
                held.append(await self.queue.get())
            group, count = held[:1], len(held[0][0])
            deadline = loop.time() + self.max_wait
            while count < self.max_batch:
                try:
                    item = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                held.append(item)
                if count + len(item[0]) > self.max_batch:
                    break  # it opens the next batch
                group.append(item)
                count += len(item[0])
            texts = [t for item, _ in group for t in item]
            self.stats.update(batches=self.stats["batches"] + 1, texts=self.stats["texts"] + len(texts),
                              largest=max(self.stats["largest"], len(texts)))
            self.on_batch(len(texts))
            try:
                answers = await loop.run_in_executor(None, self.predict, texts)
            except Exception as err:  # retry one request at a time: only the culprit fails
                if len(group) == 1:
                    log.exception("prediction failed")
                    self._settle(group[0][1], error=err)
                else:
                    for item, future in group:
                        try:
                            self._settle(future, await loop.run_in_executor(None, self.predict, item))
                        except Exception as one:
                            log.exception("prediction failed")
                            self._settle(future, error=one)
            else:
                start = 0
                for item, future in group:
                    self._settle(future, answers[start:start + len(item)])
                    start += len(item)
            del held[:len(group)]

    @staticmethod
    def _settle(future: asyncio.Future, result: list | None = None, error: Exception | None = None) -> None:
        if future.done():  # the client went away
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def validate(body: object, model: Predictor, limits: Limits) -> list:
    """The request's texts, or a :class:`BadRequest` that says what is wrong with it."""
    if not isinstance(body, dict) or "texts" not in body:
        raise BadRequest(422, 'expected a JSON object {"texts": [...]}')
    extra = sorted(set(body) - {"texts"})
    if extra:
        raise BadRequest(422, f"unknown field(s) {extra}; the only field is texts")
    texts = body["texts"]
    if not isinstance(texts, list) or not texts:
        raise BadRequest(422, "texts: expected a non-empty list")
    if len(texts) > limits.max_texts:
        raise BadRequest(422, f"texts: {len(texts)} texts; at most {limits.max_texts} a request")
    try:
        rows = model.rows(texts)
    except ValueError as err:
        raise BadRequest(422, str(err)) from err
    for i, row in enumerate(rows):
        if any(not t.strip() for t in row):
            raise BadRequest(422, f"texts[{i}]: empty or whitespace-only text")
        try:
            [t.encode("utf-8") for t in row]
        except UnicodeEncodeError as err:  # JSON's "\ud800": a lone surrogate no tokenizer takes
            raise BadRequest(422, f"texts[{i}]: not valid Unicode ({err.reason})") from None
    if not limits.truncate and not model.spec.tagging:  # a tagger cuts long sentences into windows
        for i, length in enumerate(model.lengths(texts)):
            if length > model.spec.max_length:
                raise BadRequest(422, f"texts[{i}]: {length} tokens; the model reads at most "
                                      f"{model.spec.max_length} (the server's --truncate cuts instead)")
    return texts


class Metrics:
    """The endpoint's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, layers: int):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("rbert_requests", "HTTP requests answered, by path and status", ["path", "status"],
                                registry=self.registry)
        self.latency = Histogram("rbert_request_seconds", "Time to answer a /predict request", registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch = Histogram("rbert_batch_texts", "Texts per model call (micro-batching)", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.exits = Histogram("rbert_exit_layer", "Layer each answered text left at", registry=self.registry,
                               buckets=tuple(range(1, layers + 1)))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def create_app(model: Predictor, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    batcher = MicroBatcher(lambda texts: model.predict(texts, batch_size=len(texts)), limits.max_batch,
                           limits.max_wait_ms, limits.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="rbert early exit", lifespan=lifespan)
    app.state.batcher = batcher
    metrics = Metrics(model.spec.exit_layers[-1])
    batcher.on_batch = metrics.batch.observe
    started = time.time()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):  # 404, 405: the same shape as ours
        return error(err.status_code, f"{request.method} {request.url.path}: {err.detail}")

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        seconds = time.perf_counter() - start
        path = request.url.path if request.url.path in KNOWN_PATHS else "other"  # bounded label values
        metrics.requests.labels(path, str(response.status_code)).inc()
        if path == "/predict":
            metrics.latency.observe(seconds)
        client = request.client.host if request.client else "-"
        log.info('%s "%s %s" %d %.1f ms', client, request.method, request.url.path, response.status_code,
                 seconds * 1000)
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "uptime_s": round(time.time() - started, 1), **model.describe(),
                "limits": vars(limits), "batching": batcher.stats}

    @app.get("/ready")
    async def ready():
        running = batcher.worker is not None and not batcher.worker.done()
        return JSONResponse({"ready": running}, status_code=200 if running else 503)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/predict")
    async def predict(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limits.max_request_bytes):
            return error(413, f"request body over {limits.max_request_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():  # chunked bodies carry no length: count as they come
            body += chunk
            if len(body) > limits.max_request_bytes:
                return error(413, f"request body over {limits.max_request_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as err:  # also: bytes not UTF-8, nesting or integers too deep
            return error(400, f"malformed JSON: {(str(err).splitlines() or [type(err).__name__])[0]}")
        try:
            texts = validate(data, model, limits)
            answers = await batcher.submit(texts)
        except BadRequest as err:
            return error(err.status, str(err))
        except Exception as err:
            return error(500, f"prediction failed: {type(err).__name__}: {err}")
        for answer in answers:
            metrics.exits.observe(answer["exit_layer"])
        return {"predictions": answers}

    return app


def load(folder: str, runtime: str = "onnx", policy: dict | None = None, providers: Sequence[str] | None = None,
         threads: int | None = None) -> Predictor:
    """The model to serve: ``runtime`` onnx (onnxruntime) or torch (the PyTorch engine)."""
    if runtime == "onnx":
        from rbert.deploy.onnx_runtime import OnnxEarlyExitModel

        return OnnxEarlyExitModel.from_pretrained(folder, policy, providers or ("CPUExecutionProvider",), threads)
    if runtime == "torch":
        import torch

        from rbert.deploy.model import EarlyExitModel

        if threads:
            torch.set_num_threads(threads)
        return EarlyExitModel.from_pretrained(folder, policy)
    raise ValueError(f"runtime must be onnx or torch, got {runtime!r}")


def serve(model: Predictor, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C: uvicorn then stops accepting, answers the requests in
    flight and returns. It re-raises the signal after that, for the handler that was there
    before; ours only logs, so a stop an orchestrator asked for ends with exit status 0."""
    import signal

    import uvicorn

    def stopped(signum, frame):
        log.info("stopped by %s after answering the requests in flight", signal.Signals(signum).name)

    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, stopped)
    log.info("serving %s on http://%s:%d", model.describe(), host, port)
    uvicorn.run(create_app(model, limits), host=host, port=port, log_level="warning")


def main(argv: Sequence[str] | None = None) -> None:
    from rbert.deploy.folder import FolderError

    parser = argparse.ArgumentParser(description="Serve an exported rbert early-exit folder over HTTP.")
    parser.add_argument("folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--runtime", choices=["onnx", "torch"], default="onnx")
    parser.add_argument("--policy", default=None,
                        help='JSON policy replacing the exported one, e.g. \'{"name": "none"}\' (full depth)')
    parser.add_argument("--threads", type=int, default=None)
    defaults = Limits()
    for name, value in vars(defaults).items():
        if isinstance(value, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", action="store_true")
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        limits = Limits(**{name: getattr(args, name) for name in vars(defaults)})
        policy = json.loads(args.policy) if args.policy else None
        model = load(args.folder, args.runtime, policy, threads=args.threads)
    except (json.JSONDecodeError, FolderError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    serve(model, args.host, args.port, limits)


if __name__ == "__main__":
    main()
