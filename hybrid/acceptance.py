"""Sampling parameters, logit warping, and lossless acceptance of a draft.

Acceptance follows Leviathan et al. / Chen et al. (arXiv 2211.17192, 2302.01318): draft token x_i
(proposed from q_i) is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
the recovered token is sampled from norm(max(0, p_i - q_i)); if all B are accepted the bonus token is
sampled from p_B. The committed tokens are then distributed exactly as sampling from p alone.
A deterministic draft (q one-hot at x) is a valid proposal: accept with probability p(x), recover
from p with x removed. Greedy (temperature 0) is the limit: accept while x_i == argmax p_i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrid.errors import UserError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature} (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k} (0 turns it off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities from logits [N, V] after temperature, top-k and top-p -> [N, V] float32."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already cover top_p (the first one is always kept)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [N, V] -> [N]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Acceptance:
    accepted: int  # leading draft tokens kept
    bonus: int  # the verifier's own token after them (next or recovered)


def accept_greedy(draft: torch.Tensor, logits: torch.Tensor) -> Acceptance:
    """draft [B], logits [B+1, V]: keep draft tokens while they equal the verifier's argmax."""
    target = logits.argmax(dim=-1)  # [B+1]
    B = draft.numel()
    match = (draft.to(target.device) == target[:B]).int()  # [B]
    n = int(match.cumprod(0).sum()) if B else 0
    return Acceptance(n, int(target[n]))


def accept_sampling(
    draft: torch.Tensor,
    q: torch.Tensor | None,
    p: torch.Tensor,
    generator: torch.Generator | None,
) -> Acceptance:
    """Lossless rejection sampling. draft [B]; q [B, V] or None (one-hot at draft); p [B+1, V] warped."""
    B = draft.numel()
    draft = draft.to(p.device)
    rows = torch.arange(B, device=p.device)
    px = p[rows, draft]  # [B]
    qx = q[rows, draft] if q is not None else torch.ones_like(px)  # [B]
    u = torch.rand(B, generator=generator, device=p.device)  # [B]
    ok = (u * qx < px).int()  # u < p/q without dividing by q
    n = int(ok.cumprod(0).sum()) if B else 0
    if n == B:
        return Acceptance(n, int(sample(p[B : B + 1], generator)[0]))
    q_n = q[n] if q is not None else torch.nn.functional.one_hot(draft[n], p.shape[-1]).to(p.dtype)
    residual = (p[n] - q_n).clamp_min(0)  # [V]
    if residual.sum() <= 0:  # p == q: rejection has probability 0; guard rounding
        residual = p[n]
    return Acceptance(n, int(sample((residual / residual.sum()).unsqueeze(0), generator)[0]))


def accept(draft, q, logits, params: SamplingParams, generator) -> Acceptance:
    """Greedy or sampling acceptance of draft [B] against verifier logits [B+1, V]."""
    if params.greedy:
        return accept_greedy(draft, logits)
    return accept_sampling(draft, q, warp(logits, params), generator)
