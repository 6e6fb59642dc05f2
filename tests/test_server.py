"""`hybrid serve` on loopback with tiny models: OpenAI client streaming, concurrency, admission against the
page pool, disconnects (running and queued), bursts past the queue, bad and oversized bodies, engine
failures, and a bounded soak (pages, memory, /metrics)."""
import gc
import json
import resource
import socket
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlparse

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from conftest import make_verifier, save_tiny
from hybrid.cli import main as cli_main
from hybrid.drafters.causal import CausalDrafter
from hybrid.engine import Batch, Engine, GenerationConfig
from hybrid.loop import Scheduler
from hybrid.server import ServerConfig, create_app

MESSAGES = [{"role": "user", "content": "say something"}]
TOPICS = ["rivers", "salt", "owls", "maps", "jazz", "tides", "glass", "bees", "chess", "fog", "iron", "kites",
          "moss", "opals", "rain", "wolves"]
PROMPTS = [[{"role": "user", "content": f"tell me about {t}"}] for t in TOPICS]  # 16 distinct conversations
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BODY_LIMIT = 16384  # max_body_bytes of the module's server


# -- helpers ------------------------------------------------------------------------------------
@contextmanager
def serving(app):
    """The app on a loopback port, in a thread; yields its base URL."""
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        t.join(timeout=10)


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def tiny_engine(drafter=None, num_pages=32, page_size=8) -> Engine:
    """A tiny float32 engine that never stops at EOS (deterministic lengths)."""
    v = make_verifier("qwen3")
    v.eos_token_ids = set()
    return Engine(v, drafter, num_pages=num_pages, page_size=page_size)


def post(url, path, body, timeout=30, http=httpx):
    """(status, JSON body) of one non-streaming request (`http`: an httpx.Client to reuse connections)."""
    r = http.post(url + path, json=body, timeout=timeout)
    return r.status_code, r.json()


def text_of(path, answer) -> str:
    choice = answer["choices"][0]
    return choice["message"]["content"] if path == CHAT else choice["text"]


def stream_sse(url, path, body, timeout=30, http=httpx) -> dict:
    """One streaming request read to its end: status, text, finish reason, usage, error event."""
    out = {"text": "", "finish": None, "usage": None, "error": None, "done": False}
    with http.stream("POST", url + path, json=body, timeout=timeout) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            r.read()
            out["error"] = r.json()["error"]
            return out
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = chunk["error"]
            elif chunk.get("usage"):
                out["usage"] = chunk["usage"]
            for c in chunk.get("choices", []):
                out["text"] += (c["delta"].get("content") or "") if path == CHAT else c["text"]
                out["finish"] = c["finish_reason"] or out["finish"]
    return out


def stream_and_leave(url, path, body, lines=2, http=None):
    """Start a stream, read a few event lines, then leave: closing a response before its end closes its
    connection."""
    if http is None:
        with httpx.Client(timeout=30) as h:
            return stream_and_leave(url, path, body, lines, h)
    with http.stream("POST", url + path, json=body) as r:
        assert r.status_code == 200
        it = r.iter_lines()
        for _ in range(lines):
            next(it)


class Background(threading.Thread):
    """A call on its own thread; result() re-raises what it raised."""

    def __init__(self, fn, *args, **kw):
        super().__init__(daemon=True)
        self.fn, self.args, self.kw, self.value, self.error = fn, args, kw, None, None
        self.start()

    def run(self):
        try:
            self.value = self.fn(*self.args, **self.kw)
        except BaseException as e:  # noqa: BLE001 - handed to result()
            self.error = e

    def result(self, timeout=60):
        self.join(timeout)
        assert not self.is_alive(), f"{self.fn.__name__} still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.value


def wait_until(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.01)


def pool_idle(engine) -> bool:
    pool = engine.pool
    return pool.free_pages == pool.num_pages and pool.available_pages == pool.num_pages


