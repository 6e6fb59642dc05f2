"""A small causal LM as drafter, one token at a time (the classic draft-model baseline).

Its keys/values live in the shared page pool under its own model name, on the same block
table as the verifier. With the verifier's own model as drafter every draft token is accepted.
"""
from __future__ import annotations

import torch

from hybrid.acceptance import DRAFT, sample, warp
from hybrid.drafters.base import Context, Draft
from hybrid.verifiers.hf import HFVerifier
from hybrid.vocab import check_same_vocab


class CausalDrafter:
    """draft_sampling: "sample" (at temperature > 0 each token is sampled from the drafter's warped distribution,
    q carried to the rejection sampler) or "argmax" (always its most probable token: a deterministic draft,
    with its probability as the confidence the coordinator trims by). Greedy decoding always drafts the argmax."""

    capture_layers: list[int] = []
    max_steps = 1

    def __init__(self, lm: HFVerifier, max_block_size: int = 16, draft_sampling: str = "sample"):
        if draft_sampling not in ("sample", "argmax"):
            raise ValueError(f"draft_sampling must be sample or argmax, got {draft_sampling!r}")
        self.lm = lm
        self.lm.name = "drafter"
        self.name = "causal"
        self.max_block_size = max_block_size
        self.draft_sampling = draft_sampling

    @classmethod
    def from_pretrained(cls, spec: str, dtype="auto", device: str = "cpu") -> "CausalDrafter":
        return cls(HFVerifier.from_pretrained(spec, dtype, device))

    def attach(self, pool, verifier) -> None:
        check_same_vocab(verifier, self.lm.tokenizer, self.lm.vocab_size, "drafter")
        self.lm.attach(pool)

    def observe(self, ctx: Context, hidden, start: int) -> None:
        pass  # catches up lazily in propose

    @torch.inference_mode()
    def propose(self, ctx: Context, block_size: int, steps: int, sampler) -> Draft:
        params, noise = sampler
        sampled = not params.greedy and self.draft_sampling == "sample"
        seq, n = ctx.seq, len(ctx.tokens)
        view = self.lm.view(seq)
        done = view.length
        tokens: list[int] = []
        qs: list[torch.Tensor] = []  # [V] each sampled token's distribution
        conf: list[float] = []  # each argmax token's probability
        pending = torch.tensor(ctx.tokens[done:], dtype=torch.long)  # context the drafter has not seen
        for i in range(block_size):
            logits = self.lm.score(seq, pending).logits[-1:]  # [1, V]
            if sampled:
                q = warp(logits, params)  # [1, V]
                tok = int(sample(q, [noise.uniform(n + i, DRAFT)])[0])
                qs.append(q[0])
            else:
                p, tok = torch.softmax(logits[0].float(), -1).max(-1)
                tok = int(tok)
                conf.append(float(p))
            tokens.append(tok)
            pending = torch.tensor([tok])
        view.trim(n)  # keep only the committed context [0, n); the draft's positions are rewritten next round
        draft = torch.tensor(tokens, dtype=torch.long)
        if not sampled:
            return Draft(draft, None, torch.tensor(conf))
        return Draft(draft, torch.stack(qs) if qs else torch.zeros(0, self.lm.vocab_size))
