"""The public API: load a verifier (+ drafter), generate text with streaming, report figures."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from hybrid.acceptance import SamplingParams
from hybrid.coordinator import AcceptanceCounts, Calibration, Coordinator, CostModel
from hybrid.drafters.ngram import NgramDrafter
from hybrid.errors import UserError
from hybrid.loop import FixedSchedule, LoopConfig, Round, check_prompt, request_tokens, speculative_decode
from hybrid.pages import PagePool
from hybrid.verifiers.hf import HFVerifier


MAX_TREE = 64  # draft tree tokens per verify pass
AUTO_TREE = 8  # the tree budget of block size auto: 9 rows cost about 2 on a bf16 CPU (bench/verify_rows.py)


def tree_budget(cfg: "GenerationConfig") -> int:
    """The draft tree tokens a round may verify under cfg (0: chains)."""
    if cfg.tree == "auto":
        return AUTO_TREE if cfg.block_size == "auto" else 0
    return cfg.tree


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    block_size: int | str = "auto"  # "auto": the coordinator chooses per round
    steps: int | str = "auto"  # "auto": the coordinator chooses (with block size auto), else 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_on_eos: bool = True
    trim: bool = True  # with block size auto: verify as much of each draft as the drafter's confidence pays for
    lookup: int = 2  # prompt lookup before the drafter: the last >= 2 tokens recurring -> copy what followed (0: off)
    # verify draft trees of up to this many tokens (hybrid.tree; drafters with one pass per block), 0: chains;
    # "auto": AUTO_TREE tokens with block size auto (the coordinator trims each tree), chains with a fixed size
    tree: int | str = "auto"

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.seed)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only
    new_tokens: int
    rounds: int
    acceptance_lengths: list[int]  # committed tokens per round (accepted + 1)
    mean_acceptance_length: float
    accepted_per_position: list[float]  # share of rounds whose draft position i was accepted
    block_sizes: dict[int, int]  # histogram: the drafter's block size (a tree's depth) -> rounds (lookup rounds apart)
    steps: dict[int, int]  # histogram: denoising steps -> rounds
    tokens_per_s: float
    wall_s: float
    ttft_s: float
    draft_s: float
    verify_s: float
    finish_reason: str
    prompt_tokens: int
    lookup_rounds: int = 0  # rounds drafted by prompt lookup instead of the drafter
    tree_sizes: dict[int, int] = field(default_factory=dict)  # histogram: tokens a draft tree verified -> rounds

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StreamEvent:
    text: str  # newly committed text (may be "" while a stop string is undecided)
    tokens: list[int]
    round: Round


class TextStream:
    """Incremental detokenisation with stop strings: emits text that can no longer be cut."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # text emitted so far
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False
        self.kept = 0  # after a stop: how many ids of the last push were output

    def push(self, ids: list[int], final: bool = False) -> str:
        """Text of these new token ids that can be emitted now. On a stop string, `stopped` is set and `kept`
        says how many of `ids` it took to complete it (the rest are not output)."""
        before = len(self.ids)
        self.ids.extend(ids)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(full)
        if cut is not None:
            # the fewest of these tokens whose text completes a stop string: where plain decoding would stop
            for kept in range(1, len(ids) + 1):
                full = self.tokenizer.decode(self.ids[: before + kept], skip_special_tokens=True)
                cut = self._stop_at(full)
                if cut is not None:
                    break
            del self.ids[before + kept :]
            full, self.stopped, self.kept, final = full[:cut], True, kept, True
        if not final:
            if full.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                full = full.rstrip("\ufffd")
            full = full[: max(len(self.text), len(full) - self.hold)]
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta

    def _stop_at(self, full: str) -> int | None:
        """Where the earliest stop string begins in `full` (searched from just before the emitted text's end)."""
        found = [i for s in self.stop if (i := full.find(s, max(0, len(self.text) - len(s)))) >= 0]
        return min(found) if found else None


class Generation:
    """One request's stream of events; owns its sequence of the pool until it ends or is closed."""

    def __init__(self, events: Iterator[StreamEvent], pool: PagePool, seq):
        self.events, self.pool, self.seq = events, pool, seq

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> StreamEvent:
        return next(self.events)

    def close(self) -> None:
        try:
            self.events.close()
        finally:
            self.pool.free(self.seq)  # also when the stream never started (a generator's finally would not run)