def requests_by_status(url) -> dict[tuple[str, str], float]:
    """hybrid_requests_total from /metrics: (endpoint, status) -> count."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if family.name == "hybrid_requests":
            for s in family.samples:
                if s.name == "hybrid_requests_total":
                    out[(s.labels["endpoint"], s.labels["status"])] = s.value
    return out


def generated_tokens(url) -> float:
    """hybrid_generated_tokens_total from /metrics."""
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if family.name == "hybrid_generated_tokens":
            return family.samples[0].value
    return 0.0


def counted_since(before, after) -> dict[tuple[str, str], int]:
    return {k: int(v - before.get(k, 0)) for k, v in after.items() if v != before.get(k, 0)}


def raw_connection(url) -> socket.socket:
    u = urlparse(url)
    return socket.create_connection((u.hostname, u.port), timeout=10)


def raw_post(url, path, body: dict) -> socket.socket:
    """A POST written on a bare socket (the caller decides when to hang up)."""
    data = json.dumps(body).encode()
    s = raw_connection(url)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def read_response(s: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the answer on a bare socket (the server closes the connection after it)."""
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            length = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")]
            if length and len(rest) >= length[0]:
                break
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest)


class Gate:
    """Holds the engine's steps until open(): requests line up in the server before any runs. Records, for each
    request the engine starts, its prompt ids and how many sequences the pool held then."""

    def __init__(self, engine, monkeypatch):
        self.opened = threading.Event()
        self.started: list[tuple[list[int], int]] = []
        real_start, real_step = Batch.start, Batch.step

        def start(batch, prompt_ids, cfg, *args, **kw):
            if batch.engine is engine:
                self.started.append((list(prompt_ids), len(engine.pool.sequences())))
            return real_start(batch, prompt_ids, cfg, *args, **kw)

        def step(batch):
            if batch.engine is engine:
                assert self.opened.wait(30), "the gate was never opened"
            return real_step(batch)

        monkeypatch.setattr(Batch, "start", start)
        monkeypatch.setattr(Batch, "step", step)

    def open(self):
        self.opened.set()


@pytest.fixture
def gates(monkeypatch):
    """gates(engine) -> a Gate on that engine; every gate opens at teardown so no engine thread stays held."""
    made = []

    def make(engine):
        made.append(Gate(engine, monkeypatch))
        return made[-1]

    yield make
    for g in made:
        g.open()


# -- the module's server: a causal drafter, four sequences at once --------------------------------
@pytest.fixture(scope="module")
def server():
    engine = tiny_engine(CausalDrafter(make_verifier("qwen3", seed=5)), num_pages=48, page_size=8)
    refs = {n: engine.generate(engine.encode_messages(MESSAGES), GenerationConfig(max_new_tokens=n)).text
            for n in (8, 20)}
    refs["prompts"] = [engine.generate(engine.encode_messages(m), GenerationConfig(max_new_tokens=20)).text
                       for m in PROMPTS]
    app = create_app(engine, ServerConfig(model_name="tiny", max_concurrent=4, max_tokens=64, max_prompt_tokens=200,
                                          max_body_bytes=BODY_LIMIT))
    with serving(app) as url:
        yield url, engine, refs


