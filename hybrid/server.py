"""`hybrid serve`: an OpenAI-compatible streaming server on the embedded engine.

One engine thread owns the models. Admitted requests are decoded together: each engine step is one
speculative round for every running request, all their verify rows in one verifier pass (hybrid.loop), new
prompts prefilled in chunks beside them, so every client streams at once and none waits for another to
finish, and a pass's cost is shared by all. A request is admitted once a sequence slot is free (`max_concurrent`) and the page
pool can promise it its worst case of KV pages, so an admitted request always runs to its end; the
others wait in a FIFO queue (503 once `max_queue` is full; 400 at once for a request the pool can never
hold). Tokens go on the wire as soon as a round commits them. A client that disconnects, while its
request waits or runs, has its request taken out of the queue or closed at its next turn, which frees
its pages. Every answer that is not a 200 carries an OpenAI error object.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybrid.engine import Engine, GenerationConfig
from hybrid.errors import PagesExhausted, UserError

log = logging.getLogger("hybrid.server")

API_PATHS = ("/v1/chat/completions", "/v1/completions")
CLIENT_GONE = "499"  # the status a request is counted under when its client leaves before the answer ends


@dataclass
class ServerConfig:
    model_name: str = "hybrid"
    max_concurrent: int = 8  # sequences decoding at once
    prefill_chunk: int = 64  # prompt tokens prefilled per engine step, in all (a long prompt does not stall the others)
    max_queue: int = 64  # waiting requests beyond that get 503
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024  # cap on a request's max_tokens
    block_size: int | str = "auto"
    tree: int | str = "auto"  # draft trees of up to this many tokens per round (GenerationConfig.tree; 0: chains)
    max_body_bytes: int = 4 << 20  # larger request bodies get 413; no more of them is read


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


class ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param), status_code=e.status, headers=e.headers)


def as_api_error(e: Exception) -> APIError:
    """The answer to an exception raised while a request runs: 503 when the pool ran out of pages, 400 for
    what the user can fix, 500 for the rest (a bug)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, PagesExhausted):
        return APIError(503, str(e), "server_error")
    if isinstance(e, UserError):
        return APIError(400, str(e))
    log.error("request failed", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


def too_large(need: int, num_pages: int) -> APIError:
    return APIError(400, f"request needs {need} KV pages at most, the server has {num_pages}: "
                         "lower max_tokens or shorten the prompt", param="max_tokens")


# -- request models (the OpenAI wire format) ------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str = ""  # parts of other types (images, audio) carry no text


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])


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


