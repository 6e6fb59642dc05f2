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
from hybrid.errors import PagesExhausted, UserError
from hybrid.loop import Active, FixedSchedule, LoopConfig, Round, Scheduler, check_prompt, request_tokens
from hybrid.pages import PagePool
from hybrid.verifiers.hf import HFVerifier


MAX_TREE = 64  # draft tree tokens per verify pass
AUTO_TREE = 8  # the tree budget of block size auto: 9 rows cost about 2 on a bf16 CPU (bench/verify_rows.py)
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens prefilled per step when requests run together (bench/RESULTS.md (x))


def tree_budget(cfg: "GenerationConfig") -> int:
    """The draft tree tokens a round may verify under cfg (0: chains)."""
    if cfg.tree == "auto":
        return AUTO_TREE if cfg.block_size == "auto" else 0
    return cfg.tree


@dataclass(kw_only=True, frozen=True)
class GenerationConfig:
    """One request's settings: keyword-only, checked once when made (UserError: a one-line message)."""

    max_new_tokens: int = 128  # new tokens at most
    block_size: int | str = "auto"  # draft tokens per round; "auto": the coordinator chooses per round
    steps: int | str = "auto"  # denoising steps per draft; "auto": the coordinator chooses (with block size auto)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # the same seed gives the same tokens (see README: what a seed guarantees)
    stop: tuple[str, ...] = ()  # stop strings: the output ends before the text that completes one
    stop_on_eos: bool = True
    trim: bool = True  # with block size auto: verify as much of each draft as the drafter's confidence pays for
    lookup: int = 2  # prompt lookup before the drafter: the last >= 2 tokens recurring -> copy what followed (0: off)
    # verify draft trees of up to this many tokens (hybrid.tree; drafters with one pass per block), 0: chains;
    # "auto": AUTO_TREE tokens with block size auto (the coordinator trims each tree), chains with a fixed size
    tree: int | str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name, value in (("block size", self.block_size), ("steps", self.steps)):
            if value != "auto" and (not isinstance(value, int) or value < 1):
                raise UserError(f"{name} must be auto or an integer >= 1, got {value}")
        if not isinstance(self.lookup, int) or self.lookup < 0:
            raise UserError(f"lookup must be an integer >= 0 (0: off), got {self.lookup}")
        if self.tree != "auto" and (not isinstance(self.tree, int) or not 0 <= self.tree <= MAX_TREE):
            raise UserError(f"tree must be auto or an integer from 0 (chains) to {MAX_TREE}, got {self.tree}")
        self.sampling()

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


@dataclass(eq=False)
class Handle:
    """One request in a Batch: its sequence in the scheduler and its text so far."""

    active: Active
    text: TextStream
    prompt_tokens: int
    index: int = 0  # the caller's tag (generate_many: the prompt's index)
    finished: bool = False

    def event(self, r: Round) -> StreamEvent:
        """The round as a stream event: its new text; a stop string ends the request where plain decoding would."""
        delta = self.text.push(r.tokens, final=r.finish_reason is not None)
        if self.text.stopped:  # the tokens past the one that completed a stop string are not output
            r.tokens, r.finish_reason = r.tokens[: self.text.kept], "stop"
        self.finished = r.finish_reason is not None
        return StreamEvent(delta, r.tokens, r)


class Batch:
    """Requests decoded together: each `step` is one round for every running request, all their verify rows in one
    verifier pass (hybrid.loop.Scheduler), each request's output what it would be alone."""

    def __init__(self, engine: "Engine", prefill_chunk: int | None = None):
        self.engine = engine
        self.scheduler = Scheduler(engine.verifier, engine.drafter, engine.pool, engine.costs, prefill_chunk)
        self.handles: dict[Active, Handle] = {}

    def start(self, prompt_ids: list[int], cfg: GenerationConfig, index: int = 0) -> Handle:
        """Start a request now: its worst case of KV pages is promised (PagesExhausted if the pool cannot hold it
        beside what it promised others), so it runs to its end."""
        engine = self.engine
        engine.check(cfg)
        check_prompt(prompt_ids, engine.verifier.max_context)
        loop_cfg = engine.loop_config(cfg)
        seq = engine.pool.new_sequence(request_tokens(len(prompt_ids), loop_cfg, engine.verifier.max_context))
        try:
            active = self.scheduler.add(prompt_ids, loop_cfg, cfg.sampling(), engine.schedule(cfg), seq)
        except BaseException:
            engine.pool.free(seq)
            raise
        handle = Handle(active, TextStream(engine.verifier.tokenizer, list(cfg.stop)), len(prompt_ids), index)
        self.handles[active] = handle
        return handle

    def step(self) -> list[tuple[Handle, StreamEvent | Exception]]:
        """One round for every running request -> each one's event; a finished request gives its pages back.
        A step that fails before committing anything is run again one request at a time, so an error fails only
        the requests it comes from: theirs is an Exception in place of an event (the request is closed)."""
        try:
            rounds = self.scheduler.step()
        except Exception:
            if self.scheduler.committing or len(self.handles) <= 1:
                raise
            rounds = []
            for handle in list(self.handles.values()):
                self.scheduler.reset(handle.active)
                try:
                    rounds += self.scheduler.step(only=[handle.active])
                except Exception as e:  # this request's own error
                    if self.scheduler.committing:
                        raise
                    rounds.append((handle.active, e))
        events = []
        for active, r in rounds:
            handle = self.handles[active]
            events.append((handle, r if isinstance(r, Exception) else handle.event(r)))
            if handle.finished or isinstance(r, Exception):
                self.close(handle)
        return events

    def close(self, handle: Handle) -> None:
        """The request ends (finished, or its caller left): its sequence leaves the scheduler and frees its pages."""
        handle.finished = True
        self.handles.pop(handle.active, None)
        self.scheduler.remove(handle.active)

    def __len__(self) -> int:
        return len(self.handles)


