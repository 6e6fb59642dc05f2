"""The speculative loop: draft -> verify -> accept -> commit -> roll back, for many sequences at once.

A `Scheduler` step is one round for every active sequence: their drafts in as few drafter passes as the
drafter allows (one for a drafter with `propose_many`), all their verify rows in one verifier pass (ragged:
each sequence its own draft tree, positions, pages and attention mask), then acceptance, commit and roll back
per sequence. A draft is always a tree: a chain is the tree whose parents are i - 1, so there is one verify
and one acceptance path. New sequences' prompts join the pass in chunks (`prefill_chunk` tokens a step in
all, oldest first), so a long prompt does not stall the others. A request alone is a scheduler with one
sequence (`Engine.stream`).

Invariant between rounds, for a sequence of n committed tokens: the verifier's pages hold
positions [0, n - 1) (every committed token but the last), and so do the drafter's context
features; the last committed token is the first input of the next verify pass.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from hybrid.acceptance import Noise, SamplingParams, accept_sampling, warp
from hybrid.coordinator import CostModel, Load
from hybrid.drafters.base import Ask, Context, Draft, Drafter
from hybrid.drafters.ngram import find_suffix, follow
from hybrid.errors import UserError
from hybrid.pages import PagePool, Sequence
from hybrid.tree import accept_tree, chain_parents, depths
from hybrid.verifiers.base import Rows


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
    """What one round did for one sequence; the loop yields one per round (the first is the prefill)."""

    tokens: list[int]  # committed this round: accepted draft tokens + the bonus token
    block_size: int  # draft tokens proposed (may be below the size asked)
    steps: int
    accepted: int
    draft_s: float = 0.0  # the step's drafter seconds (shared by every sequence of the step)
    verify_s: float = 0.0  # the step's verifier pass (shared likewise)
    finish_reason: str | None = None  # "eos", "length" or None (the caller decides "stop")
    lookup: bool = False  # the draft came from prompt lookup, not the drafter
    tree_size: int = 0  # tokens in the round's draft tree (0: a chain of block_size tokens)
    batch: int = 1  # sequences in the step's verifier pass
    rows: int = 0  # rows of the step's verifier pass (all sequences)


class Schedule(Protocol):
    """Chooses each round's (block size, steps) and hears how the round went (the coordinator)."""

    def next(self, limit: int | None = None) -> tuple[int, int]: ...

    def trim(self, conf: list[float], parents: list[int] | None = None) -> int: ...

    def lookup(self, size: int, match: int) -> int: ...

    def observe(self, block_size: int, steps: int, accepted: int, draft_s: float | None, verify_s: float | None,
                drafted: int | None = None, conf: list[float] | None = None,
                tree: tuple[list[int], list[int]] | None = None) -> None: ...

    def observe_lookup(self, size: int, match: int, accepted: int, verify_s: float | None) -> None: ...


@dataclass
class FixedSchedule:
    block_size: int
    steps: int = 1

    def next(self, limit: int | None = None) -> tuple[int, int]:
        return self.block_size, self.steps

    def trim(self, conf: list[float], parents: list[int] | None = None) -> int:
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


@dataclass(eq=False)
class Active:
    """One sequence in a scheduler: its request and where it stands."""

    prompt: list[int]
    cfg: LoopConfig
    params: SamplingParams
    schedule: Schedule
    seq: Sequence
    ctx: Context
    noise: Noise | None
    prefilled: int = 0  # prompt tokens in the verifier's pages; the prefill is done at len(prompt) - 1
    started: bool = False  # its prefill round has been reported: it decodes from now on
    generated: int = 0
    finish: str | None = None
    rows: int = 0  # rows it put in the last pass


@dataclass
class Plan:
    """One decoding sequence's round: what it drafts and verifies."""

    active: Active
    block_size: int = 0
    steps: int = 0
    room: int = 0  # new tokens it may still commit this round
    copied: list[int] = field(default_factory=list)  # a prompt-lookup copy to verify instead of a draft
    match: int = 0
    draft: Draft | None = None
    drafted: int = 0  # draft positions the drafter covered (a tree's depth)
    conf: list[float] | None = None
    path: list[int] = field(default_factory=list)  # accepted rows of the verify pass


