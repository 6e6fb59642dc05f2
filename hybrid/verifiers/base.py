"""The Verifier protocol: one forward pass scores the last committed token plus a block."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from hybrid.pages import PagePool, Sequence


@dataclass
class VerifyOutput:
    logits: torch.Tensor  # [B+1, V] float32: row i predicts the token after input position i
    hidden: torch.Tensor | None  # [B+1, n_layers * H] hidden states of the captured layers, or None


class Verifier(Protocol):
    name: str
    vocab_size: int
    max_context: int
    eos_token_ids: set[int]
    tokenizer: object

    def attach(self, pool: PagePool) -> None:
        """Register this model's KV cache with a page pool. A verifier keeps no per-pool or per-request state:
        every call works on the pages of the sequence it is given (seq.pool)."""

    def prefill(self, seq: Sequence, tokens: torch.Tensor, capture: list[int] = ()) -> torch.Tensor | None:
        """Write keys/values of context tokens [T]; returns the hidden states of layers `capture` [T, n*H] or None."""

    def score(self, seq: Sequence, tokens: torch.Tensor, parents: torch.Tensor | None = None,
              capture: list[int] = ()) -> VerifyOutput:
        """Score tokens [B+1] = [last committed token, d_1..d_B] in one forward pass.

        parents [B]: the draft is a tree (hybrid.tree): d_i's parent row; rows sit at their depth's position
        and attend only to their ancestors. Keys/values land in the next B+1 slots, in row order.
        capture: decoder layers whose outputs come back as `hidden` (what the drafter conditions on)."""

    def rollback(self, seq: Sequence, n: int) -> int:
        """Truncate the sequence to n tokens; returns the number removed."""