class Generation:
    """One request's stream of events; owns its sequence of the pool until it ends or is closed."""

    def __init__(self, batch: Batch, handle: Handle):
        self.batch, self.handle = batch, handle
        self.pending: list[StreamEvent] = []

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> StreamEvent:
        while not self.pending:
            if self.handle.finished:
                raise StopIteration
            self.pending = [ev for _, ev in self.batch.step()]
        ev = self.pending.pop(0)
        if isinstance(ev, Exception):
            raise ev
        return ev

    def close(self) -> None:
        self.batch.close(self.handle)


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

    def check(self, cfg: GenerationConfig) -> None:
        """What a request's config must satisfy for this engine's drafter (the config checked itself when made)."""
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
        it runs to its end; close() (or leaving the loop) gives them back. `schedule`: instead of the
        engine's coordinator (tests)."""
        batch = self.batch()
        handle = batch.start(self.encode(prompt, chat), cfg)
        if schedule is not None:
            handle.active.schedule = schedule
        return Generation(batch, handle)

    def batch(self, prefill_chunk: int | None = None) -> Batch:
        """A batch of requests decoded together over this engine (`prefill_chunk`: prompt tokens prefilled per
        step in all, None: whole prompts)."""
        return Batch(self, prefill_chunk)

    def stream_many(self, prompts: list[str | list[int]], cfgs: GenerationConfig | list[GenerationConfig],
                    chat: bool = False, max_concurrent: int | None = None,
                    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> Iterator[tuple[int, StreamEvent]]:
        """Decode many prompts together: (prompt index, event) as each round commits. Requests start first in
        first out while fewer than `max_concurrent` run and the pool can promise the next its worst case."""
        cfgs = cfgs if isinstance(cfgs, list) else [cfgs] * len(prompts)
        if len(cfgs) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(cfgs)} configs: give one config or one per prompt")
        encoded = [self.encode(p, chat) for p in prompts]
        for ids, cfg in zip(encoded, cfgs):
            self.check(cfg)
            check_prompt(ids, self.verifier.max_context)
            if self.request_pages(len(ids), cfg) > self.pool.num_pages:
                raise PagesExhausted(f"a request needs {self.request_pages(len(ids), cfg)} KV pages, the pool "
                                     f"has {self.pool.num_pages}: raise --num-pages or shorten the request")
        batch, waiting = self.batch(prefill_chunk), list(range(len(prompts)))
        try:
            while waiting or len(batch):
                while waiting and (max_concurrent is None or len(batch) < max_concurrent) and \
                        self.request_pages(len(encoded[waiting[0]]), cfgs[waiting[0]]) <= self.pool.available_pages:
                    i = waiting.pop(0)
                    batch.start(encoded[i], cfgs[i], index=i)
                if not len(batch):
                    raise PagesExhausted("the pool cannot hold the next request beside nothing else")
                for handle, ev in batch.step():
                    if isinstance(ev, Exception):
                        raise ev
                    yield handle.index, ev
        finally:
            for handle in list(batch.handles.values()):
                batch.close(handle)

    def generate_many(self, prompts: list[str | list[int]], cfgs: GenerationConfig | list[GenerationConfig] | None = None,
                      chat: bool = False, max_concurrent: int | None = None,
                      prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> list[GenerationResult]:
        """Generate from many prompts together (see stream_many) -> one result per prompt, in order; each one's
        times are from this call's start (its wall time includes waiting to start)."""
        cfgs = cfgs or GenerationConfig()
        t0 = time.perf_counter()
        results = [_Collect(t0) for _ in prompts]
        for i, ev in self.stream_many(prompts, cfgs, chat, max_concurrent, prefill_chunk):
            results[i].add(ev)
        return [r.result(len(self.encode(p, chat))) for r, p in zip(results, prompts)]

    def generate(self, prompt: str | list[int], cfg: GenerationConfig | None = None, chat: bool = False,
                 on_text=None, schedule=None) -> GenerationResult:
        cfg = cfg or GenerationConfig()
        t0 = time.perf_counter()
        prompt_ids = self.encode(prompt, chat)
        collect = _Collect(t0)
        events = self.stream(prompt_ids, cfg, schedule=schedule)
        for ev in events:
            collect.add(ev)
            if on_text and ev.text:
                on_text(ev.text)
        events.close()
        return collect.result(len(prompt_ids))


class _Collect:
    """A request's events gathered into its GenerationResult."""

    def __init__(self, t0: float):
        self.t0, self.ids, self.text, self.rounds = t0, [], "", []
        self.ttft, self.end, self.finish = None, None, "length"

    def add(self, ev: StreamEvent) -> None:
        now = time.perf_counter()
        self.ids += ev.tokens
        self.text += ev.text
        if ev.tokens and self.ttft is None:
            self.ttft = now - self.t0
        if ev.round.block_size or ev.round.tokens:
            self.rounds.append(ev.round)
        self.finish = ev.round.finish_reason or self.finish
        self.end = now

    def result(self, prompt_tokens: int) -> GenerationResult:
        wall = (self.end or time.perf_counter()) - self.t0
        return summarize(self.text, self.ids, self.rounds, wall, self.ttft or wall, self.finish, prompt_tokens)


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