class Scheduler:
    """Runs rounds for many sequences over one verifier (and drafter) and one page pool."""

    def __init__(self, verifier, drafter: Drafter | None, pool: PagePool, costs: CostModel | None = None,
                 prefill_chunk: int | None = None):
        """`costs`: the timings the sequences' coordinators share (the scheduler records each pass's once there
        when several sequences share it, and says what load the next pass is expected to carry).
        `prefill_chunk`: prompt tokens prefilled per step in all (None: every waiting prompt whole)."""
        self.verifier, self.drafter, self.pool, self.costs = verifier, drafter, pool, costs
        self.prefill_chunk = prefill_chunk
        self.active: list[Active] = []
        self.capture = list(drafter.capture_layers) if drafter is not None else []  # verifier layers it reads
        self.last_rows = 0  # rows of the last pass
        self.committing = False  # the step in progress has begun to commit

    def add(self, prompt: list[int], cfg: LoopConfig, params: SamplingParams, schedule: Schedule | None = None,
            seq: Sequence | None = None) -> Active:
        """A new sequence. `seq`: made for this request with its worst case promised (`request_tokens`); None:
        one is made here (PagesExhausted if the pool cannot promise it)."""
        check_prompt(prompt, self.verifier.max_context)
        if seq is None:
            seq = self.pool.new_sequence(request_tokens(len(prompt), cfg, self.verifier.max_context))
        noise = None if params.greedy else Noise(params.seed if params.seed is not None else random.getrandbits(64))
        a = Active(list(prompt), cfg, params, schedule or FixedSchedule(cfg.block_size, cfg.steps), seq,
                   Context(tokens=list(prompt), seq=seq), noise)
        self.active.append(a)
        return a

    def reset(self, a: Active) -> None:
        """Drop what a failed step wrote past the sequence's committed state (every model's pages)."""
        kept = len(a.ctx.tokens) - 1 if a.started else a.prefilled
        if a.seq.length > kept:
            self.pool.rollback(a.seq, kept)

    def remove(self, a: Active) -> None:
        """The sequence leaves (finished or given up): its pages go back to the pool."""
        if a in self.active:
            self.active.remove(a)
        self.pool.free(a.seq)

    def step(self, only: list[Active] | None = None) -> list[tuple[Active, Round]]:
        """One round for every active sequence (a prefill chunk for those still reading their prompt) -> each
        sequence's Round. A finished sequence stays until `remove`d and takes no part in later steps. `only`:
        these sequences alone. An exception before the commit phase (`committing` still False) leaves every
        sequence as it was, but for pages written past its committed tokens, which `reset` drops."""
        self.committing = False
        live = [a for a in (self.active if only is None else only) if a.finish is None]
        prefills = self._prefill_chunks([a for a in live if not a.started])
        decoding = [a for a in live if a.started]

        # 1. plan: each decoding sequence's block size and steps (its schedule, told the load), or a lookup copy
        plans = [self._plan(a, len(decoding)) for a in decoding]
        done = [(a, Round([], 0, 0, 0, finish_reason=a.finish)) for a, p in zip(decoding, plans) if p is None]
        plans = [p for p in plans if p is not None]

        # 2. draft: one drafter call for every sequence that drafts (and reads its prompt chunk, if it reads tokens)
        t0 = time.perf_counter()
        self._draft(plans, prefills)
        _sync(self.verifier.device)
        t1 = time.perf_counter()

        # 3. trim: verify as much of each draft as its schedule expects to pay for (a draft is a tree)
        for p in plans:
            if p.conf is not None and p.draft.size > 1:
                self._set_load(p.active, len(plans))
                keep = p.active.schedule.trim(p.conf, p.draft.parents.tolist())
                p.draft = p.draft.prefix(max(1, keep))
                p.conf = p.conf[: p.draft.size]

        # 4. verify: one pass over the prompt chunks and every sequence's [last committed token, draft]
        batch = [Rows(self.verifier.view(a.seq), torch.tensor(a.prompt[start:end]), logits=0)
                 for a, (start, end) in prefills.items()]
        batch += [Rows(self.verifier.view(p.active.seq), torch.cat([torch.tensor([p.active.ctx.tokens[-1]]),
                                                                    p.draft.tokens.cpu()]), p.draft.parents)
                  for p in plans]
        outs = self.verifier.forward(batch, self.capture) if batch else []
        rows = sum(r.tokens.numel() for r in batch)
        for a, (start, end), o in zip(prefills, prefills.values(), outs):
            a.prefilled, a.rows = end, end - start
            if self.drafter is not None and o.hidden is not None:
                self.drafter.observe(a.ctx, o.hidden, start)

        # 5. accept, commit and roll back, per sequence
        self.committing = True
        committed = [self._commit(p, o) for p, o in zip(plans, outs[len(prefills):])]
        _sync(self.verifier.device)
        t2 = time.perf_counter()

        # 6. coordinate: each schedule hears its round; the pass's timings are recorded once for all
        shared = len(plans) + len(prefills) > 1
        if shared and self.costs is not None and rows:
            drafted = sum(p.draft.size for p in plans if not p.copied)
            self.costs.observe(rows - 1, max([p.steps for p in plans] + [1]), t1 - t0, t2 - t1, drafted)
        self.last_rows = rows
        out = done
        for a in prefills:
            if a.prefilled >= len(a.prompt) - 1:
                a.started = True
                out.append((a, Round([], 0, 0, 0, t1 - t0, t2 - t1, batch=len(batch), rows=rows)))
        for a in [a for a in live if not a.started and a not in prefills]:  # nothing to prefill: a one-token prompt
            if a.prefilled >= len(a.prompt) - 1:
                a.started = True
                out.append((a, Round([], 0, 0, 0, batch=len(batch), rows=rows)))
        for p, (accepted, depth, new) in zip(plans, committed):
            s = p.active.schedule
            draft_s, verify_s = (None, None) if shared else (t1 - t0, t2 - t1)
            if p.copied:
                s.observe_lookup(p.draft.size, p.match, accepted, verify_s)
            else:
                s.observe(depth, p.steps, accepted, draft_s, verify_s, p.drafted, p.conf,
                          (p.draft.parents.tolist(), p.path))
            chain = p.copied or bool(torch.equal(p.draft.parents, chain_parents(p.draft.size)))
            out.append((p.active, Round(new, depth, p.steps if p.draft.size and not p.copied else 0, accepted,
                                        t1 - t0, t2 - t1, p.active.finish, lookup=bool(p.copied),
                                        tree_size=0 if chain else p.draft.size, batch=len(batch), rows=rows)))
        return out

    # -- the phases' parts -------------------------------------------------------------------------
    def _prefill_chunks(self, waiting: list[Active]) -> dict[Active, tuple[int, int]]:
        """Prompt positions [start, end) each sequence still reading its prompt prefills this step, oldest first,
        `prefill_chunk` tokens in all."""
        budget = self.prefill_chunk if self.prefill_chunk is not None else float("inf")
        chunks = {}
        for a in waiting:
            left = len(a.prompt) - 1 - a.prefilled
            take = int(min(left, budget))
            if take > 0:
                chunks[a] = (a.prefilled, a.prefilled + take)
                budget -= take
        return chunks

    def _set_load(self, a: Active, sequences: int) -> None:
        """Tell the cost model what the pass is expected to carry besides this sequence's rows."""
        if self.costs is not None:
            self.costs.load = Load(sequences=max(1, sequences), others=max(0, self.last_rows - a.rows),
                                   shared_draft=hasattr(self.drafter, "propose_many"))

    def _plan(self, a: Active, sequences: int) -> Plan | None:
        """The sequence's round: a block size and steps from its schedule, or a prompt-lookup copy."""
        cfg, n = a.cfg, len(a.ctx.tokens)
        room = min(cfg.max_new_tokens - a.generated, self.verifier.max_context - n)
        if room <= 0:  # nothing more may be committed: it ends without a round
            a.finish = "length"
            return None
        p = Plan(a, room=room)
        if self.drafter is None:
            return p
        self._set_load(a, sequences)
        block_size, p.steps = a.schedule.next(limit=room - 1)
        p.block_size = max(0, min(block_size, room - 1))  # a round commits at most block_size + 1
        if cfg.lookup:
            end, p.match = find_suffix(a.ctx.tokens, cfg.lookup)
            copied = follow(a.ctx.tokens, end, min(cfg.lookup_block, room - 1)) if p.match else []
            p.copied = copied[: a.schedule.lookup(len(copied), p.match)] if copied else []
        return p

    def _draft(self, plans: list[Plan], prefills: dict[Active, tuple[int, int]]) -> None:
        """Every plan's draft, in one drafter call where the drafter drafts many sequences at once."""
        asks = []
        for p in plans:
            if p.copied:
                p.draft = Draft(torch.tensor(p.copied, dtype=torch.long))  # deterministic: q one-hot, no confidence
            elif p.block_size > 0:
                tree = p.active.cfg.tree if hasattr(self.drafter, "propose_tree") else 0
                if tree:
                    p.steps = 1
                asks.append((p, Ask(p.active.ctx, p.block_size, p.steps, max(tree, p.block_size) if tree else 0,
                                    (p.active.params, p.active.noise))))
            else:
                p.draft = Draft(torch.empty(0, dtype=torch.long))
        if hasattr(self.drafter, "propose_many"):
            reads = [Ask(a.ctx, 0, upto=end) for a, (_, end) in prefills.items()]
            drafts = self.drafter.propose_many([ask for _, ask in asks] + reads)[: len(asks)] if asks or reads else []
        else:
            drafts = [self.drafter.propose_tree(ask.ctx, ask.block_size, ask.tree, ask.sampler) if ask.tree else
                      self.drafter.propose(ask.ctx, ask.block_size, ask.steps, ask.sampler) for _, ask in asks]
        for (p, _), draft in zip(asks, drafts):
            p.draft = draft
        for p in plans:
            node_depth = depths(p.draft.parents) if p.draft.size else None  # [B] each node's draft position
            p.drafted = int(node_depth.max()) if node_depth is not None and not p.copied else 0
            p.conf = None if p.draft.conf is None else p.draft.conf.tolist()  # [B] the drafter's confidence

    def _commit(self, p: Plan, out) -> tuple[int, int, list[int]]:
        """Accept, commit and roll back one sequence's round -> (accepted, verified depth, committed tokens)."""
        a, draft = p.active, p.draft
        n = len(a.ctx.tokens)
        depth = int(depths(draft.parents).max()) if draft.size else 0  # draft positions verified
        p.path, bonus = accept(draft, out.logits, a.params, a.noise, n)  # accepted rows of the pass, bonus token

        new = [int(draft.tokens[r - 1]) for r in p.path] + [bonus]  # cut at EOS and the token budget
        if a.cfg.stop_on_eos:
            for i, t in enumerate(new):
                if t in self.verifier.eos_token_ids:
                    new, a.finish = new[: i + 1], "eos"
                    break
        a.ctx.tokens.extend(new)
        a.generated += len(new)
        a.rows = draft.size + 1
        if a.finish is None and (a.generated >= a.cfg.max_new_tokens or len(a.ctx.tokens) >= self.verifier.max_context):
            a.finish = "length"

        # roll back: keep pages for the committed tokens but the last; drop rejected positions
        view = self.verifier.view(a.seq)
        moved = [(n - 1 + r, n - 1 + d) for d, r in enumerate(p.path, start=1) if r != d]  # a tree's side path
        if moved:
            view.move([s for s, _ in moved], [d for _, d in moved])
        kept = len(a.ctx.tokens) - 1
        if a.seq.length > kept:
            removed = self.pool.rollback(a.seq, kept)
            assert removed == n + draft.size - kept, "rollback removed the wrong number of tokens"
        if self.drafter is not None and out.hidden is not None:
            self.drafter.observe(a.ctx, out.hidden[[0] + p.path], n - 1)
        return len(p.path), depth, new


def accept(draft: Draft, logits: torch.Tensor, params: SamplingParams, noise: Noise | None, start: int
           ) -> tuple[list[int], int]:
    """The accepted rows of a verify pass (logits [B+1, V]; row r holds draft token r) and the bonus token: the
    walk along the verifier's tokens for deterministic drafts (the verifier's token first, then matched), or
    rejection sampling against the drafter's q for a sampled chain."""
    if draft.q is None or params.greedy:
        walk = accept_tree(draft.tokens, draft.parents, logits, params, noise, start)
        return walk.path, walk.bonus
    acc = accept_sampling(draft.tokens, draft.q, warp(logits, params), noise, start)
    return list(range(1, acc.accepted + 1)), acc.bonus


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
