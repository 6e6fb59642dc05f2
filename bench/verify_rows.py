"""Verifier forward time against the number of new tokens (rows) in one pass, with a KV cache.

On a CPU in bf16, one row can be slower than two (matrix-vector vs matrix-matrix kernels), which makes
small blocks nearly free and flatters every speculative method against plain decoding:

    .venv/bin/python bench/verify_rows.py [--model demo:1.5b] [--context 120] [--repeats 6]
"""
import argparse
import time

import torch
from transformers import DynamicCache

from hybrid.verifiers.hf import load_causal_lm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo:1.5b")
    ap.add_argument("--context", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--rows", default="1,2,3,4,8,16")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = ap.parse_args()
    model, _ = load_causal_lm(a.model, getattr(torch, a.dtype))
    model.eval()
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    ctx = torch.randint(0, vocab, (1, a.context))  # [1, S]
    with torch.inference_mode():
        for n in [int(x) for x in a.rows.split(",")]:
            times = []
            for _ in range(a.repeats):
                cache = DynamicCache()
                model(ctx, past_key_values=cache, use_cache=True)
                x = torch.randint(0, vocab, (1, n))  # [1, n]
                t = time.perf_counter()
                model(x, past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - t)
            print(f"{n:3d} rows: median {sorted(times)[len(times) // 2] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
