"""`hybrid serve`: an OpenAI-compatible streaming server on the embedded engine.

One engine thread owns the models. Admitted requests are interleaved round by round (each active
sequence runs one speculative round in turn), so every client streams at once and none waits for
another to finish; requests beyond `max_concurrent` wait in a FIFO queue (503 once it is full).
Tokens go on the wire as soon as a round commits them. A client that disconnects has its sequence
closed at the next turn, which frees its pages.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybrid.engine import Engine, GenerationConfig
from hybrid.errors import PagesExhausted, UserError


@dataclass
class ServerConfig:
    model_name: str = "hybrid"
    max_concurrent: int = 8  # sequences decoding at once
    max_queue: int = 64  # waiting requests beyond that get 503
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024  # cap on a request's max_tokens
    block_size: int | str = "auto"
    tree: int | str = "auto"  # draft trees of up to this many tokens per round (GenerationConfig.tree; 0: chains)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -- request models (the OpenAI wire format) ------------------------------------------------------
class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonParams(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None)
    max_completion_tokens: int | None = None
    temperature: float = Field(default=1.0)
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    block_size: int | Literal["auto"] | None = None  # hybrid extension


class ChatRequest(CommonParams):
    messages: list[Message]


class CompletionRequest(CommonParams):
    prompt: str | list[int]


def too_large(need: int, num_pages: int) -> "APIError":
    return APIError(400, f"request needs {need} KV pages at most, the server has {num_pages}: "
                         "lower max_tokens or shorten the prompt", param="max_tokens")


# -- the engine thread ------------------------------------------------------------------------
@dataclass
class Job:
    prompt_ids: list[int]
    cfg: GenerationConfig
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    stream: Any = None
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    tokens: int = 0

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hybrid_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.tokens = Counter("hybrid_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("hybrid_prompt_tokens", "Prompt tokens", registry=r)
        self.acceptance = Histogram("hybrid_acceptance_length", "Tokens committed per round", registry=r,
                                    buckets=[1, 2, 3, 4, 5, 6, 8, 10, 12, 17])
        self.block_size = Histogram("hybrid_block_size", "Draft tokens per round", registry=r,
                                    buckets=[0, 1, 2, 4, 6, 8, 12, 16])
        self.ttft = Histogram("hybrid_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30])
        self.latency = Histogram("hybrid_request_seconds", "Request latency", registry=r,
                                 buckets=[0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120])


class EngineWorker:
    """Runs all generation on one thread, interleaving active sequences round by round."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.cv = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self.run, name="hybrid-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cv:
            if len(self.waiting) >= self.config.max_queue:
                raise APIError(503, "server busy: the request queue is full, retry later", "server_error")
            self.waiting.append(job)
            self.cv.notify()

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify()
        self.thread.join(timeout=10)

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.config.max_concurrent:
            job = self.waiting[0]
            if job.cancelled.is_set():
                self.waiting.popleft()
                continue
            pool = self.engine.pool
            need = self.engine.request_pages(len(job.prompt_ids), job.cfg)  # its worst case, promised at admission
            if need > pool.num_pages:
                self.waiting.popleft()
                job.emit(too_large(need, pool.num_pages))
                continue
            if need > pool.available_pages:
                return  # wait, first in first out, until running requests give their pages back
            self.waiting.popleft()
            job.stream = self.engine.stream(job.prompt_ids, job.cfg)
            self.active.append(job)

    def run(self) -> None:
        while True:
            with self.cv:
                while not self.stopped and not self.waiting and not self.active:
                    self.cv.wait()
                if self.stopped:
                    for job in self.active:
                        job.stream.close()
                    return
                self._admit()
            for job in list(self.active):  # one round per active sequence, in turn
                self._step(job)

    def _finish(self, job: Job, item) -> None:
        job.stream.close()  # frees the sequence's pages
        self.active.remove(job)
        job.emit(item)
        self.metrics.latency.observe(time.perf_counter() - job.created)

    def _step(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._finish(job, None)
            return
        try:
            ev = next(job.stream)
        except StopIteration:
            self._finish(job, ("done", "length"))
            return
        except PagesExhausted as e:
            self._finish(job, APIError(503, f"{e}", "server_error"))
            return
        except UserError as e:
            self._finish(job, APIError(400, str(e)))
            return
        except Exception as e:  # a bug: answer 500, keep serving
            self._finish(job, APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
            return
        r = ev.round
        if r.tokens or r.block_size:
            self.metrics.acceptance.observe(len(r.tokens))
            self.metrics.block_size.observe(r.block_size)
        if ev.tokens:
            job.tokens += len(ev.tokens)
            self.metrics.tokens.inc(len(ev.tokens))
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
                self.metrics.ttft.observe(job.first_token_at - job.created)
        job.emit(("text", ev.text))
        if r.finish_reason is not None:
            self._finish(job, ("done", "length" if r.finish_reason == "length" else "stop"))


# -- the app ----------------------------------------------------------------------------------
def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    metrics = Metrics()
    app = FastAPI(title="hybrid", version="0.1.0")
    worker = EngineWorker(engine, config, metrics)
    app.state.worker, app.state.engine, app.state.metrics = worker, engine, metrics
    app.router.on_shutdown.append(worker.stop)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(error_body(exc.message, exc.type, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", [])[1:]) or None
        msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else first.get("msg", "invalid request")
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(msg, "invalid_request_error", loc), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0, "owned_by": "hybrid"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    def gen_config(req: CommonParams) -> GenerationConfig:
        if req.model != config.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {config.model_name!r}",
                           param="model", type_="invalid_request_error")
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = min(256, config.max_tokens)
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        if max_tokens > config.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is above this server's limit of {config.max_tokens}",
                           param="max_tokens")
        if not 0.0 <= req.temperature <= 2.0:
            raise APIError(400, f"temperature must be in [0, 2], got {req.temperature}", param="temperature")
        if not 0.0 < req.top_p <= 1.0:
            raise APIError(400, f"top_p must be in (0, 1], got {req.top_p}", param="top_p")
        if req.top_k < 0:
            raise APIError(400, f"top_k must be >= 0, got {req.top_k}", param="top_k")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        block = req.block_size if req.block_size is not None else config.block_size
        cfg = GenerationConfig(max_new_tokens=max_tokens, block_size=block, temperature=req.temperature,
                               top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=stop, tree=config.tree)
        try:
            engine.check(cfg)
        except UserError as e:
            raise APIError(400, str(e)) from e
        return cfg

    def check_prompt(ids: list[int]) -> None:
        if not ids:
            raise APIError(400, "empty prompt", param="prompt")
        if len(ids) > config.max_prompt_tokens:
            raise APIError(400, f"prompt has {len(ids)} tokens, this server's limit is {config.max_prompt_tokens}",
                           param="messages")
        if len(ids) >= engine.verifier.max_context:
            raise APIError(400, f"prompt of {len(ids)} tokens does not fit the context window of "
                                f"{engine.verifier.max_context}", param="messages")

    async def run(request: Request, endpoint: str, prompt_ids: list[int], cfg: GenerationConfig, stream: bool,
                  chat: bool, include_usage: bool):
        need = engine.request_pages(len(prompt_ids), cfg)
        if need > engine.pool.num_pages:  # can never fit: refused now rather than after waiting in the queue
            raise too_large(need, engine.pool.num_pages)
        loop = asyncio.get_running_loop()
        job = Job(prompt_ids, cfg, loop, asyncio.Queue())
        worker.submit(job)
        metrics.prompt_tokens.inc(len(prompt_ids))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage():
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": job.tokens,
                    "total_tokens": len(prompt_ids) + job.tokens}

        async def next_item():
            item = await job.queue.get()
            if isinstance(item, APIError):
                raise item
            return item

        if not stream:
            parts, finish = [], "length"
            try:
                while True:
                    kind, value = await next_item()
                    if kind == "text":
                        parts.append(value)
                    else:
                        finish = value
                        break
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            text = "".join(parts)
            metrics.requests.labels(endpoint, "200").inc()
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": config.model_name,
                                 "choices": [choice], "usage": usage()})

        # streaming: the first item decides between an error answer and a 200 event stream
        try:
            first = await next_item()
        except APIError:
            raise
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text=None, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": created,
                                          "model": config.model_name, "choices": [choice]}) + "\n\n"

        async def events():
            item = first
            try:
                if chat:
                    yield chunk(role=True)
                while True:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return
                    kind, value = item
                    if kind == "text":
                        if value:
                            yield chunk(value)
                    else:
                        yield chunk(finish=value)
                        if include_usage:
                            yield "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": created,
                                                         "model": config.model_name, "choices": [],
                                                         "usage": usage()}) + "\n\n"
                        yield "data: [DONE]\n\n"
                        metrics.requests.labels(endpoint, "200").inc()
                        return
                    try:
                        item = await next_item()
                    except APIError as e:
                        yield "data: " + json.dumps(error_body(e.message, e.type)) + "\n\n"
                        return
            finally:
                job.cancelled.set()  # a client gone mid-stream frees its sequence at the next turn

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        cfg = gen_config(req)
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                     "".join(p.get("text", "") for p in (m.content or []))} for m in req.messages]
        try:
            ids = engine.encode_messages(messages)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from e
        check_prompt(ids)
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await run(request, "/v1/chat/completions", ids, cfg, req.stream, True, include)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        cfg = gen_config(req)
        if isinstance(req.prompt, str):
            if not req.prompt:
                raise APIError(400, "prompt must not be empty", param="prompt")
            ids = engine.encode(req.prompt)
        else:
            ids = list(req.prompt)
            if any(not 0 <= t < engine.verifier.vocab_size for t in ids):
                raise APIError(400, "prompt token id out of the vocabulary", param="prompt")
        check_prompt(ids)
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await run(request, "/v1/completions", ids, cfg, req.stream, False, include)

    return app


def serve(engine: Engine, host: str, port: int, config: ServerConfig) -> None:
    import uvicorn

    uvicorn.run(create_app(engine, config), host=host, port=port, log_level="info")