# -- the engine thread ------------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    cfg: GenerationConfig
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # ("text", str), ("done", finish reason), an APIError, or None: closed unanswered
    cancelled: threading.Event = field(default_factory=threading.Event)
    watcher: asyncio.Task | None = None  # cancels the job when the client disconnects
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    tokens: int = 0
    outcome: str = CLIENT_GONE  # the status a streamed answer is counted under (set as the stream ends)

    def emit(self, item) -> None:
        """Hand an item to the request's handler, from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody waits for it
            pass


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hybrid_requests", "Requests by endpoint and status (499: the client left)",
                                ["endpoint", "status"], registry=r)
        self.tokens = Counter("hybrid_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("hybrid_prompt_tokens", "Prompt tokens", registry=r)
        self.acceptance = Histogram("hybrid_acceptance_length", "Tokens committed per round", registry=r,
                                    buckets=[1, 2, 3, 4, 5, 6, 8, 10, 12, 17])
        self.block_size = Histogram("hybrid_block_size", "Draft tokens per round", registry=r,
                                    buckets=[0, 1, 2, 4, 6, 8, 12, 16])
        self.batch = Histogram("hybrid_batch_sequences", "Requests decoding in each engine step", registry=r,
                               buckets=[1, 2, 4, 8, 16, 32, 64])
        self.pass_rows = Histogram("hybrid_verify_rows", "Rows of each verifier pass (all requests' draft tokens, "
                                   "last tokens and prompt chunks): what the coordinator chose under load", registry=r,
                                   buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        self.ttft = Histogram("hybrid_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30])
        self.latency = Histogram("hybrid_request_seconds", "Request latency", registry=r,
                                 buckets=[0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120])

    def count(self, endpoint: str, status: int | str) -> None:
        """One request answered (or left by its client); every API request is counted exactly once."""
        self.requests.labels(endpoint, str(status)).inc()


class EngineWorker:
    """Runs all generation on one thread: every step is one round for every active request, in one batch."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.batch = engine.batch(config.prefill_chunk)
        self.waiting: deque[Job] = deque()
        self.active: dict[Any, Job] = {}  # the batch's handle -> its job
        self.cv = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self.run, name="hybrid-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cv:
            if len(self.waiting) >= self.config.max_queue:
                raise APIError(503, "server busy: the request queue is full, retry later", "server_error",
                               headers={"Retry-After": "1"})
            self.waiting.append(job)
            self.cv.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: a waiting job leaves the queue now, a running one is closed before the next step."""
        job.cancelled.set()
        with self.cv:
            try:
                self.waiting.remove(job)
            except ValueError:
                pass

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify()
        self.thread.join(timeout=10)

    def run(self) -> None:
        while True:
            with self.cv:
                while not self.stopped and not self.waiting and not self.active:
                    self.cv.wait()
                if self.stopped:
                    self._shut_down()
                    return
                self._admit()
            for handle, job in list(self.active.items()):  # clients that left give their pages back first
                if job.cancelled.is_set():
                    self._finish(handle, None)
            if self.active:
                self._step()

    def _admit(self) -> None:
        """Start waiting jobs, first in first out, while a sequence slot is free and the pool can promise
        the head of the queue its worst case of pages (the batch takes its promise when it starts it)."""
        pool = self.engine.pool
        while self.waiting and len(self.active) < self.config.max_concurrent:
            job = self.waiting[0]
            try:
                need = self.engine.request_pages(len(job.prompt_ids), job.cfg)
                if need > pool.num_pages:
                    raise too_large(need, pool.num_pages)
                if need > pool.available_pages:
                    return  # it waits until running requests give their pages back
                handle = self.batch.start(job.prompt_ids, job.cfg)
            except Exception as e:  # this request fails; the queue goes on
                self.waiting.popleft()
                job.emit(as_api_error(e))
                continue
            self.waiting.popleft()
            self.active[handle] = job

    def _step(self) -> None:
        """One round of every active request; a request's end, or an error in the step, finishes it."""
        try:
            events = self.batch.step()
        except Exception as e:  # the step failed: its requests get an error answer; the server goes on
            log.exception("engine step failed")
            for handle in list(self.active):
                self._finish(handle, as_api_error(e))
            return
        self.metrics.batch.observe(len(self.active))
        rows = [ev.round.rows for _, ev in events if not isinstance(ev, Exception)]
        if rows:
            self.metrics.pass_rows.observe(rows[0])
        for handle, ev in events:
            job = self.active.get(handle)
            if job is None:
                continue
            if isinstance(ev, Exception):  # this request's own error: the others go on
                self._finish(handle, as_api_error(ev))
                continue
            self._record(job, ev)
            job.emit(("text", ev.text))
            if ev.round.finish_reason is not None:
                self._finish(handle, ("done", "length" if ev.round.finish_reason == "length" else "stop"))

    def _record(self, job: Job, ev) -> None:
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

    def _finish(self, handle, item) -> None:
        job = self.active.pop(handle)
        try:
            self.batch.close(handle)  # gives the sequence's pages back
        except Exception as e:  # the pages go back all the same
            self.engine.pool.free(handle.active.seq)
            item = as_api_error(e)
        job.emit(item)
        self.metrics.latency.observe(time.perf_counter() - job.created)

    def _shut_down(self) -> None:
        """Answer every request still running or waiting: the server is going away."""
        gone = APIError(503, "server shutting down", "server_error")
        for handle in list(self.active):
            self._finish(handle, gone)
        while self.waiting:
            self.waiting.popleft().emit(gone)


