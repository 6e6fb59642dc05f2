"""The Verifier protocol: one forward pass scores the last committed token plus a block."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from hybrid.pages import KVView, PagePool, Sequence
from hybrid.tree import depths, tree_mask


@dataclass
class VerifyOutput:
    logits: torch.Tensor | None  # [T, V] float32: row i predicts the token after input row i (None: not asked)
    hidden: torch.Tensor | None  # [T, n_layers * H] hidden states of the captured layers, or None


@dataclass
class Rows:
    """One sequence's rows of a forward pass: `tokens` [T] at the next T positions of `view`'s model."""

    view: KVView
    tokens: torch.Tensor  # [T] int64
    parents: torch.Tensor | None = None  # [T-1]: rows 1.. form a tree over row 0 (hybrid.tree); None: a chain
    logits: int | None = None  # logits of the last this many rows are wanted (None: every row's; 0: none)

    def positions(self, start: int) -> torch.Tensor:
        """Sequence position of each row -> [T]: a chain's follow each other, a tree node sits at its depth."""
        if self.parents is None:
            return torch.arange(start, start + self.tokens.numel())
        return start + torch.cat([torch.zeros(1, dtype=torch.long), depths(self.parents)])

    def mask(self) -> torch.Tensor:
        """Which of its own rows each row attends to -> [T, T] bool (a chain: causal; a tree: its ancestors)."""
        if self.parents is None:
            return torch.ones(self.tokens.numel(), self.tokens.numel(), dtype=torch.bool).tril()
        return tree_mask(self.parents)


class Verifier(Protocol):
    name: str
    vocab_size: int
    max_context: int
    eos_token_ids: set[int]
    tokenizer: object

    def attach(self, pool: PagePool) -> None:
        """Register this model's KV cache with a page pool. A verifier keeps no per-pool or per-request state:
        every call works on the pages of the sequences it is given (seq.pool)."""

    def view(self, seq: Sequence) -> KVView:
        """This model's keys/values of `seq`."""

    def forward(self, batch: list[Rows], capture: list[int] = ()) -> list[VerifyOutput]:
        """One forward pass over several sequences' rows (each its own tokens, positions, tree and pages)."""

    def prefill(self, seq: Sequence, tokens: torch.Tensor, capture: list[int] = ()) -> torch.Tensor | None:
        """Write keys/values of context tokens [T]; returns the hidden states of layers `capture` [T, n*H] or None."""

    def score(self, seq: Sequence, tokens: torch.Tensor, parents: torch.Tensor | None = None,
              capture: list[int] = ()) -> VerifyOutput:
        """Score tokens [B+1] = [last committed token, d_1..d_B] in one forward pass.

        parents [B]: the draft is a tree (hybrid.tree): d_i's parent row; rows sit at their depth's position
        and attend only to their ancestors. Keys/values land in the next B+1 slots, in row order.
        capture: decoder layers whose outputs come back as `hidden` (what the drafter conditions on)."""