class Engine:
    """A verifier, an optional drafter and the page pool they share."""

    def __init__(self, verifier: HFVerifier, drafter=None, num_pages: int | None = None, page_size: int = 16,
                 pool: PagePool | None = None):
        """`pool`: share another engine's page pool. Engines over one verifier may run in any order or
        interleaved: each request's pages and captured layers go with it, not with the verifier."""
        self.verifier, self.drafter = verifier, drafter
        if num_pages is None:
            num_pages = -(-(min(verifier.max_context, 8192) + 64) // page_size)
        self.pool = pool if pool is not None else PagePool(num_pages, page_size, verifier.device)
        self.costs = CostModel()  # draft/verify timings, shared by the coordinators of all requests
        self.acceptance = None  # engine-wide acceptance counts the coordinators start from (made on first use)
        self.calibration = Calibration()  # engine-wide acceptance per drafter confidence (trimmed rounds)
        self.lookup_acceptance = None  # engine-wide acceptance of prompt-lookup drafts (made on first use)
        verifier.attach(self.pool)  # registers the models' caches; verifier and drafter keep no pool of their own
        if drafter is not None:
            drafter.attach(self.pool, verifier)

    @classmethod
    def load(cls, verifier: str, drafter: str = "none", dtype="auto", device: str = "cpu", **kw) -> "Engine":
        from hybrid.drafters import load_drafter

        v = HFVerifier.from_pretrained(verifier, dtype, device)
        return cls(v, load_drafter(drafter, v, dtype, device), **kw)

    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip() and not chat:
                raise UserError("empty prompt: give at least one token of text")
            return self.verifier.encode(prompt, chat)
        return list(prompt)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        return self.verifier.encode_messages(messages)

    @staticmethod
    def check_basic(cfg: GenerationConfig) -> None:
        """Checks that need no model."""
        if cfg.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
        for name, value in (("block size", cfg.block_size), ("steps", cfg.steps)):
            if value != "auto" and (not isinstance(value, int) or value < 1):
                raise UserError(f"{name} must be auto or an integer >= 1, got {value}")
        if not isinstance(cfg.lookup, int) or cfg.lookup < 0:
            raise UserError(f"lookup must be an integer >= 0 (0: off), got {cfg.lookup}")
        if cfg.tree != "auto" and (not isinstance(cfg.tree, int) or not 0 <= cfg.tree <= MAX_TREE):
            raise UserError(f"tree must be auto or an integer from 0 (chains) to {MAX_TREE}, got {cfg.tree}")
        cfg.sampling()

    def check(self, cfg: GenerationConfig) -> None:
        self.check_basic(cfg)
        if self.drafter is not None and cfg.block_size != "auto" and cfg.block_size > self.drafter.max_block_size:
            raise UserError(
                f"block size {cfg.block_size} is above the drafter's maximum of {self.drafter.max_block_size}: "
                f"use --block-size {self.drafter.max_block_size} or less"
            )

    def schedule(self, cfg: GenerationConfig):
        """A fresh per-sequence coordinator for block size auto, else a fixed schedule."""
        steps = 1 if cfg.steps == "auto" else cfg.steps
        if cfg.block_size != "auto" or self.drafter is None:
            return FixedSchedule(0 if cfg.block_size == "auto" else cfg.block_size, steps)
        max_steps = self.drafter.max_steps if cfg.steps == "auto" else steps
        if self.acceptance is None or self.acceptance.max_block_size != self.drafter.max_block_size:
            self.acceptance = AcceptanceCounts(self.drafter.max_block_size, decay=0.995)
        if self.lookup_acceptance is None:
            self.lookup_acceptance = AcceptanceCounts(LoopConfig.lookup_block, decay=0.995)
        return Coordinator(self.drafter.max_block_size, max_steps, costs=self.costs, seed=cfg.seed or 0,
                           allow_plain=True, shared=self.acceptance, calibration=self.calibration if cfg.trim else None,
                           shared_lookup=self.lookup_acceptance, max_lookup=LoopConfig.lookup_block)

    def loop_config(self, cfg: GenerationConfig) -> LoopConfig:
        """What the loop needs of a request's config."""
        max_block = self.drafter.max_block_size if self.drafter is not None else 0
        block = max_block if cfg.block_size == "auto" else cfg.block_size
        return LoopConfig(
            max_new_tokens=cfg.max_new_tokens, block_size=block, steps=1 if cfg.steps == "auto" else cfg.steps,
            stop_on_eos=cfg.stop_on_eos,
            lookup=0 if isinstance(self.drafter, NgramDrafter) else cfg.lookup,  # the n-gram drafter is a lookup already
            lookup_block=min(block, LoopConfig.lookup_block),  # lookup drafts: no longer than asked
            tree=tree_budget(cfg) if self.drafter is not None else 0,
        )

    def request_pages(self, prompt_tokens: int, cfg: GenerationConfig) -> int:
        """KV pages a request holds at worst: what `stream` promises it before its first round."""
        return self.pool.pages_for(request_tokens(prompt_tokens, self.loop_config(cfg), self.verifier.max_context))

    def stream(self, prompt: str | list[int], cfg: GenerationConfig, chat: bool = False,
               schedule=None) -> "Generation":
        """Yield committed text as each round commits it. The request's worst case of KV pages is promised
        now (PagesExhausted if the pool cannot hold it beside what it promised others), so once it starts
        it runs to its end; close() (or leaving the loop) gives them back."""
        self.check(cfg)
        ids = self.encode(prompt, chat)
        check_prompt(ids, self.verifier.max_context)
        loop_cfg = self.loop_config(cfg)
        seq = self.pool.new_sequence(request_tokens(len(ids), loop_cfg, self.verifier.max_context))
        rounds = speculative_decode(self.verifier, self.drafter, self.pool, ids, loop_cfg, cfg.sampling(),
                                    schedule or self.schedule(cfg), seq=seq)
        return Generation(self._events(rounds, TextStream(self.verifier.tokenizer, cfg.stop)), self.pool, seq)

    @staticmethod
    def _events(rounds, text: "TextStream") -> Iterator[StreamEvent]:
        try:
            for r in rounds:
                delta = text.push(r.tokens, final=r.finish_reason is not None)
                if text.stopped:  # the tokens past the one that completed a stop string are not output
                    r.tokens, r.finish_reason = r.tokens[: text.kept], "stop"
                yield StreamEvent(delta, r.tokens, r)
                if text.stopped:
                    return
        finally:
            rounds.close()  # frees the sequence's pages, also when the consumer stops early

    def generate(self, prompt: str | list[int], cfg: GenerationConfig | None = None, chat: bool = False,
                 on_text=None, schedule=None) -> GenerationResult:
        cfg = cfg or GenerationConfig()
        t0 = time.perf_counter()
        prompt_ids = self.encode(prompt, chat)
        ids: list[int] = []
        text, rounds = "", []
        ttft = None
        finish = "length"
        events = self.stream(prompt_ids, cfg, schedule=schedule)
        for ev in events:
            ids += ev.tokens
            text += ev.text
            if on_text and ev.text:
                on_text(ev.text)
            if ev.tokens and ttft is None:
                ttft = time.perf_counter() - t0
            if ev.round.block_size or ev.round.tokens:
                rounds.append(ev.round)
            finish = ev.round.finish_reason or finish
        events.close()
        wall = time.perf_counter() - t0
        return summarize(text, ids, rounds, wall, ttft or wall, finish, len(prompt_ids))


def summarize(text, ids, rounds: list[Round], wall, ttft, finish, prompt_tokens) -> GenerationResult:
    tau = [len(r.tokens) for r in rounds]
    max_b = max((r.block_size for r in rounds), default=0)
    per_pos = []
    for i in range(max_b):
        drafted = [r for r in rounds if r.block_size > i]
        per_pos.append(sum(r.accepted > i for r in drafted) / len(drafted) if drafted else 0.0)
    return GenerationResult(
        text=text,
        token_ids=ids,
        new_tokens=len(ids),
        rounds=len(rounds),
        acceptance_lengths=tau,
        mean_acceptance_length=sum(tau) / len(tau) if tau else 0.0,
        accepted_per_position=per_pos,
        block_sizes=dict(sorted(Counter(r.block_size for r in rounds if not r.lookup).items())),
        steps=dict(sorted(Counter(r.steps for r in rounds if not r.lookup).items())),
        tokens_per_s=len(ids) / wall if wall > 0 else 0.0,
        wall_s=wall,
        ttft_s=ttft,
        draft_s=sum(r.draft_s for r in rounds),
        verify_s=sum(r.verify_s for r in rounds),
        finish_reason=finish,
        prompt_tokens=prompt_tokens,
        lookup_rounds=sum(r.lookup for r in rounds),
        tree_sizes=dict(sorted(Counter(r.tree_size for r in rounds if r.tree_size).items())),
    )
