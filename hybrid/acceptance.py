"""Sampling parameters, logit warping, counter-based random numbers, and lossless acceptance of a draft.

Terms (../DESIGN.md): draft tokens x_1..x_B after the last committed token; the verifier's warped
distributions p_1..p_{B+1}; accepted tokens (the leading draft tokens kept); the recovered token
(the verifier's own token where a draft token is rejected) and the bonus token (after all B).

Random numbers are counter-based: the uniform a request uses for a purpose at a sequence position is a
hash of (seed, position, purpose) (`Noise`), not the next draw of a generator. So what a round draws
does not depend on how many numbers earlier rounds drew, no generator is bound to a device, and a
token's randomness is the same whatever block sizes, trees or draft sources the rounds used.

Deterministic drafts (q one-hot: argmax drafts, trees, prompt-lookup copies). The verifier's token at
position t is sampled first, y_t = F_t^{-1}(u_t) (inverse CDF of p_t with the uniform of position t),
and the walk accepts a draft token iff it equals y_t (hybrid.tree, chains being trees whose parents are
i - 1). A draft token x is then accepted with probability p(x) and the recovered token follows
norm(p with x removed) = norm(max(0, p - q)): Leviathan et al.'s rule for a one-hot q, with one more
property: every committed token is F_t^{-1}(u_t) of its own prefix, which is what plain sampling with
the same seed commits. A seed therefore gives the same output as plain decoding, for any block size.

Sampled drafts (q the drafter's distribution): Leviathan et al. / Chen et al. (arXiv 2211.17192,
2302.01318): accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection sample the
recovered token from norm(max(0, p_i - q_i)); if all B are accepted sample the bonus from p_{B+1}.
q_i must be x_i's law given x_1..x_{i-1}, and which positions are verified must not depend on x_i.
Committed tokens are distributed exactly as sampling from p alone; which ones a seed gives depends on
the drafts. Greedy (temperature 0) is the limit: accept while x_i == argmax p_i.
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


_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers whose outputs look independent."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


TOKEN, ACCEPT, RESIDUAL, DRAFT = range(4)  # what a uniform is for: the verifier's token, an accept test,
# a recovered token after a rejection, a drafter's sampled token


@dataclass(frozen=True)
class Noise:
    """A request's random numbers: uniform(position, purpose) in [0, 1), a function of the seed alone."""

    seed: int

    def uniform(self, position: int, purpose: int = TOKEN) -> float:
        x = _mix(_mix(_mix(self.seed & _MASK) ^ position) ^ purpose)
        return (x >> 11) * 2.0**-53

    def uniforms(self, positions, purpose: int = TOKEN) -> list[float]:
        return [self.uniform(int(t), purpose) for t in positions]


def sample(probs: torch.Tensor, u: list[float]) -> torch.Tensor:
    """One token per row of probs [N, V] by inverse CDF with the uniforms u [N] -> [N] (never a zero-probability
    token). On the probabilities' own device: no generator is involved."""
    cdf = probs.float().cumsum(-1)  # [N, V]
    x = torch.tensor(u, dtype=cdf.dtype, device=cdf.device)[:, None] * cdf[:, -1:]  # [N, 1]
    tok = torch.searchsorted(cdf, x, right=True)[:, 0]  # the first token whose cdf exceeds x
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)  # [N] the last token with mass (x rounding to 1)
    return torch.minimum(tok, last)


@dataclass
class Acceptance:
    accepted: int  # leading draft tokens kept
    bonus: int  # the verifier's own token after them (next or recovered)


def accept_sampling(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor, noise: Noise, start: int) -> Acceptance:
    """Rejection sampling of a sampled draft. draft [B] at sequence positions start .. start + B - 1; q [B, V]
    the drafter's distributions it was drawn from; p [B+1, V] the verifier's, warped."""
    B = draft.numel()
    draft = draft.to(p.device)
    rows = torch.arange(B, device=p.device)
    px, qx = p[rows, draft], q.to(p.device)[rows, draft]  # [B]
    u = torch.tensor(noise.uniforms(range(start, start + B), ACCEPT), dtype=p.dtype, device=p.device)  # [B]
    ok = (u * qx < px).int()  # u < p/q without dividing by q
    n = int(ok.cumprod(0).sum()) if B else 0
    if n == B:
        return Acceptance(n, int(sample(p[B : B + 1], [noise.uniform(start + B, TOKEN)])[0]))
    residual = (p[n] - q[n].to(p.device)).clamp_min(0)  # [V]
    if residual.sum() <= 0:  # p == q: rejection has probability 0; guard rounding
        residual = p[n]
    return Acceptance(n, int(sample(residual[None], [noise.uniform(start + n, RESIDUAL)])[0]))
