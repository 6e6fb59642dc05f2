"""`hybrid bench`: plain verifier decoding, our drafters and transformers' peers on the same prompts.

Every method decodes the same prompt token ids with the same verifier weights and the same
token budget, after one untimed warm-up generation per method. By default the runs are interleaved
(each prompt through every method in turn), so a drift in the machine's speed during the run (another
job, clocks, memory) falls on every method alike; `--order method` runs one method at a time.
Figures per method and prompt category: tokens/s, speedup over plain decoding, mean acceptance length,
acceptance per draft position, time to first token (TTFT), time per output token (TPOT p50/p90/p99),
draft and verify time shares, and, at temperature 0, whether the output is token for token the output
of plain decoding.

Methods:
- ``plain``: our engine, no drafter (one verifier pass per token).
- ``hybrid``: our engine with the block-diffusion drafter (``--drafter``).
- ``ngram``: our engine with the prompt-lookup drafter.
- ``hf-assisted``: transformers' ``generate(assistant_model=...)`` with a small causal LM.
- ``hf-prompt-lookup``: transformers' ``generate(prompt_lookup_num_tokens=block size)`` (10, the
  value transformers' docs use, with block size auto).

Clock reads: ``perf_counter`` after a device synchronisation (``hybrid.loop._sync``).

TPOT: each committed token gets an equal share of the time since the previous commit (a round
that commits k tokens after dt seconds gives k samples of dt/k). The tokens of the first commit
are covered by TTFT (time from the start of the request to the first committed token) and give
no TPOT samples. Percentiles pool the samples of all prompts of a category.

Acceptance of transformers' peers, at no extra cost: in assisted decoding transformers hands the
streamer one chunk per verifier pass (the accepted candidates plus the bonus token), so the mean
chunk length is the mean acceptance length; a forward pre-hook on the verifier reads how many
candidate tokens each pass scored, which gives acceptance per draft position. Either figure is
reported as null if the counts do not line up (a transformers version that streams differently).
Their draft share is the assistant model's forward time (null for prompt lookup, whose lookup is
not timed apart), their verify share the verifier's forward time.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from hybrid.errors import UserError

METHODS = ("plain", "hybrid", "ngram", "hf-assisted", "hf-prompt-lookup")
ASKED_METHODS = ("parallel",)  # run only when asked for: `parallel` is our parallel drafter (--parallel-drafter)
VLLM_METHODS = ("plain", "hybrid", "ngram", "draft-model")  # --backend vllm (hybrid/bench_vllm.py)
LLAMACPP_METHODS = ("plain", "hybrid", "draft-model", "ngram")  # --backend llama.cpp (hybrid/bench_llamacpp.py)
ENGINE_METHODS = ("plain", "hybrid", "parallel", "ngram")
ALL = "all"  # the category name of the overall figures
DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "bench" / "prompts.jsonl"
WARMUP_TOKENS = 8
HF_LOOKUP_TOKENS = 10  # prompt_lookup_num_tokens with --block-size auto (the value transformers' docs use)
# Tokens per prompt of the default run, sized to finish in under 15 minutes on 2 CPU cores: the
# demo 1.5B verifier in bfloat16 decodes ~4.5 tokens/s there (measured on an idle machine: 32 new
# tokens after a 47-token chat prompt in 6.9 s with transformers, 7.3 s with our ngram engine),
# and a prefill of 50-150 tokens costs ~0.5-1 s. Default run: 20 prompts x 5 methods (hybrid only
# where its drafter is installed), each prompt ~1 s of prefill plus N / (4.5 x speedup) s. Even
# with no speedup at all that is 100 x (0.8 + N / 4.5) s + ~35 s of loading and warm-up, so
# N = 32 gives ~13.8 min in the worst case and ~11 min with the ~1.5x typical of the peers; at the
# 3.5 tokens/s of a slower 2-core CPU and that ~1.5x it is ~13.5 min. All of this assumes idle
# cores: sharing them with a training job, `--limit 1 --max-new-tokens 24` with 4 methods took 10.6 min.
DEFAULT_MAX_NEW_TOKENS = 32


# -- configuration and inputs --------------------------------------------------------------
@dataclass
class BenchPrompt:
    prompt: str
    category: str
    chat: bool = True  # apply the chat template (false: raw completion, e.g. code to continue)
    index: int = 0  # position in the prompt file (0-based, blank lines not counted)


@dataclass
class BenchConfig:
    verifier: str = "demo:1.5b"
    drafter: str | None = None  # None: the drafter shipped for the verifier; without one `hybrid` is skipped
    parallel_drafter: str | None = None  # the `parallel` method's drafter (hybrid train-drafter --init-from)
    assistant: str = "demo:0.5b"
    methods: tuple[str, ...] = METHODS
    prompts: str | None = None  # None: DEFAULT_PROMPTS
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    block_size: int | str = 8  # or "auto": the coordinator picks per round
    block_sizes: tuple | None = None  # e.g. (2, 4, 8, 16, "auto"): our drafters once per size, as "hybrid@8"
    lookup: int = 2  # our engine's prompt lookup before the drafter (GenerationConfig.lookup; 0: off)
    tree: int | str = "auto"  # our drafter's draft trees of up to N tokens (GenerationConfig.tree; 0: chains)
    steps: int | str = "auto"  # "auto": 1 at a fixed block size, the coordinator's choice with block size auto
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    dtype: object = "auto"
    device: str = "cpu"
    limit: int | None = None  # first N prompts per category
    order: str = "interleaved"  # "interleaved": each prompt through every method in turn; "method": one method at a time
    warmup_tokens: int = WARMUP_TOKENS
    llama_cpp: str = "off"  # llama.cpp's methods beside ours: "auto" (when installed), "on" (required), "off"


VARIANT = re.compile(r"^(auto(-notrim)?|[1-9][0-9]*)(-tree[0-9]+)?(-nolookup)?$")


def parse_block_sizes(text: str | None) -> tuple | None:
    """`2,4,8,auto` -> (2, 4, 8, "auto"); None or empty -> None. Variants: `auto-notrim`, the coordinator
    without trimming by confidence (each round's chosen block is verified whole); a `-nolookup` suffix
    (`auto-nolookup`, `4-nolookup`), the drafter alone without prompt lookup; a `-treeN` suffix (`auto-tree16`,
    `4-tree0`): draft trees of up to N tokens (0: chains) instead of --tree's value."""
    if not text:
        return None
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if not VARIANT.match(part):
            raise UserError(f"--block-sizes: {part!r} is neither a positive integer nor auto (e.g. 2,4,8,16,auto)")
        out.append(int(part) if part.isdigit() else part)
    return tuple(dict.fromkeys(out))


def variant_settings(b: int | str, lookup: int, tree: int | str = "auto") -> dict:
    """A --block-sizes entry -> GenerationConfig fields (block_size, trim, lookup, tree)."""
    name = str(b)
    size = name.split("-")[0]
    m = re.search(r"-tree([0-9]+)", name)
    return {"block_size": "auto" if size == "auto" else int(size), "trim": "-notrim" not in name,
            "lookup": 0 if name.endswith("-nolookup") else lookup, "tree": int(m.group(1)) if m else tree}


def parse_methods(text: str | None, backend: str = "transformers") -> tuple[str, ...]:
    """`plain,ngram` -> ("plain", "ngram") in canonical order; None -> every method of the backend;
    unknown names are a UserError."""
    known = {"transformers": METHODS, "vllm": VLLM_METHODS, "llama.cpp": LLAMACPP_METHODS}[backend]
    if text is None:
        return known
    if backend == "transformers":
        known = known[:2] + ASKED_METHODS + known[2:]
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise UserError(f"--methods is empty: pick from {', '.join(known)}")
    bad = [m for m in names if m not in known]
    if bad:
        raise UserError(f"unknown method {bad[0]!r} for the {backend} backend: pick from {', '.join(known)}")
    return tuple(m for m in known if m in names)


def load_prompts(path: str | Path, limit: int | None = None) -> list[BenchPrompt]:
    """Read a JSONL prompt file: one {"prompt": str, "category": str, "chat": bool (optional)} per line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    prompts: list[BenchPrompt] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}); want one {{\"prompt\": ..., \"category\": ...}} per line") from e
        if not isinstance(obj, dict):
            raise UserError(f"{where}: want a JSON object {{\"prompt\": ..., \"category\": ...}}")
        prompt, category, chat = obj.get("prompt"), obj.get("category"), obj.get("chat", True)
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: \"prompt\" must be a non-empty string")
        if not isinstance(category, str) or not category.strip() or category == ALL:
            raise UserError(f"{where}: \"category\" must be a non-empty string other than {ALL!r}")
        if not isinstance(chat, bool):
            raise UserError(f"{where}: \"chat\" must be true or false")
        prompts.append(BenchPrompt(prompt, category.strip(), chat, len(prompts)))
    if not prompts:
        raise UserError(f"prompts file has no prompts: {path}")
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for p in prompts:
            seen[p.category] = seen.get(p.category, 0) + 1
            if seen[p.category] <= limit:
                kept.append(p)
        prompts = kept
    return prompts


# -- measurements --------------------------------------------------------------------------
@dataclass
class PromptRun:
    """One method on one prompt."""

    method: str
    category: str
    index: int
    token_ids: list[int]
    wall_s: float
    ttft_s: float
    tpot_s: list[float]  # one sample per committed token after the first commit
    # per round (verifier pass): (draft tokens proposed, draft tokens accepted); None where unknown
    rounds: list[tuple[int, int]] | None
    committed_per_round: list[int] | None  # acceptance length tau of each round
    draft_s: float | None
    verify_s: float | None
    lookup_rounds: int = 0  # rounds drafted by prompt lookup (our engine)
    steps: list[int] | None = None  # denoising steps of each drafter round (our engine; 0: no draft)
    tree_sizes: list[int] | None = None  # tokens verified by each draft-tree round (our engine with --tree)


@dataclass
class MethodStats:
    """One method over the prompts of one category (or all of them)."""

    prompts: int
    new_tokens: int
    wall_s: float
    tokens_per_s: float
    speedup: float | None  # tokens/s over plain's tokens/s on the same prompts
    mean_acceptance_length: float | None
    acceptance_per_position: list[float] | None  # share of rounds drafting position i that accepted it
    ttft_s: float  # mean over prompts
    tpot_ms_p50: float | None
    tpot_ms_p90: float | None
    tpot_ms_p99: float | None
    block_sizes: dict[int, int] | None  # histogram: draft tokens proposed -> rounds (engine methods)
    draft_share: float | None  # share of wall time spent drafting
    verify_share: float | None  # share of wall time in verifier forward passes (prefill included)
    identical_to_plain: bool | None  # temperature 0 only
    lookup_share: float | None = None  # share of rounds drafted by prompt lookup (our engine)
    steps: dict[int, int] | None = None  # histogram: denoising steps -> drafter rounds (our engine)
    tree_sizes: dict[int, int] | None = None  # histogram: tokens a draft tree verified -> rounds (--tree)


@dataclass
class Mismatch:
    method: str
    index: int
    category: str
    position: int  # first differing position among the new tokens


@dataclass
class BenchResult:
    config: dict
    categories: list[str]
    stats: dict[str, dict[str, MethodStats]]  # method -> category (and ALL) -> figures
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why
    mismatches: list[Mismatch] = field(default_factory=list)
    runs: list[PromptRun] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "config": self.config,
            "categories": self.categories,
            "methods": {m: {c: asdict(s) for c, s in cats.items()} for m, cats in self.stats.items()},
            "identical_to_plain": {m: cats[ALL].identical_to_plain for m, cats in self.stats.items()},
            "skipped": self.skipped,
            "mismatches": [asdict(x) for x in self.mismatches],
        }


def _percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """First position where two token lists differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def aggregate(runs: list[PromptRun]) -> MethodStats:
    tokens = sum(len(r.token_ids) for r in runs)
    wall = sum(r.wall_s for r in runs)
    tpot = [s for r in runs for s in r.tpot_s]
    ms = lambda q: None if not tpot else _percentile(tpot, q) * 1e3  # noqa: E731
    tau = [t for r in runs for t in (r.committed_per_round or [])]
    known_tau = all(r.committed_per_round is not None for r in runs)
    known_rounds = all(r.rounds is not None for r in runs)
    per_pos, rounds = None, []
    if known_rounds:
        rounds = [x for r in runs for x in r.rounds]
        depth = max((d for d, _ in rounds), default=0)
        per_pos = []
        for i in range(depth):
            drafted = [a for d, a in rounds if d > i]
            per_pos.append(sum(a > i for a in drafted) / len(drafted))
    share = lambda attr: (  # noqa: E731
        sum(getattr(r, attr) for r in runs) / wall if wall > 0 and all(getattr(r, attr) is not None for r in runs) else None
    )
    return MethodStats(
        prompts=len(runs),
        new_tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        speedup=None,
        mean_acceptance_length=(sum(tau) / len(tau) if tau else None) if known_tau else None,
        acceptance_per_position=per_pos,
        ttft_s=sum(r.ttft_s for r in runs) / len(runs),
        tpot_ms_p50=ms(50),
        tpot_ms_p90=ms(90),
        tpot_ms_p99=ms(99),
        block_sizes=(dict(sorted(Counter(d for r in runs for d, _ in r.rounds).items()))
                     if known_rounds else None),
        draft_share=share("draft_s"),
        verify_share=share("verify_s"),
        identical_to_plain=None,
        lookup_share=(sum(r.lookup_rounds for r in runs) / len(rounds)
                      if known_rounds and rounds else None),
        steps=(dict(sorted(Counter(t for r in runs for t in r.steps).items()))
               if all(r.steps is not None for r in runs) else None),
        tree_sizes=(dict(sorted(Counter(t for r in runs for t in r.tree_sizes).items()))
                    if any(r.tree_sizes for r in runs) else None),
    )


def summarise(runs: list[PromptRun], methods: list[str], categories: list[str], greedy: bool, plain: str = "plain"
              ) -> tuple[dict[str, dict[str, MethodStats]], list[Mismatch]]:
    """Each method's figures per category and overall, with speedup and identity against the method `plain`
    (a backend's own plain decoding: llama.cpp's rows beside ours are measured against llama.cpp's)."""
    baseline = plain
    stats: dict[str, dict[str, MethodStats]] = {}
    for m in methods:
        mine = [r for r in runs if r.method == m]
        if not mine:
            continue
        stats[m] = {c: aggregate([r for r in mine if r.category == c]) for c in categories}
        stats[m][ALL] = aggregate(mine)
    mismatches: list[Mismatch] = []
    plain = {r.index: r for r in runs if r.method == baseline}
    for m, cats in stats.items():
        for c, s in cats.items():
            base = stats.get(baseline, {}).get(c)
            if base is not None and base.tokens_per_s > 0:
                s.speedup = s.tokens_per_s / base.tokens_per_s
        if not greedy or not plain:
            continue
        bad_categories = set()
        for r in runs:
            if r.method != m or r.index not in plain:
                continue
            pos = first_difference(r.token_ids, plain[r.index].token_ids)
            if pos is not None:
                mismatches.append(Mismatch(m, r.index, r.category, pos))
                bad_categories.add(r.category)
        for c, s in cats.items():
            s.identical_to_plain = not bad_categories if c == ALL else c not in bad_categories
    return stats, mismatches


# -- timing our engine ---------------------------------------------------------------------
def _sync(device) -> None:
    from hybrid.loop import _sync as sync

    sync(device)


def run_engine(engine, prompt_ids: list[int], cfg, method: str, category: str, index: int) -> PromptRun:
    device = engine.verifier.device
    ids: list[int] = []
    tpot: list[float] = []
    rounds: list[tuple[int, int]] = []
    committed: list[int] = []
    draft_s = verify_s = 0.0
    lookups = 0
    steps: list[int] = []
    trees: list[int] = []
    ttft = None
    _sync(device)
    t0 = t_prev = time.perf_counter()
    for ev in engine.stream(prompt_ids, cfg):
        _sync(device)
        t = time.perf_counter()
        r = ev.round
        draft_s += r.draft_s
        verify_s += r.verify_s
        if r.block_size or r.tokens:  # a round (the prefill event commits nothing)
            rounds.append((r.block_size, r.accepted))
            committed.append(len(r.tokens))
            lookups += r.lookup
            if not r.lookup:
                steps.append(r.steps)
            if r.tree_size:
                trees.append(r.tree_size)
        if ev.tokens:
            if ttft is None:
                ttft = t - t0
            else:
                tpot += [(t - t_prev) / len(ev.tokens)] * len(ev.tokens)
            t_prev = t
            ids += ev.tokens
    _sync(device)
    wall = time.perf_counter() - t0
    return PromptRun(method, category, index, ids, wall, ttft if ttft is not None else wall, tpot, rounds,
                     committed, draft_s, verify_s, lookups, steps, trees)


# -- timing transformers' generate -----------------------------------------------------------
def _streamer_class():
    from transformers.generation.streamers import BaseStreamer

    class ClockStreamer(BaseStreamer):
        """Timestamps every put() after the first (the prompt): one put per committed chunk.

        In assisted decoding (assistant model or prompt lookup) transformers puts the tokens each
        verifier pass commits in one call (accepted candidates + the bonus token), so a chunk's
        length is that round's acceptance length.
        """

        def __init__(self, device):
            self.device = device
            self.prompt_seen = False
            self.times: list[float] = []
            self.chunks: list[int] = []

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            _sync(self.device)
            self.times.append(time.perf_counter())
            self.chunks.append(int(value.numel()))

        def end(self):
            pass

    return ClockStreamer


class _ForwardClock:
    """Forward hooks on a transformers model: time in forward passes and each pass's input length."""

    def __init__(self, model, device):
        self.device, self.seconds, self.lengths, self._t = device, 0.0, [], 0.0
        self.handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post),
        ]

    def _pre(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.lengths.append(int(ids.shape[-1]) if ids is not None else -1)
        _sync(self.device)
        self._t = time.perf_counter()

    def _post(self, _module, _args, _output):
        _sync(self.device)
        self.seconds += time.perf_counter() - self._t

    def close(self):
        for h in self.handles:
            h.remove()


def run_hf(model, prompt_ids: list[int], method: str, category: str, index: int, max_new_tokens: int,
           temperature: float, top_p: float, seed: int | None, eos: list[int], pad: int,
           assistant=None, lookup_tokens: int = 0) -> PromptRun:
    """One transformers generate() call (assisted decoding), timed by a streamer and forward hooks.

    Acceptance comes for free: the streamer sees one chunk per verifier pass (its length is the
    round's acceptance length), and the verifier's forward hook sees how many tokens each pass
    scored: the first pass runs the prompt plus the candidates, later passes the last committed
    token plus the candidates, which gives the draft tokens proposed per round.
    """
    device = model.device
    streamer = _streamer_class()(device)
    verify_clock = _ForwardClock(model, device)
    draft_clock = _ForwardClock(assistant, device) if assistant is not None else None
    kw: dict = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, streamer=streamer)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        torch.manual_seed(seed if seed is not None else 0)
    else:
        kw.update(do_sample=False)
    if assistant is not None:
        kw["assistant_model"] = assistant
    else:
        kw["prompt_lookup_num_tokens"] = lookup_tokens
    x = torch.tensor([prompt_ids], device=device)
    try:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), **kw)
        _sync(device)
        wall = time.perf_counter() - t0
    finally:
        verify_clock.close()
        if draft_clock is not None:
            draft_clock.close()
    ids = out[0, len(prompt_ids):].tolist()
    times, chunks = streamer.times, streamer.chunks
    tpot: list[float] = []
    for i in range(1, len(times)):
        tpot += [(times[i] - times[i - 1]) / chunks[i]] * chunks[i]
    # draft tokens per round from the verifier's input lengths; trusted only if it lines up with the chunks
    lens = verify_clock.lengths
    rounds = None
    if len(lens) == len(chunks) and lens and lens[0] > len(prompt_ids) - 1:
        drafted = [lens[0] - len(prompt_ids)] + [n - 1 for n in lens[1:]]
        pairs = list(zip(drafted, [c - 1 for c in chunks]))
        if all(0 <= a <= d for d, a in pairs):
            rounds = pairs
    return PromptRun(
        method, category, index, ids, wall, (times[0] - t0) if times else wall, tpot, rounds,
        list(chunks) if sum(chunks) == len(ids) else None,
        draft_clock.seconds if draft_clock is not None else None,
        verify_clock.seconds,
    )


# -- the benchmark -------------------------------------------------------------------------
def run_schedule(runners, encoded: list[list[int]], cfg, progress: bool, desc: str = "bench") -> list:
    """Warm every runner up (untimed), then run the schedule (interleaved: each prompt through every runner in
    turn; or one method at a time) -> the runs, method-major, prompts in order. runners: [(label, one)]."""
    from tqdm import tqdm

    if cfg.order == "method":
        schedule = [(v, i) for v in range(len(runners)) for i in range(len(encoded))]
    else:
        schedule = [(v, i) for i in range(len(encoded)) for v in range(len(runners))]
    runs = []
    bar = tqdm(total=len(schedule), desc=desc, unit="run", disable=not progress, dynamic_ncols=True)
    try:
        for label, one in runners:
            bar.set_description(f"{label} warm-up")
            one(0, encoded[0], cfg.warmup_tokens, cfg.seed)
        for v, i in schedule:
            label, one = runners[v]
            bar.set_description(label)
            runs.append(one(i, encoded[i], cfg.max_new_tokens, cfg.seed + i))
            bar.update(1)
    finally:
        bar.close()
    order = [label for label, _ in runners]
    runs.sort(key=lambda r: order.index(r.method))
    return runs


def run_bench(cfg: BenchConfig, progress: bool = True, echo=print) -> BenchResult:
    """Load the models, run every method on every prompt, return the figures. `echo` gets notes."""
    from hybrid.drafters import load_drafter, shipped_drafter
    from hybrid.engine import Engine, GenerationConfig, tree_budget
    from hybrid.pages import PagePool
    from hybrid.verifiers.hf import HFVerifier

    methods = list(cfg.methods)
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, block_size=cfg.block_size, steps=cfg.steps,
                           temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, seed=cfg.seed, lookup=cfg.lookup,
                           tree=cfg.tree)  # bad figures fail here, before any model loads
    if cfg.warmup_tokens < 1:
        raise UserError(f"warm-up tokens must be >= 1, got {cfg.warmup_tokens}")
    prompts = load_prompts(cfg.prompts or DEFAULT_PROMPTS, cfg.limit)
    categories = list(dict.fromkeys(p.category for p in prompts))
    verifier = HFVerifier.from_pretrained(cfg.verifier, cfg.dtype, cfg.device)
    skipped: dict[str, str] = {}
    drafter_spec = cfg.drafter
    if "hybrid" in methods and drafter_spec is None:
        shipped = shipped_drafter(verifier)  # hybrid/assets/drafters/<verifier name>
        if shipped is not None:
            drafter_spec = str(shipped)
        else:
            skipped["hybrid"] = f"no drafter shipped for {cfg.verifier}: pass --drafter PATH"
            methods.remove("hybrid")
            echo(f"note: skipping hybrid: {skipped['hybrid']}")
    if "parallel" in methods and cfg.parallel_drafter is None:
        skipped["parallel"] = "no parallel drafter given: pass --parallel-drafter PATH"
        methods.remove("parallel")
        echo(f"note: skipping parallel: {skipped['parallel']}")
    encoded = [verifier.encode(p.prompt, p.chat) for p in prompts]
    longest = max(len(ids) for ids in encoded)
    page_size = 16
    max_block = max([b for b in (cfg.block_sizes or ()) + (cfg.block_size,) if isinstance(b, int)] + [0])
    max_block = max(max_block, 64 if any(isinstance(b, str) for b in (cfg.block_sizes or ()) + (cfg.block_size,)) else 0)
    trees = [tree_budget(GenerationConfig(**variant_settings(b, 0, cfg.tree)))
             for b in (cfg.block_sizes or (cfg.block_size,))]
    max_block = max([max_block] + trees)  # a tree's tokens all take slots in the verify pass
    num_pages = -(-(longest + max(cfg.max_new_tokens, cfg.warmup_tokens) + max_block + 1) // page_size) + 1
    lookup_tokens = cfg.block_size if isinstance(cfg.block_size, int) else HF_LOOKUP_TOKENS
    eos = sorted(verifier.eos_token_ids)
    pad = verifier.tokenizer.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    greedy = cfg.temperature == 0

    # every model loads before anything is timed, so a bad --drafter / --assistant fails at once
    drafters = {}
    for method in methods:
        if method in ENGINE_METHODS:
            spec = {"plain": "none", "ngram": "ngram", "hybrid": drafter_spec, "parallel": cfg.parallel_drafter}[method]
            drafters[method] = d = load_drafter(spec, verifier, cfg.dtype, cfg.device)
            for b in (cfg.block_sizes or (cfg.block_size,)) if method != "plain" else ():
                b = variant_settings(b, 0)["block_size"]
                if d is not None and isinstance(b, int) and b > d.max_block_size:
                    raise UserError(f"block size {b} is above the {method} drafter's maximum of "
                                    f"{d.max_block_size}: use block sizes of {d.max_block_size} or less")
    assistant = None
    if "hf-assisted" in methods:
        from hybrid.verifiers.hf import load_causal_lm
        from hybrid.vocab import check_same_vocab

        assistant, atok = load_causal_lm(cfg.assistant, verifier.dtype if cfg.dtype == "auto" else cfg.dtype, cfg.device)
        check_same_vocab(verifier, atok, assistant.get_output_embeddings().weight.shape[0], "assistant")

    # (label, method, block size): with --block-sizes our drafters run once per size ("hybrid@8")
    variants = []
    for method in methods:
        sizes = cfg.block_sizes if cfg.block_sizes and method in ENGINE_METHODS and method != "plain" else None
        variants += [(f"{method}@{b}", method, b) for b in sizes] if sizes else [(method, method, cfg.block_size)]
    # one Engine per variant (its own coordinator state), all over the one loaded verifier and one page pool
    # (one sequence at a time); each run makes its engine's pool and captured layers the verifier's
    pool = PagePool(num_pages, page_size, verifier.device)
    runners = []
    for label, method, block_size in variants:
        if method in ENGINE_METHODS:
            engine = Engine(verifier, drafters[method], page_size=page_size, pool=pool)
            g = GenerationConfig(**{**asdict(gen), **variant_settings(block_size, gen.lookup, gen.tree)})
            engine.check(g)

            def one(i, ids, n, seed, engine=engine, label=label, g=g):
                c = GenerationConfig(**{**asdict(g), "max_new_tokens": n, "seed": seed})
                return run_engine(engine, ids, c, label, prompts[i].category, prompts[i].index)
        else:
            helper = assistant if method == "hf-assisted" else None

            def one(i, ids, n, seed, helper=helper, method=method):
                return run_hf(verifier.model, ids, method, prompts[i].category, prompts[i].index, n,
                              cfg.temperature, cfg.top_p, seed, eos, pad, helper, lookup_tokens)
        runners.append((label, one))
    peers = llamacpp_peers(cfg, prompts, skipped, echo)  # llama.cpp's methods in the same schedule (--llama-cpp)
    if peers is not None:
        runners += peers.start(encoded)
    try:
        runs = run_schedule(runners, encoded, cfg, progress)
    finally:
        if peers is not None:
            peers.close()

    stats, mismatches = summarise(runs, [label for label, _, _ in variants], categories, greedy)
    if peers is not None:  # llama.cpp's rows: speedup and identity against llama.cpp's own plain
        stats, mismatches = peers.merge_summary(runs, categories, greedy, stats, mismatches)
    config = {k: (str(v) if k == "dtype" else v) for k, v in asdict(cfg).items()}
    config.update(methods=list(methods), drafter=drafter_spec, prompts=str(cfg.prompts or DEFAULT_PROMPTS),
                  num_prompts=len(prompts), device=str(verifier.device), verifier_dtype=str(verifier.dtype),
                  torch_threads=torch.get_num_threads(),
                  cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_matmul_flags=cpu_matmul_flags())
    if peers is not None:
        config["llama_cpp"], config["notes"] = peers.describe(stats, mismatches)
    return BenchResult(config, categories, stats, skipped, mismatches, runs)


def llamacpp_peers(cfg: BenchConfig, prompts, skipped: dict, echo):
    """llama.cpp's methods for the default bench (hybrid/bench_llamacpp.py), or None when off or not available."""
    if cfg.llama_cpp == "off":
        return None
    from hybrid.bench_llamacpp import peers_for_bench

    return peers_for_bench(cfg, prompts, skipped, echo)


def cpu_matmul_flags() -> list[str]:
    """The CPU's vector and matrix instructions that decide what a verify pass over several rows costs: with
    bf16 ones (avx512_bf16, amx_tile) a few rows cost about one row; with AVX2 only, about their number of
    rows (bench/RESULTS.md (h)). As torch's own CPU detection (cpuinfo, any OS) reports them."""
    names = ("avx2", "avx512", "avx512_bf16", "vnni", "amx_tile", "amx_fp16")
    return [n for n in names if getattr(torch.cpu, f"_is_{n}_supported", lambda: False)()]


# -- reporting -----------------------------------------------------------------------------
COLUMNS = ("method", "tok/s", "speedup", "mean acc len", "TTFT s", "TPOT p50/p90/p99 ms", "draft %", "verify %",
           "lookup %", "identical")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _row(method: str, s: MethodStats) -> list[str]:
    tpot = "/".join(_fmt(v, ".0f") for v in (s.tpot_ms_p50, s.tpot_ms_p90, s.tpot_ms_p99))
    ident = "-" if s.identical_to_plain is None else ("yes" if s.identical_to_plain else "NO")
    return [method, _fmt(s.tokens_per_s, ".2f"), _fmt(s.speedup, ".2f") + ("x" if s.speedup is not None else ""),
            _fmt(s.mean_acceptance_length, ".2f"), _fmt(s.ttft_s, ".2f"), tpot,
            _fmt(None if s.draft_share is None else 100 * s.draft_share, ".0f"),
            _fmt(None if s.verify_share is None else 100 * s.verify_share, ".0f"),
            _fmt(None if s.lookup_share is None else 100 * s.lookup_share, ".0f"), ident]


def format_table(result: BenchResult, category: str) -> str:
    rows = [list(COLUMNS)] + [_row(m, cats[category]) for m, cats in result.stats.items() if category in cats]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(result: BenchResult) -> str:
    """Tables per category and overall, then the lossless check."""
    first = next(iter(result.stats.values()), {})
    n = {c: first[c].prompts if c in first else 0 for c in result.categories}
    out = []
    for c in result.categories:
        out += [f"\n{c} ({n[c]} prompt{'s' * (n[c] != 1)})", format_table(result, c)]
    total = sum(n.values())
    out += [f"\noverall ({total} prompt{'s' * (total != 1)}, {result.config['max_new_tokens']} new tokens max)",
            format_table(result, ALL)]
    out.append("")
    out += histogram_lines(result)
    out += auto_lines(result)
    out += hindsight_lines(result)
    out += result.config.get("notes") or []  # lines a backend adds (llama.cpp's baseline, the forms it ran)
    out.append(identity_line(result))
    return "\n".join(out)


def histogram_lines(result: BenchResult) -> list[str]:
    """Per engine method: rounds by draft tokens proposed (0: a plain round) and by denoising steps."""
    out = []
    for m, cats in result.stats.items():
        s = cats[ALL]
        if s.block_sizes and s.steps and m != "plain":
            hist = lambda h: " ".join(f"{k}:{v}" for k, v in h.items())  # noqa: E731
            trees = f"; draft trees by tokens verified {hist(s.tree_sizes)}" if s.tree_sizes else ""
            out.append(f"{m} rounds by block size {hist(s.block_sizes)}; by denoising steps {hist(s.steps)}{trees}")
    return out + [""] if out else []


def fixed_sizes(result: BenchResult) -> list[str]:
    """The methods run at a fixed block size with chains ("hybrid@4", not "hybrid@auto" or "hybrid@4-tree8")."""
    return [m for m in result.stats if m.partition("@")[2].isdigit()]


def auto_lines(result: BenchResult) -> list[str]:
    """With --block-sizes holding auto variants and fixed sizes: each auto variant's tokens/s over the best
    fixed size's, per category and overall, and over every fixed size overall (issue 4's two bars)."""
    fixed = fixed_sizes(result)
    autos = [m for m in result.stats if m.partition("@")[2].startswith("auto")]
    if not fixed or not autos:
        return []
    out = []
    for a in autos:
        parts = []
        for c in result.categories + [ALL]:
            best = max(fixed, key=lambda m: result.stats[m][c].tokens_per_s)
            ratio = result.stats[a][c].tokens_per_s / max(result.stats[best][c].tokens_per_s, 1e-9)
            parts.append(f"{c} {ratio:.2f} (@{best.partition('@')[2]})")
        each = ", ".join(f"@{m.partition('@')[2]} {result.stats[a][ALL].tokens_per_s / max(result.stats[m][ALL].tokens_per_s, 1e-9):.2f}"
                         for m in fixed)
        out += [f"{a} / best fixed size: {', '.join(parts)}", f"{a} / each fixed size overall: {each}"]
    return out + [""]


def hindsight_lines(result: BenchResult) -> list[str]:
    """With two or more fixed block sizes: the fastest fixed size of each category, picked after the fact, and
    that choice's tokens/s over the best single fixed size's on the whole set: the most any chooser of one
    fixed size per category could have gained on these prompts (what issue 4's second bar asks of auto)."""
    fixed = fixed_sizes(result)
    if len(fixed) < 2 or not result.categories:
        return []
    pick = {c: max(fixed, key=lambda m: result.stats[m][c].tokens_per_s) for c in result.categories}
    tokens = sum(result.stats[pick[c]][c].new_tokens for c in result.categories)
    wall = sum(result.stats[pick[c]][c].wall_s for c in result.categories)
    best = max(fixed, key=lambda m: result.stats[m][ALL].tokens_per_s)
    ratio = tokens / max(wall, 1e-9) / max(result.stats[best][ALL].tokens_per_s, 1e-9)
    picks = ", ".join(f"{c} @{pick[c].partition('@')[2]}" for c in result.categories)
    return [f"best fixed size per category in hindsight ({picks}): {ratio:.2f}x the best single fixed size "
            f"(@{best.partition('@')[2]}) overall", ""]


def load_result(path: str | Path) -> BenchResult:
    """A result saved with --json (its last line), for reports on past runs (bench/size_oracle.py)."""
    d = json.loads(Path(path).read_text().strip().splitlines()[-1])
    names = {f.name for f in fields(MethodStats)}
    stats = {m: {c: MethodStats(**{k: v for k, v in s.items() if k in names}) for c, s in cats.items()}
             for m, cats in d["methods"].items()}
    return BenchResult(d["config"], d["categories"], stats, d.get("skipped", {}),
                       [Mismatch(**x) for x in d.get("mismatches", [])])


def identity_line(result: BenchResult) -> str:
    if result.config["temperature"] != 0:
        return "identical to plain: not checked (temperature > 0 samples; outputs differ by design)"
    if "plain" not in result.stats:
        return "identical to plain: not checked (plain was not run)"
    others = [m for m in result.stats if m != "plain" and result.stats[m][ALL].identical_to_plain is not None]
    same = [m for m in others if result.stats[m][ALL].identical_to_plain]
    differ = [m for m in others if not result.stats[m][ALL].identical_to_plain]
    line = "identical to plain at temperature 0: " + (", ".join(same) if same else "none" if others else "(no other method)")
    if differ:
        parts = []
        for m in differ:
            ms = [x for x in result.mismatches if x.method == m]
            where = "; ".join(f"prompt {x.index} ({x.category}) from token {x.position}" for x in ms)
            parts.append(f"{m} [{len(ms)} of {result.stats[m][ALL].prompts} prompts: {where}]")
        line += "\nDIFFERENT from plain: " + ", ".join(parts)
    return line


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UserError("--plot needs matplotlib: pip install matplotlib (or pip install 'hybrid[plot]')") from e
    return plt


def check_plot_available() -> None:
    """Fail before the run, not after it, when --plot cannot work."""
    _pyplot()


def plot(result: BenchResult, path: str | Path) -> None:
    """Speedup per method per category, and acceptance per draft position (overall)."""
    plt = _pyplot()
    cats = result.categories + [ALL]
    methods = list(result.stats)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        ys = [result.stats[m][c].speedup or 0.0 for c in cats]
        ax1.bar([i + j * width for i in range(len(cats))], ys, width, label=m, color=f"C{j}")
    ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax1.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(cats))], cats)
    ax1.set_ylabel("speedup over plain (tokens/s)")
    ax1.set_title("speedup per category")
    ax1.legend(fontsize=8)
    for j, m in enumerate(methods):  # same colour per method in both panels
        acc = result.stats[m][ALL].acceptance_per_position
        if acc:
            ax2.plot(range(1, len(acc) + 1), acc, marker="o", label=m, color=f"C{j}")
    ax2.set_xlabel("draft position")
    ax2.set_ylabel("share of rounds accepting it")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("acceptance per draft position (all prompts)")
    if ax2.lines:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise UserError(f"cannot write plot {path}: {e.strerror or e}") from e
    finally:
        plt.close(fig)