def test_openai_client_streams_the_same_text_as_generate(server):
    url, engine, refs = server
    stream = client(url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == refs[20]
    done = client(url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert done.choices[0].message.content == refs[8] and done.usage.completion_tokens == 8


def test_sixteen_concurrent_streaming_clients_all_finish_correctly(server):
    url, engine, refs = server
    results = [None] * 16

    def one(i):
        s = client(url).chat.completions.create(model="tiny", messages=PROMPTS[i], max_tokens=20, temperature=0,
                                                stream=True)
        results[i] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(set(refs["prompts"])) == 16  # distinct answers: one handed to the wrong client shows
    assert results == refs["prompts"]
    assert pool_idle(engine)


def test_a_client_that_disconnects_frees_its_pages(server):
    url, engine, _ = server
    tokens0 = generated_tokens(url)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", url + CHAT, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            next(lines)
            assert engine.pool.free_pages < engine.pool.num_pages  # the sequence holds pages now
        # leaving the block closes the connection mid-stream
    wait_until(lambda: pool_idle(engine), 20, "the pages to come back")
    assert generated_tokens(url) - tokens0 < 64  # closed when the client left, not run to its end


def test_clients_that_leave_mid_stream_under_load_give_their_pages_back_and_the_rest_stream_on(server):
    url, engine, refs = server
    tokens0 = generated_tokens(url)
    stay = [Background(stream_sse, url, CHAT, {"model": "tiny", "messages": PROMPTS[i], "max_tokens": 20,
                                               "temperature": 0, "stream": True}) for i in range(4)]
    leave = [Background(stream_and_leave, url, CHAT, {"model": "tiny", "messages": PROMPTS[i], "max_tokens": 64,
                                                      "temperature": 0, "stream": True}, lines=2 + i)
             for i in range(4, 8)]
    for b in leave:
        b.result()
    assert [b.result()["text"] for b in stay] == refs["prompts"][:4]
    wait_until(lambda: pool_idle(engine), 20, "the pages to come back")
    # the leavers' sequences were closed when they left, not run to their max_tokens
    assert generated_tokens(url) - tokens0 < 4 * 20 + 4 * 64 // 2
    status, answer = post(url, CHAT, {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0})
    assert status == 200 and text_of(CHAT, answer) == refs[8]


CONTENT_PART_NOT_TEXT = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        (CHAT, "{not json", 400, "not valid JSON"),
        (CHAT, b"\xff\xfe{}", 400, "not valid JSON"),
        (CHAT, "", 400, "JSON object"),
        (CHAT, [{"model": "tiny", "messages": MESSAGES}], 400, "JSON object"),
        (CHAT, ("text/plain", json.dumps({"model": "tiny", "messages": MESSAGES})), 400, "JSON object"),
        (CHAT, {"model": 5, "messages": MESSAGES}, 400, "model"),
        (CHAT, {"model": "tiny", "messages": "hi"}, 400, "messages"),
        (CHAT, {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        (CHAT, CONTENT_PART_NOT_TEXT, 400, "content"),
        (CHAT, {"model": "tiny", "messages": MESSAGES, "max_tokens": "ten"}, 400, "max_tokens"),
        (CHAT, {"model": "tiny", "messages": MESSAGES, "stop": [5]}, 400, "stop"),
        (CHAT, {"model": "tiny", "messages": MESSAGES, "stream": "maybe"}, 400, "stream"),
        (CHAT, {"model": "other", "messages": MESSAGES}, 404, "does not exist"),
        (CHAT, {"model": "tiny", "messages": MESSAGES, "max_tokens": -1}, 400, "max_tokens"),
        (CHAT, {"model": "tiny", "messages": MESSAGES, "temperature": 3.5}, 400, "temperature"),
        (CHAT, {"model": "tiny", "messages": []}, 400, "messages"),
        (CHAT, {"model": "tiny", "messages": MESSAGES, "max_tokens": 500}, 400, "limit"),
        (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "x" * 300}]}, 400, "prompt"),
        (CHAT, {"model": "tiny"}, 400, "messages"),
        (COMPLETIONS, {"model": "tiny", "prompt": "   "}, 400, "prompt"),
        (COMPLETIONS, {"model": "tiny", "prompt": [[1, 2]]}, 400, "prompt"),
        (COMPLETIONS, {"model": "tiny", "prompt": [999]}, 400, "vocabulary"),
        (COMPLETIONS, {"model": "tiny", "prompt": "abc", "block_size": 0}, 400, "block size"),
    ],
)
def test_bad_requests_get_openai_shaped_4xx_and_the_server_keeps_serving(server, path, body, status, fragment):
    url, _, refs = server
    with httpx.Client(timeout=30) as h:
        if isinstance(body, tuple):
            kw = {"content": body[1], "headers": {"content-type": body[0]}}
        elif isinstance(body, (str, bytes)):
            kw = {"content": body, "headers": {"content-type": "application/json"}}
        else:
            kw = {"json": body}
        r = h.post(url + path, **kw)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and fragment in err["message"]
        ok = h.post(url + CHAT, json={"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == refs[8]


def test_oversized_bodies_get_413_without_being_read_and_the_server_keeps_serving(server):
    url, engine, refs = server
    before = requests_by_status(url)
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 * BODY_LIMIT)}]}
    r = httpx.post(url + CHAT, json=big, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    # a Content-Length over the limit is refused at once: the 10 MB it announces are never sent
    s = raw_connection(url)
    s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
              "Content-Length: 10000000\r\n\r\n{\"model\": ".encode())
    status, body = read_response(s)
    s.close()
    assert status == 413 and set(body["error"]) == {"message", "type", "param", "code"}

    # a chunked body (no Content-Length) is refused once the limit is passed, though it never ends
    s = raw_connection(url)
    s.sendall(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
              "Transfer-Encoding: chunked\r\n\r\n".encode())
    piece = b"x" * 4096
    for _ in range(BODY_LIMIT // len(piece) + 1):
        s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    status, body = read_response(s)
    s.close()
    assert status == 413 and "limit" in body["error"]["message"]

    # a chunked body within the limit is served
    small = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}).encode()
    r = httpx.post(url + CHAT, content=iter([small[:10], small[10:]]), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 200 and text_of(CHAT, r.json()) == refs[8]
    refused = {k: v for k, v in counted_since(before, requests_by_status(url)).items() if k[1] == "413"}
    assert refused == {(CHAT, "413"): 2, (COMPLETIONS, "413"): 1}


def test_health_models_and_metrics(server):
    url, _, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
    m = httpx.get(url + "/metrics").text
    for name in ("hybrid_requests_total", "hybrid_generated_tokens_total", "hybrid_acceptance_length_bucket",
                 "hybrid_block_size_bucket", "hybrid_time_to_first_token_seconds_bucket"):
        assert name in m


# -- the same answers as `hybrid generate` ------------------------------------------------------
@pytest.fixture(scope="module")
def causal_drafter_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("drafters") / "tiny-qwen3-drafter", "qwen3", seed=5)


