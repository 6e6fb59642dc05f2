"""Prompt-lookup (n-gram) drafting: copy what followed the last occurrence of the context's suffix."""
from __future__ import annotations

import torch

from hybrid.drafters.base import Context, Draft


def find_suffix(tokens: list[int], min_ngram: int = 1, max_ngram: int = 4) -> tuple[int, int]:
    """(end, n): the latest earlier occurrence of the longest suffix of `tokens` that is max_ngram down to
    min_ngram tokens long ends at index `end`; (-1, 0) when none occurred before. One backward pass over
    the context (a long chat costs about a millisecond per round)."""
    n_tok = len(tokens)
    if n_tok < 2:
        return -1, 0
    last = tokens[-1]
    best_len, best_end = 0, -1
    for end in range(n_tok - 2, -1, -1):  # latest earlier occurrence first: recent text predicts best
        if tokens[end] != last:
            continue
        m = 1
        while m < max_ngram and m <= end and tokens[end - m] == tokens[n_tok - 1 - m]:
            m += 1
        if m > best_len:
            best_len, best_end = m, end
            if m == max_ngram:
                break
    return (best_end, best_len) if best_len >= max(min_ngram, 1) else (-1, 0)


def follow(tokens: list[int], end: int, size: int) -> list[int]:
    """The `size` tokens that follow position `end` if the text repeats itself from there: past the end of
    `tokens` the copy goes on copying itself (period len(tokens) - end - 1), so a loop such as "a b a b"
    is continued whole rather than cut at the context's end."""
    start = end + 1
    period = len(tokens) - start
    return [tokens[start + i % period] for i in range(size)] if period > 0 else []


def lookup(tokens: list[int], block_size: int, min_ngram: int = 1, max_ngram: int = 4) -> list[int]:
    """block_size tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
    (max_ngram down to min_ngram tokens long; see `follow`); [] when no such suffix occurred before."""
    end, n = find_suffix(tokens, min_ngram, max_ngram)
    return follow(tokens, end, block_size) if n else []


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
        return lookup(tokens, block_size, self.min_ngram, self.max_ngram)