# -- request bodies ---------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 as soon as its Content-Length says so,
    or once that many bytes have arrived (a chunked body); no more of it is read and the connection closes.
    A body within the limit is read here and handed on whole."""

    def __init__(self, app, limit: int, on_refused=None):
        self.app, self.limit, self.on_refused = app, limit, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body arrived: nobody to answer
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, self._replay(bytes(body), receive), send)

    @staticmethod
    def _replay(body: bytes, receive):
        """A receive that hands the app the whole body first, then what the server sends (a disconnect)."""
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay

    async def _refuse(self, scope, receive, send) -> None:
        if self.on_refused is not None:
            self.on_refused(scope["path"])
        e = APIError(413, f"request body is larger than this server's limit of {self.limit} bytes",
                     headers={"Connection": "close"})
        await error_response(e)(scope, receive, send)


def validation_error(exc: RequestValidationError) -> APIError:
    """A 400 naming the first field that failed, or saying what is wrong with the body as a whole."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    loc = ".".join(str(x) for x in first.get("loc", [])[1:]) or None
    if loc is None:
        return APIError(400, "the request body must be a JSON object (content-type: application/json)")
    return APIError(400, f"{loc}: {first.get('msg', 'invalid value')}", param=loc)


# -- answers on the wire ----------------------------------------------------------------------
@dataclass
class Reply:
    """The OpenAI shapes of one request's answer: a chat completion or a text completion, whole or as
    server-sent event chunks."""

    chat: bool
    model: str
    prompt_tokens: int
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, text: str, finish: str, completion_tokens: int) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if self.chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(completion_tokens)}

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False,
              usage: dict | None = None) -> str:
        if usage is not None:
            choices = []
        elif self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return sse(body)


def sse(body: dict | str) -> str:
    return "data: " + (body if isinstance(body, str) else json.dumps(body)) + "\n\n"


