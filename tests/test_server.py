"""`hybrid serve` on loopback with tiny models: OpenAI client streaming, concurrency, disconnects, 4xx."""
import json
import threading
import time

import httpx
import pytest
import uvicorn

from conftest import make_verifier
from hybrid.drafters.causal import CausalDrafter
from hybrid.engine import Engine, GenerationConfig
from hybrid.server import ServerConfig, create_app

MESSAGES = [{"role": "user", "content": "say something"}]


@pytest.fixture(scope="module")
def server():
    engine = Engine(make_verifier("qwen3"), CausalDrafter(make_verifier("qwen3", seed=5)), num_pages=48, page_size=8)
    engine.verifier.eos_token_ids = set()  # run to max_tokens: deterministic lengths
    refs = {}
    for n in (8, 20):
        refs[n] = engine.generate(engine.encode_messages(MESSAGES), GenerationConfig(max_new_tokens=n)).text
    app = create_app(engine, ServerConfig(model_name="tiny", max_concurrent=4, max_tokens=64, max_prompt_tokens=200))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", engine, refs
    srv.should_exit = True
    t.join(timeout=10)


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_openai_client_streams_the_same_text_as_generate(server):
    url, engine, refs = server
    stream = client(url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == refs[20]
    done = client(url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert done.choices[0].message.content == refs[8] and done.usage.completion_tokens == 8


def test_completions_endpoint_stream_and_non_stream(server):
    url, engine, _ = server
    ref = engine_text = client(url).completions.create(model="tiny", prompt="abc", max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].text for c in client(url).completions.create(
        model="tiny", prompt="abc", max_tokens=10, temperature=0, stream=True))
    assert streamed == ref.choices[0].text and ref.choices[0].finish_reason == "length"


def test_sixteen_concurrent_streaming_clients_all_finish_correctly(server):
    url, engine, refs = server
    results = [None] * 16

    def one(i):
        s = client(url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0,
                                                stream=True)
        results[i] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [refs[20]] * 16
    assert engine.pool.free_pages == engine.pool.num_pages


def test_a_client_that_disconnects_frees_its_pages(server):
    url, engine, _ = server
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            next(lines)
            assert engine.pool.free_pages < engine.pool.num_pages  # the sequence holds pages now
        # leaving the block closes the connection mid-stream
    deadline = time.time() + 20
    while engine.pool.free_pages != engine.pool.num_pages and time.time() < deadline:
        time.sleep(0.05)
    assert engine.pool.free_pages == engine.pool.num_pages


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ("{not json", 400, ""),
        ({"model": "other", "messages": MESSAGES}, 404, "does not exist"),
        ({"model": "tiny", "messages": MESSAGES, "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "tiny", "messages": MESSAGES, "temperature": 3.5}, 400, "temperature"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny", "messages": MESSAGES, "max_tokens": 500}, 400, "limit"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 300}]}, 400, "prompt"),
        ({"model": "tiny"}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_shaped_4xx_and_the_server_keeps_serving(server, body, status, fragment):
    url, _, refs = server
    with httpx.Client(timeout=30) as h:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
        r = h.post(url + "/v1/chat/completions", **kw)
        assert r.status_code == status
        err = r.json()["error"]
        assert fragment in err["message"] and "type" in err
        ok = h.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 8,
                                                         "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == refs[8]


def test_request_larger_than_the_page_budget_is_refused_and_serving_goes_on():
    from fastapi.testclient import TestClient

    engine = Engine(make_verifier("qwen3"), None, num_pages=4, page_size=8)  # 32 token positions in all
    with TestClient(create_app(engine, ServerConfig(model_name="tiny", max_tokens=64))) as h:
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "abcdefghij", "max_tokens": 40, "temperature": 0})
        assert r.status_code == 400 and "pages" in r.json()["error"]["message"]
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5


def test_health_models_and_metrics(server):
    url, _, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
    m = httpx.get(url + "/metrics").text
    for name in ("hybrid_requests_total", "hybrid_generated_tokens_total", "hybrid_acceptance_length_bucket",
                 "hybrid_block_size_bucket", "hybrid_time_to_first_token_seconds_bucket"):
        assert name in m


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
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain
