"""Load test of `hybrid serve` on loopback: TTFT and tokens/s per client at several concurrency levels.

    python bench/load_test.py --url http://127.0.0.1:8000 --clients 1,4,16 --max-tokens 16

Bounded: each level sends exactly `clients` streaming chat requests at once (one per client) and gives
up after --timeout seconds. Prints one JSON line per level.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain what a hash map is in two sentences.",
    "What is 17 times 23? Show the steps.",
    "Translate into French: the train leaves at nine.",
]


async def one_client(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    return {"ttft_s": ttft if ttft is not None else wall, "tokens": tokens, "wall_s": wall}


async def level(url: str, model: str, clients: int, max_tokens: int, timeout: float) -> dict:
    async with httpx.AsyncClient(timeout=timeout) as client:
        t0 = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(one_client(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens)
                             for i in range(clients))),
            timeout,
        )
        wall = time.perf_counter() - t0
    per_client = [r["tokens"] / r["wall_s"] for r in results]
    return {
        "clients": clients,
        "ttft_s_mean": statistics.mean(r["ttft_s"] for r in results),
        "ttft_s_max": max(r["ttft_s"] for r in results),
        "tokens_per_s_per_client": statistics.mean(per_client),
        "tokens_per_s_total": sum(r["tokens"] for r in results) / wall,
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="hybrid")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    for n in (int(x) for x in args.clients.split(",")):
        out = asyncio.run(level(args.url, args.model, n, args.max_tokens, args.timeout))
        print(json.dumps({"label": args.label, **out}), flush=True)


if __name__ == "__main__":
    main()
