"""`hybrid bench --concurrency 1,4,16`: many clients at once, our engine's batched core against plain decoding
batched the same way, and vLLM serving the same model (plain and with our drafter) where vLLM is installed.

At each level c, c clients each send one request at the same moment (client i the i-th prompt of the file,
cycling); they are decoded together (`Engine.stream_many`: one verifier pass per step for all of them, prompts
prefilled in chunks). Per level and method: total tokens/s (all tokens over the level's wall time), each
client's tokens/s (its tokens over its own time from the common start, so waiting counts), time to first token
and time per output token percentiles, mean acceptance length, and what the coordinator chose under the load:
draft tokens verified per round and rows per verifier pass. Methods run in turn at each level (plain, then
ours), after one untimed warm-up each. At temperature 0 every output is checked against plain's at that level.

vLLM (`vllm-plain`, `vllm-hybrid`, each one engine in a child process as `--backend vllm` runs it, K fixed per
engine): the same requests submitted together to `LLMEngine` with `max_num_seqs` = c, each step timestamped.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hybrid.errors import UserError

LOAD_METHODS = ("plain", "hybrid")
VLLM_LOAD_METHODS = ("vllm-plain", "vllm-hybrid")


@dataclass
class LoadRun:
    """One request at one concurrency level."""

    method: str
    clients: int
    index: int  # the prompt's index in the file
    token_ids: list[int]
    wall_s: float  # from the level's start to the request's last token
    ttft_s: float  # from the level's start
    tpot_s: list[float]  # per output token after the first
    committed: list[int] = field(default_factory=list)  # tokens per round
    block_sizes: list[int] = field(default_factory=list)  # draft tokens verified per round (0: plain round)
    pass_rows: list[int] = field(default_factory=list)  # rows of the verifier pass of each of its rounds


@dataclass
class LoadStats:
    method: str
    clients: int
    tokens_per_s_total: float
    tokens_per_s_per_client: float  # mean over clients
    ttft_p50_s: float
    ttft_p90_s: float
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    tpot_p99_s: float | None
    mean_acceptance_length: float | None
    mean_block_size: float | None  # draft tokens verified per round
    mean_pass_rows: float | None  # rows per verifier pass (all clients' rounds)
    identical_to_plain: bool | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def level_stats(runs: list[LoadRun]) -> LoadStats:
    """Figures of one method at one level."""
    wall = max(r.wall_s for r in runs)
    tpot = [t for r in runs for t in r.tpot_s]
    committed = [c for r in runs for c in r.committed]
    sizes = [b for r in runs for b in r.block_sizes]
    rows = [n for r in runs for n in r.pass_rows]
    return LoadStats(
        method=runs[0].method, clients=runs[0].clients,
        tokens_per_s_total=sum(len(r.token_ids) for r in runs) / wall,
        tokens_per_s_per_client=statistics.mean(len(r.token_ids) / r.wall_s for r in runs),
        ttft_p50_s=percentile([r.ttft_s for r in runs], 50), ttft_p90_s=percentile([r.ttft_s for r in runs], 90),
        tpot_p50_s=percentile(tpot, 50), tpot_p90_s=percentile(tpot, 90), tpot_p99_s=percentile(tpot, 99),
        mean_acceptance_length=statistics.mean(committed) if committed else None,
        mean_block_size=statistics.mean(sizes) if sizes else None,
        mean_pass_rows=statistics.mean(rows) if rows else None,
    )


def run_level(engine, method: str, prompts: list[list[int]], indexes: list[int], cfg, clients: int,
              prefill_chunk: int | None) -> list[LoadRun]:
    """`clients` requests sent at once to our engine, decoded together -> one LoadRun each."""
    from hybrid.loop import _sync

    runs = [LoadRun(method, clients, indexes[i], [], 0.0, 0.0, []) for i in range(clients)]
    last = [None] * clients
    _sync(engine.verifier.device)
    t0 = time.perf_counter()
    for i, ev in engine.stream_many(prompts[:clients], cfg, max_concurrent=clients, prefill_chunk=prefill_chunk):
        _sync(engine.verifier.device)
        t = time.perf_counter() - t0
        run, r = runs[i], ev.round
        if r.tokens or r.block_size:
            run.committed.append(len(r.tokens))
            run.block_sizes.append(r.block_size if not r.lookup else len(r.tokens) - 1)
            run.pass_rows.append(r.rows)
        if ev.tokens:
            if last[i] is None:
                run.ttft_s = t
            else:
                run.tpot_s += [(t - last[i]) / len(ev.tokens)] * len(ev.tokens)
            last[i] = t
            run.token_ids += ev.tokens
        run.wall_s = t
    return runs


@dataclass
class LoadResult:
    config: dict
    stats: list[LoadStats]
    skipped: dict[str, str]
    runs: list[LoadRun]

    def to_json(self) -> dict:
        return {"config": self.config, "stats": [asdict(s) for s in self.stats], "skipped": self.skipped,
                "runs": [asdict(r) for r in self.runs]}


def run_load_bench(cfg, levels: list[int], progress: bool = True, echo=print, prefill_chunk: int | None = None
                   ) -> LoadResult:
    """The concurrency bench of BenchConfig `cfg` at `levels` clients (`prefill_chunk`: prompt tokens prefilled per
    step in all; None: the engine's default)."""
    from tqdm import tqdm

    from hybrid.bench import DEFAULT_PROMPTS, load_prompts
    from hybrid.drafters import load_drafter, shipped_drafter
    from hybrid.engine import DEFAULT_PREFILL_CHUNK, Engine, GenerationConfig
    from hybrid.pages import PagePool
    from hybrid.verifiers.hf import HFVerifier

    prefill_chunk = prefill_chunk or DEFAULT_PREFILL_CHUNK
    if not levels or any(c < 1 for c in levels):
        raise UserError(f"--concurrency takes client counts >= 1, e.g. 1,4,16; got {levels}")
    methods = [m for m in cfg.methods if m in LOAD_METHODS + VLLM_LOAD_METHODS] or list(LOAD_METHODS)
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, block_size=cfg.block_size, steps=cfg.steps,
                           temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, lookup=cfg.lookup,
                           tree=cfg.tree)
    prompts = load_prompts(cfg.prompts or DEFAULT_PROMPTS)
    need = max(levels)
    picked = [prompts[i % len(prompts)] for i in range(need)]
    verifier = HFVerifier.from_pretrained(cfg.verifier, cfg.dtype, cfg.device)
    encoded = [verifier.encode(p.prompt, p.chat) for p in picked]
    indexes = [p.index for p in picked]
    skipped: dict[str, str] = {}
    drafter_spec = cfg.drafter or (str(shipped_drafter(verifier)) if shipped_drafter(verifier) else None)
    if drafter_spec is None and ("hybrid" in methods or "vllm-hybrid" in methods):
        for m in ("hybrid", "vllm-hybrid"):
            if m in methods:
                skipped[m] = f"no drafter shipped for {cfg.verifier}: pass --drafter PATH"
                methods.remove(m)
    vllm_methods = [m for m in methods if m in VLLM_LOAD_METHODS]
    if vllm_methods and importlib.util.find_spec("vllm") is None:
        for m in vllm_methods:
            skipped[m] = "vLLM is not installed (bash setup.sh --vllm)"
        vllm_methods = []
    for m, why in skipped.items():
        echo(f"note: skipping {m}: {why}")

    page_size = 16
    longest = max(len(ids) for ids in encoded)
    per_request = -(-(longest + cfg.max_new_tokens + 64 + 1) // page_size)
    pool = PagePool(per_request * need + 1, page_size, verifier.device)
    engines = {}
    for m in methods:
        if m in LOAD_METHODS:
            drafter = load_drafter("none" if m == "plain" else drafter_spec, verifier, cfg.dtype, cfg.device)
            engines[m] = Engine(verifier, drafter, page_size=page_size, pool=pool)
            engines[m].check(gen)
    runs: list[LoadRun] = []
    bar = tqdm(total=len(levels) * len(engines), desc="bench (load)", unit="level", disable=not progress)
    try:
        for m, engine in engines.items():  # untimed warm-up
            engine.generate(encoded[0], GenerationConfig(**{**asdict(gen), "max_new_tokens": cfg.warmup_tokens}))
        for c in levels:
            for m, engine in engines.items():
                bar.set_description(f"{m} x{c}")
                runs += run_level(engine, m, encoded, indexes, gen, c, prefill_chunk)
                bar.update(1)
    finally:
        bar.close()
    if vllm_methods:
        from hybrid.bench_vllm import run_vllm_load

        runs += run_vllm_load(cfg, vllm_methods, levels, encoded, indexes, drafter_spec, echo=echo)

    stats = []
    for c in levels:
        plain = {r.index: r.token_ids for r in runs if r.method == "plain" and r.clients == c}
        for m in methods:
            mine = [r for r in runs if r.method == m and r.clients == c]
            if not mine:
                continue
            s = level_stats(mine)
            if cfg.temperature == 0 and plain and m != "plain":
                s.identical_to_plain = all(r.token_ids == plain.get(r.index, r.token_ids) for r in mine)
            stats.append(s)
    config = {k: (str(v) if k == "dtype" else v) for k, v in asdict(cfg).items()}
    config.update(mode="concurrency", levels=levels, methods=methods, drafter=drafter_spec,
                  prompts=str(cfg.prompts or DEFAULT_PROMPTS), device=str(verifier.device),
                  verifier_dtype=str(verifier.dtype), prefill_chunk=prefill_chunk)
    return LoadResult(config, stats, skipped, runs)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_load_report(result: LoadResult) -> str:
    """One table: a row per (level, method), with speedup over plain at that level and scaling over one client."""
    head = ["clients", "method", "total tok/s", "vs plain", "vs 1 client", "per-client tok/s", "TTFT p50", "TTFT p90",
            "TPOT p50", "TPOT p90", "TPOT p99", "acc len", "block", "rows/pass", "same as plain"]
    by = {(s.method, s.clients): s for s in result.stats}
    rows = []
    for s in result.stats:
        plain = by.get(("vllm-plain" if s.method.startswith("vllm") else "plain", s.clients))
        one = by.get((s.method, 1))
        rows.append([str(s.clients), s.method, f"{s.tokens_per_s_total:.2f}",
                     f"{s.tokens_per_s_total / plain.tokens_per_s_total:.2f}x" if plain else "-",
                     f"{s.tokens_per_s_total / one.tokens_per_s_total:.2f}x" if one else "-",
                     f"{s.tokens_per_s_per_client:.2f}", _fmt(s.ttft_p50_s, ".2f"), _fmt(s.ttft_p90_s, ".2f"),
                     _fmt(s.tpot_p50_s, ".3f"), _fmt(s.tpot_p90_s, ".3f"), _fmt(s.tpot_p99_s, ".3f"),
                     _fmt(s.mean_acceptance_length, ".2f"), _fmt(s.mean_block_size, ".2f"),
                     _fmt(s.mean_pass_rows, ".1f"),
                     "-" if s.identical_to_plain is None else ("yes" if s.identical_to_plain else "NO")])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out += [f"skipped {m}: {why}" for m, why in result.skipped.items()]
    return "\n".join(out)


def load_result(path: str | Path) -> LoadResult:
    d = json.loads(Path(path).read_text())
    return LoadResult(d["config"], [LoadStats(**s) for s in d["stats"]], d["skipped"], [LoadRun(**r) for r in d["runs"]])
