"""Prompt-lookup (n-gram) drafter: copy what followed the last occurrence of the context's suffix."""
from __future__ import annotations

import torch

from hybrid.drafters.base import Context, Draft


class NgramDrafter:
    """Finds the longest suffix of the context (max_ngram down to min_ngram tokens) seen earlier
    in the context and proposes the tokens that followed it. Deterministic: q is one-hot."""

    name = "ngram"
    capture_layers: list[int] = []
    max_steps = 1

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, max_block_size: int = 16):
        self.max_ngram, self.min_ngram, self.max_block_size = max_ngram, min_ngram, max_block_size

    def attach(self, pool, verifier) -> None:
        pass

    def observe(self, ctx: Context, hidden, start: int) -> None:
        pass

    def propose(self, ctx: Context, block_size: int, steps: int, sampler=None) -> Draft:
        return Draft(torch.tensor(self.lookup(ctx.tokens, block_size), dtype=torch.long))

    def lookup(self, tokens: list[int], block_size: int) -> list[int]:
        n_tok = len(tokens)
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            suffix = tokens[n_tok - n :]
            # latest earlier occurrence first: recent text predicts best
            for start in range(n_tok - n - 1, -1, -1):
                if tokens[start : start + n] == suffix:
                    follow = tokens[start + n : start + n + block_size]
                    if follow:
                        return follow
        return []