class EventStream(StreamingResponse):
    """A server-sent event stream whose `on_close` runs however it ends: finished, failed, cut by the
    client, or cancelled before its first event (when the events generator's own cleanup never runs)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# -- the app ----------------------------------------------------------------------------------
def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    metrics = Metrics()
    app = FastAPI(title="hybrid", version="0.1.0")
    worker = EngineWorker(engine, config, metrics)
    app.state.worker, app.state.engine, app.state.metrics = worker, engine, metrics
    app.router.on_shutdown.append(worker.stop)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes,
                       on_refused=lambda path: metrics.count(path, 413) if path in API_PATHS else None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        metrics.count(request.url.path, exc.status)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return await api_error(request, validation_error(exc))

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return await api_error(request, as_api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        if request.url.path in API_PATHS:
            metrics.count(request.url.path, 500)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

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

    def check_prompt(ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, "empty prompt", param=param)
        if len(ids) > config.max_prompt_tokens:
            raise APIError(400, f"prompt has {len(ids)} tokens, this server's limit is {config.max_prompt_tokens}",
                           param=param)
        if len(ids) >= engine.verifier.max_context:
            raise APIError(400, f"prompt of {len(ids)} tokens does not fit the context window of "
                                f"{engine.verifier.max_context}", param=param)

    def submit(request: Request, prompt_ids: list[int], cfg: GenerationConfig) -> Job:
        """Queue the request (400 if the pool can never hold it, 503 if the queue is full) and watch its
        connection from now on."""
        need = engine.request_pages(len(prompt_ids), cfg)
        if need > engine.pool.num_pages:  # refused now rather than after waiting in the queue
            raise too_large(need, engine.pool.num_pages)
        job = Job(prompt_ids, cfg, asyncio.get_running_loop(), asyncio.Queue())
        worker.submit(job)
        metrics.prompt_tokens.inc(len(prompt_ids))
        job.watcher = asyncio.create_task(cancel_when_gone(request, job))
        return job

    async def cancel_when_gone(request: Request, job: Job) -> None:
        """A client that disconnects, while its request waits or runs, has its job cancelled."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        worker.cancel(job)
        job.queue.put_nowait(None)  # wakes the handler: nobody is left to answer

    def release(job: Job) -> None:
        """The answer is over: stop watching the connection; a job still running is cancelled."""
        job.watcher.cancel()
        worker.cancel(job)

    async def next_item(job: Job):
        item = await job.queue.get()
        if item is None:
            raise ClientGone
        if isinstance(item, APIError):
            raise item
        return item

    async def answer_whole(endpoint: str, job: Job, reply: Reply) -> Response:
        parts = []
        try:
            while (item := await next_item(job))[0] == "text":
                parts.append(item[1])
        except ClientGone:
            metrics.count(endpoint, CLIENT_GONE)
            return Response(status_code=499)
        finally:
            release(job)
        metrics.count(endpoint, 200)
        return JSONResponse(reply.whole("".join(parts), item[1], job.tokens))

    async def answer_stream(endpoint: str, job: Job, reply: Reply, include_usage: bool) -> Response:
        try:  # the first item decides between an error answer and a 200 event stream
            first = await next_item(job)
        except ClientGone:
            release(job)
            metrics.count(endpoint, CLIENT_GONE)
            return Response(status_code=499)
        except BaseException:
            release(job)
            raise

        def close():
            release(job)  # a client gone mid-stream frees its sequence at the next turn
            metrics.count(endpoint, job.outcome)

        return EventStream(events(job, reply, include_usage, first), on_close=close)

    async def events(job: Job, reply: Reply, include_usage: bool, item):
        """The answer's chunks; job.outcome stays 499 unless the stream reaches its end or an error."""
        try:
            if reply.chat:
                yield reply.chunk(role=True)
            while item[0] == "text":
                if item[1]:
                    yield reply.chunk(item[1])
                item = await next_item(job)
            yield reply.chunk(finish=item[1])
            if include_usage:
                yield reply.chunk(usage=reply.usage(job.tokens))
            job.outcome = "200"
            yield sse("[DONE]")
        except APIError as e:
            job.outcome = str(e.status)
            yield sse(error_body(e.message, e.type, e.param))
        except ClientGone:
            pass

    async def run(request: Request, endpoint: str, prompt_ids: list[int], cfg: GenerationConfig, stream: bool,
                  chat: bool, include_usage: bool) -> Response:
        job = submit(request, prompt_ids, cfg)
        reply = Reply(chat, config.model_name, len(prompt_ids))
        if stream:
            return await answer_stream(endpoint, job, reply, include_usage)
        return await answer_whole(endpoint, job, reply)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        cfg = gen_config(req)
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = engine.encode_messages(messages)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from e
        check_prompt(ids, "messages")
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await run(request, "/v1/chat/completions", ids, cfg, req.stream, True, include)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        cfg = gen_config(req)
        if isinstance(req.prompt, str):
            if not req.prompt.strip():
                raise APIError(400, "prompt must not be empty", param="prompt")
            ids = engine.encode(req.prompt)
        else:
            ids = list(req.prompt)
            if any(not 0 <= t < engine.verifier.vocab_size for t in ids):
                raise APIError(400, "prompt token id out of the vocabulary", param="prompt")
        check_prompt(ids, "prompt")
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await run(request, "/v1/completions", ids, cfg, req.stream, False, include)

    return app


def serve(engine: Engine, host: str, port: int, config: ServerConfig) -> None:
    import uvicorn

    uvicorn.run(create_app(engine, config), host=host, port=port, log_level="info")
