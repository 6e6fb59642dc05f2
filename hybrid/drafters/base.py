"""The Drafter protocol and the Draft it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from hybrid.pages import PagePool, Sequence
from hybrid.tree import chain_parents


@dataclass
class Draft:
    tokens: torch.Tensor  # [B] int64; B may be shorter than asked (0: nothing to propose)
    q: torch.Tensor | None = None  # [B, V] proposal probabilities; None: deterministic (one-hot at tokens)
    # [B] the drafter's confidence in each position (its probability of the drafted token, for a deterministic
    # draft); None: unknown. It decides how much of the draft is verified, so for a sampled draft (q set) it must
    # not depend on the draft's own random choices (whether x_i is verified must not depend on x_i).
    conf: torch.Tensor | None = None
    # [B] the draft as a tree (hybrid.tree): each token's parent row (0: the last committed token); left None, a
    # chain's (i - 1). Tree tokens are deterministic proposals (q None); conf is each node's own probability.
    parents: torch.Tensor | None = None

    def __post_init__(self):
        if self.parents is None:
            self.parents = chain_parents(self.size)

    @property
    def size(self) -> int:
        return int(self.tokens.numel())

    def prefix(self, n: int) -> "Draft":
        """The first n draft tokens (a draft trimmed before verification; a tree's first n nodes, best first)."""
        if n >= self.size:
            return self
        cut = lambda t: None if t is None else t[:n]
        return Draft(self.tokens[:n], cut(self.q), cut(self.conf), cut(self.parents))  # a tree's prefix is a tree


@dataclass
class Ask:
    """What the loop asks of a drafter for one sequence in one step."""

    ctx: "Context"
    block_size: int  # draft positions wanted (0: nothing to draft, only read the context up to `upto`)
    steps: int = 1  # denoising steps
    tree: int = 0  # a draft tree of up to this many tokens (0: a chain)
    sampler: tuple = None  # (SamplingParams, Noise or None)
    upto: int | None = None  # with block_size 0: read committed tokens up to this position (a prompt chunk)


@dataclass
class Context:
    """What a drafter sees of one sequence: the committed tokens and its pages."""

    tokens: list[int]  # all committed tokens, prompt included
    seq: Sequence | None = None
    extra: dict = field(default_factory=dict)  # per-sequence drafter state


class Drafter(Protocol):
    name: str
    max_block_size: int
    max_steps: int
    capture_layers: list[int]  # verifier layers whose hidden states the drafter conditions on ([] for none)

    def attach(self, pool: PagePool, verifier) -> None:
        """Check compatibility with the verifier and register KV caches with the shared pool."""

    def observe(self, ctx: Context, hidden: torch.Tensor | None, start: int) -> None:
        """Committed context positions [start, start + m) with the verifier's captured hidden states [m, n*H]."""

    def propose(self, ctx: Context, block_size: int, steps: int, sampler) -> Draft:
        """Draft up to block_size tokens following ctx.tokens in `steps` denoising steps. sampler: (SamplingParams,
        Noise or None); a drafter that samples draws the token of sequence position t with Noise.uniform(t, DRAFT)
        and returns its q."""

    # Optional: drafters that give a distribution per block position may also offer
    # propose_tree(ctx, block_size, budget, sampler) -> Draft with parents set: a tree of at most `budget`
    # tokens and depth block_size (hybrid.tree). The loop uses it when LoopConfig.tree > 0.
    # Drafters that can draft for several sequences in one pass offer propose_many(asks: list[Ask]) ->
    # list[Draft | None] (None for an ask with block_size 0); the loop then makes one call per step.