def generate_cli(capsys, model_dir, drafter, prompt, *args) -> dict:
    """The JSON line of `hybrid generate` (greedy), run in-process."""
    capsys.readouterr()
    cli_main(["generate", prompt, "--verifier", str(model_dir), "--drafter", drafter, "--temperature", "0",
              "--json", *args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("drafter", ["ngram", "causal"])
def test_completions_and_chat_answer_what_hybrid_generate_prints(model_dir, causal_drafter_dir, drafter, capsys):
    spec = "ngram" if drafter == "ngram" else str(causal_drafter_dir)
    cases = [  # (endpoint, request fields, hybrid generate arguments)
        (COMPLETIONS, {"prompt": "abc", "max_tokens": 16}, ["abc", "--no-chat", "--max-new-tokens", "16"]),
        (COMPLETIONS, {"prompt": "hello there", "max_tokens": 12, "block_size": 4},
         ["hello there", "--no-chat", "--max-new-tokens", "12", "--block-size", "4"]),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16},
         ["hi", "--chat", "--max-new-tokens", "16"]),
    ]
    expected = [generate_cli(capsys, model_dir, spec, *args) for _, _, args in cases]
    assert len({e["text"] for e in expected}) == len(cases)
    engine = Engine.load(str(model_dir), drafter=spec)
    with serving(create_app(engine, ServerConfig(model_name="tiny", max_tokens=64))) as url:
        for (path, fields, _), want in zip(cases, expected):
            body = {"model": "tiny", "temperature": 0, **fields}
            finish = "length" if want["finish_reason"] == "length" else "stop"
            status, whole = post(url, path, body)
            assert status == 200
            assert text_of(path, whole) == want["text"] and whole["choices"][0]["finish_reason"] == finish
            assert whole["usage"] == {"prompt_tokens": want["prompt_tokens"], "completion_tokens": want["new_tokens"],
                                      "total_tokens": want["prompt_tokens"] + want["new_tokens"]}
            streamed = stream_sse(url, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
            assert (streamed["text"], streamed["finish"], streamed["done"]) == (want["text"], finish, True)
            assert streamed["usage"] == whole["usage"]
    assert pool_idle(engine)


# -- admission against the page pool -------------------------------------------------------------
def test_request_larger_than_the_page_budget_is_refused_and_serving_goes_on():
    from fastapi.testclient import TestClient

    engine = Engine(make_verifier("qwen3"), None, num_pages=4, page_size=8)  # 32 token positions in all
    with TestClient(create_app(engine, ServerConfig(model_name="tiny", max_tokens=64))) as h:
        r = h.post(COMPLETIONS, json={"model": "tiny", "prompt": "abcdefghij", "max_tokens": 40, "temperature": 0})
        assert r.status_code == 400 and "pages" in r.json()["error"]["message"]
        # the prompt alone is over the budget (yet well inside the context window)
        r = h.post(COMPLETIONS, json={"model": "tiny", "prompt": "abcdefgh" * 5, "max_tokens": 1, "temperature": 0})
        assert r.status_code == 400 and "pages" in r.json()["error"]["message"]
        r = h.post(COMPLETIONS, json={"model": "tiny", "prompt": "abc", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
    assert pool_idle(engine)


@pytest.mark.parametrize("num_pages", [12, 10])
def test_a_tight_pool_serves_both_requests_whole_the_second_one_waiting(num_pages, gates):
    engine = tiny_engine(CausalDrafter(make_verifier("qwen3", seed=5)), num_pages=num_pages, page_size=8)
    prompts = ["the cat sat on a", "a dog ran to the"]
    cfg = GenerationConfig(max_new_tokens=40)
    ids = [engine.encode(p) for p in prompts]
    assert [engine.request_pages(len(i), cfg) for i in ids] == [9, 9]  # two do not fit at once
    refs = [engine.generate(p, cfg).text for p in prompts]
    app = create_app(engine, ServerConfig(model_name="tiny", max_tokens=80))
    worker = app.state.worker
    with serving(app) as url:
        gate = gates(engine)
        # a one-page request runs first (held at its first round) so that both big ones queue behind it
        small = Background(post, url, COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": 1, "block_size": 1,
                                                    "temperature": 0})
        wait_until(lambda: worker.active, what="the small request to start")
        big = [Background(post, url, COMPLETIONS, {"model": "tiny", "prompt": p, "max_tokens": 40, "temperature": 0})
               for p in prompts]
        wait_until(lambda: len(worker.waiting) == 2, what="both big requests to queue")
        gate.open()
        assert small.result()[0] == 200
        for b, ref in zip(big, refs):
            status, answer = b.result()
            assert status == 200, answer
            assert answer["usage"]["completion_tokens"] == 40 and text_of(COMPLETIONS, answer) == ref
        started = [live for prompt, live in gate.started if prompt in ids]
        assert started[1] == 0  # the second big request started once the first had given its pages back

        # one that can never fit is refused at once, and serving goes on
        status, answer = post(url, COMPLETIONS, {"model": "tiny", "prompt": prompts[0], "max_tokens": 80})
        assert status == 400 and "pages" in answer["error"]["message"]
        status, answer = post(url, COMPLETIONS, {"model": "tiny", "prompt": prompts[1], "max_tokens": 40,
                                                 "temperature": 0})
        assert status == 200 and text_of(COMPLETIONS, answer) == refs[1]
    assert pool_idle(engine)


# -- stop strings completed inside a speculative round ----------------------------------------
@pytest.fixture(scope="module")
def same_drafter_server():
    """A drafter equal to the verifier (every draft token is accepted) and a plain engine to compare with."""
    engine = tiny_engine(CausalDrafter(make_verifier("qwen3", seed=0)), num_pages=48)
    plain = tiny_engine(None, num_pages=48)
    with serving(create_app(engine, ServerConfig(model_name="tiny", max_tokens=64))) as url:
        yield url, engine, plain


def mid_round_stop(tokenizer, token_ids: list[int], round_ends: set[int]) -> tuple[str, int]:
    """A 3-character stop string whose first occurrence is completed by token k, k inside a round: the
    round commits tokens past the stop."""
    for k in range(10, len(token_ids)):
        text = tokenizer.decode(token_ids[:k])
        stop = text[-3:]
        if k not in round_ends and len(stop) == 3 and text.find(stop) == len(text) - 3 and \
                len(tokenizer.decode(token_ids[:k - 1])) == len(text) - 1:
            return stop, k
    raise AssertionError("no stop string completes inside a round")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_a_stop_string_completed_mid_round_counts_the_tokens_plain_decoding_would(same_drafter_server, path, stream):
    url, engine, plain = same_drafter_server
    ids = engine.encode_messages(MESSAGES) if path == CHAT else engine.encode("abc")
    full = engine.generate(ids, GenerationConfig(max_new_tokens=40, block_size=8))
    assert max(full.acceptance_lengths) == 9  # rounds of 8 accepted tokens and a bonus token
    ends = {sum(full.acceptance_lengths[:i + 1]) for i in range(len(full.acceptance_lengths))}
    stop, k = mid_round_stop(engine.verifier.tokenizer, full.token_ids, ends)
    ref = plain.generate(ids, GenerationConfig(max_new_tokens=40, stop=[stop]))
    assert (ref.new_tokens, ref.finish_reason) == (k, "stop")

    body = {"model": "tiny", "max_tokens": 40, "temperature": 0, "block_size": 8, "stop": [stop],
            **({"messages": MESSAGES} if path == CHAT else {"prompt": "abc"})}
    if stream:
        out = stream_sse(url, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
        text, finish, usage = out["text"], out["finish"], out["usage"]
    else:
        status, answer = post(url, path, body)
        assert status == 200
        text, finish, usage = text_of(path, answer), answer["choices"][0]["finish_reason"], answer["usage"]
    assert (text, finish) == (ref.text, "stop")
    assert usage == {"prompt_tokens": len(ids), "completion_tokens": ref.new_tokens,
                     "total_tokens": len(ids) + ref.new_tokens}
    assert pool_idle(engine)


# -- the queue: bursts, clients that leave while they wait ----------------------------------------
def test_a_burst_beyond_the_queue_gets_503_the_admitted_are_served_and_serving_goes_on(gates):
    engine = tiny_engine()
    prompts = [f"burst {i}" for i in range(8)]
    refs = [engine.generate(p, GenerationConfig(max_new_tokens=6)).text for p in prompts]
    app = create_app(engine, ServerConfig(model_name="tiny", max_concurrent=1, max_queue=2, max_tokens=64))
    worker = app.state.worker
    with serving(app) as url:
        gate = gates(engine)

        def ask(i):
            body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 6, "temperature": 0}
            if i % 2:
                out = stream_sse(url, COMPLETIONS, {**body, "stream": True})
                return out["status"], out["text"] if out["status"] == 200 else {"error": out["error"]}
            status, answer = post(url, COMPLETIONS, body)
            return status, text_of(COMPLETIONS, answer) if status == 200 else answer

        first = Background(ask, 0)
        wait_until(lambda: worker.active, what="the first request to start")
        rest = [Background(ask, i) for i in range(1, 8)]
        wait_until(lambda: sum(not b.is_alive() for b in rest) == 5, what="five answers of 503")
        assert len(worker.waiting) == 2
        refused = [b.result() for b in rest if not b.is_alive()]
        for status, answer in refused:
            assert status == 503 and set(answer["error"]) == {"message", "type", "param", "code"}
            assert "queue" in answer["error"]["message"]
        gate.open()
        served = [(i, *b.result()) for i, b in enumerate([first] + rest) if b.result()[0] == 200]
        assert len(served) == 3 and served[0][0] == 0
        assert all(text == refs[i] for i, _, text in served)
        assert ask(7) == (200, refs[7]) and ask(6) == (200, refs[6])
    assert pool_idle(engine)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_while_queued_gives_its_place_back_and_never_runs(stream, gates):
    engine = tiny_engine()
    ref = engine.generate("abc", GenerationConfig(max_new_tokens=6)).text
    app = create_app(engine, ServerConfig(model_name="tiny", max_concurrent=1, max_queue=1, max_tokens=64))
    worker = app.state.worker
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 6, "temperature": 0}
    with serving(app) as url:
        gate = gates(engine)
        before = requests_by_status(url)
        first = Background(post, url, COMPLETIONS, body)
        wait_until(lambda: worker.active, what="the first request to start")
        leaver = raw_post(url, COMPLETIONS, {**body, "prompt": "gone", "stream": stream})
        wait_until(lambda: len(worker.waiting) == 1, what="the leaver to queue")
        leaver.close()
        wait_until(lambda: not worker.waiting, 5, "the leaver to leave the queue")
        third = Background(post, url, COMPLETIONS, body)  # its place is free: no 503
        wait_until(lambda: len(worker.waiting) == 1, what="the third request to queue")
        gate.open()
        for b in (first, third):
            status, answer = b.result()
            assert status == 200 and text_of(COMPLETIONS, answer) == ref
        assert [p for p, _ in gate.started] == [engine.encode("abc")] * 2  # the leaver never ran
        wait_until(lambda: counted_since(before, requests_by_status(url)) ==
                   {(COMPLETIONS, "200"): 2, (COMPLETIONS, "499"): 1}, 5, "the leaver to be counted as gone")
    assert pool_idle(engine)


# -- engine failures -------------------------------------------------------------------------
def test_an_engine_failure_is_a_500_for_that_request_and_serving_goes_on(monkeypatch):
    """A request whose start fails, or whose round fails mid-stream, gets a 500; a request decoding beside it in
    the same steps is served whole (the failed step runs again one request at a time)."""
    engine = tiny_engine()
    ref = engine.generate("abc", GenerationConfig(max_new_tokens=6)).text
    real_start, real_plan = Batch.start, Scheduler._plan
    admission, mid_stream = engine.encode("boom at admission"), engine.encode("boom mid-stream")

    def start(batch, prompt_ids, cfg, *args, **kw):
        if list(prompt_ids) == admission:
            raise RuntimeError("boom at admission")
        return real_start(batch, prompt_ids, cfg, *args, **kw)

    def plan(scheduler, a, *args):
        if a.prompt == mid_stream and a.generated:
            raise RuntimeError("boom mid-stream")
        return real_plan(scheduler, a, *args)

    monkeypatch.setattr(Batch, "start", start)
    monkeypatch.setattr(Scheduler, "_plan", plan)
    app = create_app(engine, ServerConfig(model_name="tiny", max_tokens=64))
    with serving(app) as url:
        body = {"model": "tiny", "max_tokens": 6, "temperature": 0}
        for prompt in ("boom at admission", "boom mid-stream"):
            status, answer = post(url, COMPLETIONS, {**body, "prompt": prompt}, timeout=10)
            assert status == 500 and answer["error"]["type"] == "server_error" and prompt in answer["error"]["message"]
            assert set(answer["error"]) == {"message", "type", "param", "code"}
        out = stream_sse(url, COMPLETIONS, {**body, "prompt": "boom at admission", "stream": True}, timeout=10)
        assert out["status"] == 500 and "boom" in out["error"]["message"]
        out = stream_sse(url, COMPLETIONS, {**body, "prompt": "boom mid-stream", "stream": True}, timeout=10)
        assert out["status"] == 200 and not out["done"] and out["error"]["type"] == "server_error"
        status, answer = post(url, COMPLETIONS, {**body, "prompt": "abc"}, timeout=10)
        assert status == 200 and text_of(COMPLETIONS, answer) == ref
        for _ in range(3):  # side by side: the failing request's steps are shared with a healthy one
            healthy = Background(post, url, COMPLETIONS, {**body, "prompt": "abc", "max_tokens": 6}, timeout=10)
            failing = Background(post, url, COMPLETIONS, {**body, "prompt": "boom mid-stream"}, timeout=10)
            assert failing.result()[0] == 500
            status, answer = healthy.result()
            assert status == 200 and text_of(COMPLETIONS, answer) == ref
        assert app.state.worker.thread.is_alive()
    assert pool_idle(engine)


# -- a bounded soak: pages, memory, metrics -------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_a_soak_of_short_requests_leaves_the_pool_idle_memory_flat_and_metrics_adding_up():
    engine = tiny_engine(CausalDrafter(make_verifier("qwen3", seed=5)), num_pages=64)
    app = create_app(engine, ServerConfig(model_name="tiny", max_concurrent=4, max_tokens=64))
    kinds = ["whole", "stream", "leave", "bad", "chat"]

    def one(i, http):
        kind, prompt = kinds[i % len(kinds)], f"soak {i % 7}"
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0}
        if kind == "whole":
            status, answer = post(url, COMPLETIONS, body, http=http)
            assert status == 200 and answer["usage"]["completion_tokens"] == 3
        elif kind == "stream":
            out = stream_sse(url, CHAT, {"model": "tiny", "messages": [{"role": "user", "content": prompt}],
                                         "max_tokens": 4, "temperature": 0, "stream": True,
                                         "stream_options": {"include_usage": True}}, http=http)
            assert out["done"] and out["usage"]["completion_tokens"] == 4
        elif kind == "leave":
            stream_and_leave(url, COMPLETIONS, {**body, "max_tokens": 64, "stream": True}, lines=1, http=http)
        elif kind == "bad":
            assert post(url, COMPLETIONS, {**body, "max_tokens": 0}, http=http)[0] == 400
        else:
            status, _ = post(url, CHAT, {"model": "tiny", "messages": [{"role": "user", "content": prompt}],
                                         "max_tokens": 2, "temperature": 0}, http=http)
            assert status == 200

    def client_thread(n, start, c):
        with httpx.Client(timeout=30) as http:
            for i in range(c, n, 4):
                one(start + i, http)

    def run(n, start):
        threads = [Background(client_thread, n, start, c) for c in range(4)]
        for t in threads:
            t.result(120)
        wait_until(lambda: pool_idle(engine) and not app.state.worker.active, 20, "the pool to be idle")
        # every request is counted once (a stream as it ends, a moment after its client read its end)
        wait_until(lambda: sum(requests_by_status(url).values()) == start + n, 10, "every request to be counted")

    with serving(app) as url:
        run(40, 0)  # warm-up
        gc.collect()
        rss0, before = rss_bytes(), requests_by_status(url)
        n = 200
        run(n, 40)
        counted = counted_since(before, requests_by_status(url))
        # a client that leaves is counted once: as gone, or as served had it got everything before it left
        left, whole = counted.pop((COMPLETIONS, "499"), 0), counted.pop((COMPLETIONS, "200"), 0)
        assert left > 0 and left + whole == 2 * n // 5
        assert counted == {(CHAT, "200"): 2 * n // 5, (COMPLETIONS, "400"): n // 5}
        gc.collect()
        grew = rss_bytes() - rss0
        print(f"RSS grew by {grew / 2**20:.1f} MiB over {n} requests")
        assert grew < 64 << 20, f"RSS grew by {grew / 2**20:.1f} MiB over {n} requests"
    assert pool_idle(engine) and not app.state.worker.waiting


def test_server_with_draft_trees_answers_what_plain_decoding_would():
    from fastapi.testclient import TestClient

    from hybrid.drafters.diffusion import DiffusionDrafter

    v = make_verifier("qwen3")
    v.eos_token_ids = set()
    plain = Engine(v, None, num_pages=32, page_size=8).generate("abc", GenerationConfig(max_new_tokens=12)).text
    drafter = DiffusionDrafter.for_verifier(v, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=16, intermediate_size=64)
    engine = Engine(v, drafter, num_pages=32, page_size=8)
    with TestClient(create_app(engine, ServerConfig(model_name="tiny", max_tokens=64, tree=8))) as h:
        r = h.post(COMPLETIONS, json={"model": "tiny", "prompt": "abc", "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain
