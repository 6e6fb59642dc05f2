"""The speculative loop: draft -> verify -> accept -> commit -> roll back.

Invariant between rounds, for a sequence of n committed tokens: the verifier's pages hold
positions [0, n - 1) (every committed token but the last), and so do the drafter's context
features; the last committed token is the first input of the next verify pass.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from hybrid.acceptance import Acceptance, Noise, SamplingParams, accept_sampling, warp
from hybrid.drafters.base import Context, Draft, Drafter
from hybrid.drafters.ngram import find_suffix, follow
from hybrid.errors import UserError
from hybrid.pages import PagePool, Sequence
from hybrid.tree import accept_tree, chain_parents, depths


@dataclass
class LoopConfig:
    max_new_tokens: int = 128
    block_size: int = 4
    steps: int = 1
    stop_on_eos: bool = True
    lookup: int = 0  # prompt lookup first: >= this many context tokens recurring -> draft what followed them (0: off)
    lookup_block: int = 8  # longest lookup draft
    tree: int = 0  # draft trees of up to this many tokens (hybrid.tree) from drafters that offer them (0: chains)


@dataclass
class Round:
    """What one round did; the loop yields one per round (the first is the prefill)."""

    tokens: list[int]  # committed this round: accepted draft tokens + the bonus token
    block_size: int  # draft tokens proposed (may be below the size asked)
    steps: int
    accepted: int
    draft_s: float = 0.0
    verify_s: float = 0.0
    finish_reason: str | None = None  # "eos", "length" or None (the caller decides "stop")
    lookup: bool = False  # the draft came from prompt lookup, not the drafter
    tree_size: int = 0  # tokens in the round's draft tree (0: a chain of block_size tokens)


class Schedule(Protocol):
    """Chooses each round's (block size, steps) and hears how the round went (the coordinator)."""

    def next(self, limit: int | None = None) -> tuple[int, int]: ...

    def trim(self, conf: list[float]) -> int: ...

    def trim_tree(self, conf: list[float], parents: list[int]) -> int: ...

    def lookup(self, size: int, match: int) -> int: ...

    def observe(self, block_size: int, steps: int, accepted: int, draft_s: float, verify_s: float,
                drafted: int | None = None, conf: list[float] | None = None,
                tree: tuple[list[int], list[int]] | None = None) -> None: ...

    def observe_lookup(self, size: int, match: int, accepted: int, verify_s: float) -> None: ...


@dataclass
class FixedSchedule:
    block_size: int
    steps: int = 1

    def next(self, limit: int | None = None) -> tuple[int, int]:
        return self.block_size, self.steps

    def trim(self, conf: list[float]) -> int:
        return len(conf)

    def trim_tree(self, conf: list[float], parents: list[int]) -> int:
        return len(conf)

    def lookup(self, size: int, match: int) -> int:
        return size

    def observe(self, *args, **kw) -> None:
        pass

    def observe_lookup(self, *args, **kw) -> None:
        pass


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def speculative_decode(
    verifier,
    drafter: Drafter | None,
    pool: PagePool,
    prompt: list[int],
    cfg: LoopConfig,
    params: SamplingParams,
    schedule: Schedule | None = None,
    seq: Sequence | None = None,
) -> Iterator[Round]:
    """Generate from `prompt`, yielding each round's committed tokens as soon as they are committed.

    `drafter=None` is plain decoding (an empty draft every round). `schedule` (the coordinator)
    picks each round's block size and steps and observes each round; default: cfg's fixed values.
    With `cfg.lookup` = n, a round whose last n to 4 tokens occurred earlier in the context may draft
    what followed them instead (prompt lookup: free to draft, and long where the text repeats itself:
    code edits, summaries, lists); the schedule decides how much of that copy to verify (0: draft as usual).
    `seq`: a sequence of `pool` made for this request (with its worst case promised, `request_tokens`);
    None: one is made here. The caller may stop iterating at any point; the sequence's pages are freed
    either way.
    """
    check_prompt(prompt, verifier.max_context)
    schedule = schedule or FixedSchedule(cfg.block_size, cfg.steps)
    noise = None if params.greedy else Noise(params.seed if params.seed is not None else random.getrandbits(64))
    sampler = (params, noise)
    if seq is None:  # the whole request must fit the pool, or it is refused now
        seq = pool.new_sequence(request_tokens(len(prompt), cfg, verifier.max_context))
    ctx = Context(tokens=list(prompt), seq=seq)
    capture = list(drafter.capture_layers) if drafter is not None else []  # verifier layers the drafter reads
    try:
        # 1. prefill: every prompt token but the last into the verifier's pages (and the drafter's)
        t0 = time.perf_counter()
        hidden = verifier.prefill(seq, torch.tensor(prompt[:-1], dtype=torch.long), capture)
        if drafter is not None:
            drafter.observe(ctx, hidden, 0)
        _sync(verifier.device)
        yield Round([], 0, 0, 0, verify_s=time.perf_counter() - t0)

        generated = 0
        while True:
            n = len(ctx.tokens)
            room = min(cfg.max_new_tokens - generated, verifier.max_context - n)
            if room <= 0:
                return
            block_size, steps = schedule.next(limit=room - 1) if drafter is not None else (0, 0)
            block_size = max(0, min(block_size, room - 1))  # a round commits at most block_size + 1

            # 2. draft: propose a block after the last committed token
            t0 = time.perf_counter()
            draft = Draft(torch.empty(0, dtype=torch.long))
            copied, match = [], 0
            if drafter is not None and cfg.lookup:
                end, match = find_suffix(ctx.tokens, cfg.lookup)
                copied = follow(ctx.tokens, end, min(cfg.lookup_block, room - 1)) if match else []
                copied = copied[: schedule.lookup(len(copied), match)] if copied else []
            if copied:
                draft = Draft(torch.tensor(copied, dtype=torch.long))  # deterministic: q one-hot, no confidence
            elif drafter is not None and block_size > 0 and cfg.tree and hasattr(drafter, "propose_tree"):
                draft = drafter.propose_tree(ctx, block_size, max(cfg.tree, block_size), sampler)
                steps = 1
            elif drafter is not None and block_size > 0:
                draft = drafter.propose(ctx, block_size, steps, sampler)
            _sync(verifier.device)
            t1 = time.perf_counter()
            tree = draft.parents is not None
            node_depth = depths(draft.parents) if tree and draft.size else None  # [B] each tree node's draft position
            drafted = int(node_depth.max()) if node_depth is not None else draft.size  # draft positions covered
            conf = None if draft.conf is None else draft.conf.tolist()  # [B] the drafter's confidence per token
            if conf is not None and draft.size > 1:  # verify only as much as the schedule expects to pay
                keep = schedule.trim_tree(conf, draft.parents.tolist()) if tree else schedule.trim(conf)
                draft = draft.prefix(max(1, keep))
                conf = conf[: draft.size]
            depth = int(node_depth[: draft.size].max()) if node_depth is not None else draft.size  # verified part

            # 3. verify: the last committed token plus the draft, one forward pass -> logits [B+1, V]
            inputs = torch.cat([torch.tensor([ctx.tokens[-1]]), draft.tokens.cpu()])  # [B+1]
            out = verifier.score(seq, inputs, draft.parents if tree else None, capture)

            # 4. accept: the longest agreeing prefix (path of the tree) plus one token of the verifier's own
            if draft.q is None or params.greedy:  # deterministic: the verifier's token first, then matched (chains too)
                parents = draft.parents if tree else chain_parents(draft.size)
                walk = accept_tree(draft.tokens, parents, out.logits, params, noise, n)
                acc, path = Acceptance(len(walk.path), walk.bonus), walk.path  # path: accepted rows of the pass
            else:  # a sampled chain: rejection sampling against the drafter's q
                acc = accept_sampling(draft.tokens, draft.q, warp(out.logits, params), noise, n)
                path = list(range(1, acc.accepted + 1))
            _sync(verifier.device)
            t2 = time.perf_counter()

            # 5. commit: accepted draft tokens + bonus, cut at EOS and the token budget
            new = [int(draft.tokens[r - 1]) for r in path] + [acc.bonus]
            finish = None
            if cfg.stop_on_eos:
                for i, t in enumerate(new):
                    if t in verifier.eos_token_ids:
                        new, finish = new[: i + 1], "eos"
                        break
            ctx.tokens.extend(new)
            generated += len(new)
            if finish is None and (generated >= cfg.max_new_tokens or len(ctx.tokens) >= verifier.max_context):
                finish = "length"

            # 6. roll back: keep pages for the committed tokens but the last; drop rejected positions
            moved = [(n - 1 + r, n - 1 + d) for d, r in enumerate(path, start=1) if r != d]  # a tree's side path
            if moved:
                pool.move(verifier.name, seq, [s for s, _ in moved], [d for _, d in moved])
            kept = len(ctx.tokens) - 1
            if seq.length > kept:
                removed = verifier.rollback(seq, kept)
                assert removed == seq_len_before(n, draft) - kept, "rollback removed the wrong number of tokens"
            if drafter is not None and out.hidden is not None:
                drafter.observe(ctx, out.hidden[[0] + path], n - 1)

            # 7. coordinate: the schedule hears what this round cost and how much it kept
            if copied:
                schedule.observe_lookup(draft.size, match, acc.accepted, t2 - t1)
            else:
                schedule.observe(depth, steps, acc.accepted, t1 - t0, t2 - t1, drafted, conf,
                                 (draft.parents.tolist(), path) if tree else None)

            yield Round(new, depth, steps if draft.size and not copied else 0, acc.accepted, t1 - t0, t2 - t1,
                        finish, lookup=bool(copied), tree_size=draft.size if tree else 0)
            if finish is not None:
                return
    finally:
        pool.free(seq)


def check_prompt(prompt: list[int], max_context: int) -> None:
    if not prompt:
        raise UserError("empty prompt: give at least one token of text")
    if len(prompt) >= max_context:
        raise UserError(
            f"prompt of {len(prompt)} tokens does not fit the verifier's context window of "
            f"{max_context}: shorten the prompt"
        )


def request_tokens(prompt_tokens: int, cfg: LoopConfig, max_context: int) -> int:
    """Positions a request may hold in the pool at worst: its prompt and new tokens (at most the context
    window), plus one verify pass past them (a block or a tree)."""
    return min(prompt_tokens + cfg.max_new_tokens, max_context) + max(cfg.block_size, cfg.tree)


def seq_len_before(n: int, draft: Draft) -> int:
    """Positions the pages hold right after verifying a draft at n committed tokens."""
    return n + draft.size
