"""llama.cpp in `hybrid bench`: the runtime CPU users pick, on the same prompts, table and JSON.

`hybrid bench --backend llama.cpp` runs only llama.cpp's methods; the default (transformers) bench runs them
beside our engine's in the same interleaved schedule when llama.cpp is installed (`--llama-cpp auto`), their
rows named `llama.cpp/<method>`. Methods, each one `llama-server` (hybrid/llamacpp.py), all started up front
on their own ports, one slot each, one request at a time:
- ``plain``: the verifier GGUF alone.
- ``draft-model``: `--spec-type draft-simple` with the assistant GGUF (default the demo 0.5B).
- ``ngram``: `--spec-type ngram-simple`: the last NGRAM_SIZE tokens looked up in the context, what followed
  them copied as the draft (prompt lookup, as our ngram drafter and vLLM's).
- ``hybrid``: our drafter, exported to GGUF (`hybrid export-gguf`, cached, quantized like the verifier GGUF)
  and run in the form llama.cpp can run it, named in its label: a parallel drafter as
  ``hybrid:draft-simple`` (llama.cpp has no parallel drafting mode: it drafts one token per pass), a
  block-diffusion drafter as ``hybrid:draft-dflash`` where the verifier's llama.cpp architecture exposes the
  layer inputs DFlash reads, else skipped with the reason.

Draft length: llama.cpp fixes it per server: ``--block-size K`` or ``--block-sizes`` (one server per K);
``auto`` runs as K = AUTO_K, llama.cpp's own default (`--spec-draft-n-max`).

Figures. Every request streams (`/completion` with the prompt's token ids, `return_tokens`), and each chunk is
timestamped on arrival: TTFT is the first token's arrival; llama.cpp streams the tokens one verify step
accepts as separate chunks microseconds apart, so arrivals closer than GROUP_S form one commit, whose k tokens
each get 1/k of the time since the previous commit (our engine's TPOT rule). Acceptance is llama.cpp's own:
its `/metrics` counters (verify steps with a draft, draft tokens, accepted tokens, accepted tokens per draft
position) read before and after each request. llama.cpp does not report each step, but the per-position
counts give how many steps accepted exactly k tokens, so the rounds are exact up to order: those steps
commit k + 1 tokens each, and the tokens no drafted step committed (after the first) came from plain steps
(no draft found), one each. Draft tokens per round are recorded as K (llama.cpp's draft length), so
acceptance per position is llama.cpp's figure: the share of drafted steps accepting position i. Draft and
verify shares are not separated (null). Greedy outputs are checked against llama.cpp's own plain output.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from hybrid.errors import UserError

LLAMACPP_METHODS = ("plain", "hybrid", "draft-model", "ngram")
PREFIX = "llama.cpp/"  # row names beside our engine's in the default bench
AUTO_K = 3  # llama.cpp's default --spec-draft-n-max
NGRAM_SIZE = 3  # ngram-simple: tokens matched before copying
GROUP_S = 0.001  # chunks arriving closer than this belong to one verify step
THREADS = None  # llama-server threads (None: llama.cpp picks, one per core)
EXPORT_VERSION = 1  # bump when gguf_export writes differently: cached drafter GGUFs are rebuilt
# llama.cpp's general.file_type -> (export-gguf outtype, llama-quantize type or None)
FILE_TYPES = {0: ("f32", None), 1: ("f16", None), 32: ("bf16", None), 7: ("q8_0", None), 2: ("f16", "Q4_0"),
              15: ("f16", "Q4_K_M"), 14: ("f16", "Q4_K_S"), 17: ("f16", "Q5_K_M"), 16: ("f16", "Q5_K_S"),
              18: ("f16", "Q6_K")}


@dataclass
class Variant:
    label: str
    method: str
    k: int = 0
    spec_type: str | None = None
    draft_model: Path | None = None


def gguf_model(spec: str, what: str) -> Path:
    """A demo:NAME spec or a .gguf file -> the GGUF llama.cpp loads."""
    from hybrid.demo import DEMO_MODELS, demo_spec, ensure_demo_model, gguf_path

    if spec.startswith("demo:") or (spec.lower() in DEMO_MODELS and not Path(spec).exists()):
        name = demo_spec(spec.removeprefix("demo:")).name
        ensure_demo_model(name)
        return gguf_path(name)
    path = Path(spec).expanduser()
    if path.suffix.lower() != ".gguf":
        raise UserError(f"llama.cpp runs GGUF files: give the {what} as a .gguf file or demo:NAME, not {spec}")
    if not path.is_file():
        raise UserError(f"{what} GGUF not found: {path}")
    return path


def gguf_info(path: Path) -> tuple[str, int | None]:
    """(general.architecture, general.file_type) of a GGUF."""
    import gguf

    r = gguf.GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    ft = r.fields.get("general.file_type")
    return arch, (int(ft.contents()) if ft is not None else None)


def prompt_tokenizer(verifier_spec: str, verifier_gguf: Path):
    """The tokenizer that encodes the prompts: the demo model's folder (as the other backends), else the GGUF's."""
    from transformers import AutoTokenizer

    from hybrid.demo import resolve_model

    if verifier_spec.startswith("demo:") or not verifier_spec.lower().endswith(".gguf"):
        return AutoTokenizer.from_pretrained(resolve_model(verifier_spec))
    return AutoTokenizer.from_pretrained(str(verifier_gguf.parent), gguf_file=verifier_gguf.name)


def drafter_gguf(drafter: Path, verifier_ft: int | None, echo) -> tuple[Path, str]:
    """Our drafter as a GGUF, exported once into the cache (keyed by its files, the export and the type) and
    quantized as the verifier GGUF is. -> (path, llama.cpp spec type)."""
    from hybrid.demo import hybrid_home
    from hybrid.gguf_export import GgufExport, drafter_kind, export_gguf
    from hybrid.llamacpp import find_tool

    kind = drafter_kind(drafter)
    outtype, quant = FILE_TYPES.get(verifier_ft, ("f16", None))
    if quant:
        try:
            find_tool("llama-quantize")
        except UserError:
            echo(f"note: llama-quantize not found: our drafter runs in {outtype}, not {quant} like the verifier")
            quant = None
    h = hashlib.sha256(f"{EXPORT_VERSION} {outtype} {quant}".encode())
    for f in sorted(drafter.iterdir()):
        if f.is_file():
            h.update(f"{f.name} {f.stat().st_size} {f.stat().st_mtime_ns}".encode())
    out = hybrid_home() / "gguf" / "drafters" / f"{drafter.name}-{h.hexdigest()[:12]}-{(quant or outtype).lower()}.gguf"
    if not out.is_file():
        echo(f"exporting our drafter {drafter} to {out} ...")
        tmp = out.with_name(out.name + ".part.gguf")
        tmp.unlink(missing_ok=True)
        export_gguf(GgufExport(drafter=drafter, out=tmp, outtype=outtype, quantize=quant, overwrite=True))
        tmp.rename(out)
    return out, "draft-simple" if kind == "parallel" else "draft-dflash"


def plan(cfg, methods: list[str], verifier: Path, echo) -> tuple[list[Variant], dict[str, str], dict]:
    """The servers to start: (variants, skipped methods with why, what the JSON records about them)."""
    from hybrid.bench import variant_settings
    from hybrid.drafters import shipped_drafter
    from hybrid.gguf_export import DFLASH_TARGET_ARCHS, drafter_kind

    skipped: dict[str, str] = {}
    info: dict = {}
    sizes = [variant_settings(b, 0)["block_size"] for b in (cfg.block_sizes or (cfg.block_size,))]
    if "auto" in sizes:
        echo(f"note: llama.cpp keeps the draft length fixed per server; block size auto runs as K={AUTO_K} there")
    ks = list(dict.fromkeys(AUTO_K if b == "auto" else b for b in sizes))
    arch, ft = gguf_info(verifier)
    info.update(verifier_gguf=str(verifier), verifier_arch=arch, draft_tokens=ks)
    hybrid_form = None
    if "hybrid" in methods:
        spec = cfg.drafter or (str(shipped_drafter(cfg.verifier) or "") or None)
        if spec is None:
            skipped["hybrid"] = f"no drafter shipped for {cfg.verifier}: pass --drafter PATH"
        else:
            drafter = Path(spec).expanduser()
            kind = drafter_kind(drafter) if drafter.is_dir() else None
            if kind is None:
                raise UserError(f"drafter folder not found: {drafter}")
            if kind == "dflash" and arch not in DFLASH_TARGET_ARCHS:
                skipped["hybrid"] = (f"our block-diffusion drafter runs in llama.cpp as draft-dflash, which reads "
                                     f"the target's layer inputs; llama.cpp's {arch} graph does not expose them "
                                     f"(it does for {', '.join(DFLASH_TARGET_ARCHS[:3])} and others)")
            else:
                if kind == "dflash":
                    trained = int(json.loads((drafter / "config.json").read_text())["hybrid_drafter"]["block_size"])
                    if max(ks) > trained:
                        raise UserError(f"block size {max(ks)} is above the drafter's maximum of {trained}: use "
                                        f"block sizes of {trained} or less")
                path, hybrid_form = drafter_gguf(drafter, ft, echo)
                info.update(drafter=str(drafter), drafter_gguf=str(path), hybrid_form=hybrid_form)
                if hybrid_form == "draft-simple":
                    echo("note: llama.cpp has no parallel drafting mode: our parallel drafter runs there as an ordinary "
                         "draft model (draft-simple, one drafter pass per draft token)")
        if "hybrid" in skipped:
            echo(f"note: skipping llama.cpp hybrid: {skipped['hybrid']}")
    assistant = gguf_model(cfg.assistant, "assistant") if "draft-model" in methods else None
    if assistant is not None:
        info["assistant_gguf"] = str(assistant)
    variants = []
    for m in methods:
        if m in skipped:
            continue
        if m == "plain":
            variants.append(Variant("plain", m))
            continue
        name = f"hybrid:{hybrid_form}" if m == "hybrid" else m
        for k in ks:
            label = f"{name}@{k}" if cfg.block_sizes else name
            if m == "hybrid":
                variants.append(Variant(label, m, k, hybrid_form, Path(info["drafter_gguf"])))
            elif m == "draft-model":
                variants.append(Variant(label, m, k, "draft-simple", assistant))
            else:
                variants.append(Variant(label, m, k, "ngram-simple"))
    return variants, skipped, info


def commits(arrivals: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """Streamed chunks -> commits (time of the last chunk, tokens): chunks closer than GROUP_S are one step's."""
    out: list[tuple[float, int]] = []
    last = None
    for t, n in arrivals:
        if out and last is not None and t - last < GROUP_S:
            out[-1] = (t, out[-1][1] + n)
        else:
            out.append((t, n))
        last = t
    return out


def rounds_from_counters(delta: dict, k: int, new_tokens: int) -> tuple[list[tuple[int, int]], list[int]]:
    """llama.cpp's counters for one request -> (rounds as (K, accepted), tokens committed per round), drafted
    steps first, then one plain step per token no drafted step committed (the first token excepted)."""
    steps, per_pos = delta["steps"], delta["per_position"]
    counts = per_pos + [0]
    rounds: list[tuple[int, int]] = []
    prev = steps
    for a in range(len(counts)):
        exactly = prev - counts[a]  # steps that accepted exactly a tokens
        rounds += [(k, a)] * max(exactly, 0)
        prev = counts[a]
    committed = [a + 1 for _, a in rounds]
    plain = max(new_tokens - 1 - sum(committed), 0)
    return rounds + [(0, 0)] * plain, committed + [1] * plain


def counter_delta(before: dict, after: dict) -> dict:
    pp = [b - (before["per_position"][i] if i < len(before["per_position"]) else 0)
          for i, b in enumerate(after["per_position"])]
    return {"steps": after["steps"] - before["steps"], "drafted": after["drafted"] - before["drafted"],
            "accepted": after["accepted"] - before["accepted"], "per_position": pp}


class LlamaCppPeers:
    """llama.cpp's methods for one bench run. `start()` starts every server and returns each variant's
    `(label, one(i, ids, n, seed) -> PromptRun)`, the runners bench.py's schedule runs; `close()` ends them."""

    def __init__(self, cfg, methods: list[str], prompts, echo=print, prefix: str = ""):
        from hybrid.llamacpp import find_tool

        self.binary = find_tool()
        self.cfg, self.prompts, self.echo, self.prefix = cfg, prompts, echo, prefix
        self.verifier = gguf_model(cfg.verifier, "verifier")
        self.variants, self.skipped, self.info = plan(cfg, methods, self.verifier, echo)
        self.servers: dict[str, object] = {}
        self._stack = ExitStack()

    def encode(self) -> list[list[int]]:
        """The prompts' token ids, encoded as the other backends encode them."""
        from hybrid.verifiers.hf import encode_prompt

        tokenizer = prompt_tokenizer(self.cfg.verifier, self.verifier)
        return [encode_prompt(tokenizer, p.prompt, p.chat) for p in self.prompts]

    def labels(self) -> list[str]:
        return [self.prefix + v.label for v in self.variants]

    def start(self, encoded: list[list[int]]) -> list[tuple[str, object]]:
        """Start one server per variant (the context sized for the longest of the encoded prompts)."""
        from hybrid.llamacpp import LlamaServer, ServerConfig

        logs = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="hybrid-bench-llamacpp-")))
        ctx = max(len(ids) for ids in encoded) + max(self.cfg.max_new_tokens, self.cfg.warmup_tokens) + 64
        ctx = max(512, ctx + max([v.k for v in self.variants] + [0]))
        try:
            for v in self.variants:
                sc = ServerConfig(model=self.verifier, spec_type=v.spec_type, draft_model=v.draft_model,
                                  draft_max=v.k or None, ngram_size=NGRAM_SIZE, ctx_size=ctx, threads=THREADS)
                log = logs / (v.label.replace("/", "_").replace(":", "_") + ".log")
                self.servers[v.label] = self._stack.enter_context(LlamaServer(sc, log, self.binary))
            for s in self.servers.values():
                s.wait_ready()
        except BaseException:
            self.close()
            raise
        return [(self.prefix + v.label, self._runner(v)) for v in self.variants]

    def close(self) -> None:
        self._stack.close()

    def _runner(self, v: Variant):
        server = self.servers[v.label]
        return lambda i, ids, n, seed: self.run_one(server, v, i, ids, n, seed)

    def run_one(self, server, v: Variant, i: int, ids: list[int], n: int, seed: int):
        from hybrid.bench import PromptRun

        before = server.metrics() if v.spec_type else None
        c = server.complete(ids, n, self.cfg.temperature, self.cfg.top_p, seed)
        got = commits(c.arrivals)
        wall = (got[-1][0] if got else c.t0) - c.t0
        ttft = got[0][0] - c.t0 if got else wall
        tpot: list[float] = []
        for (t_prev, _), (t, k) in zip(got, got[1:]):
            tpot += [(t - t_prev) / k] * k
        rounds = committed = None
        if v.spec_type:
            delta = counter_delta(before, server.metrics())
            if c.timings.get("draft_n", 0) != delta["drafted"]:
                raise RuntimeError(f"llama.cpp's counters disagree for {v.label}: the response says "
                                   f"{c.timings.get('draft_n', 0)} draft tokens, /metrics {delta['drafted']}")
            rounds, committed = rounds_from_counters(delta, v.k, c.generated)
        ids_out = c.token_ids
        if not c.complete_ids:  # some ids were held back from the stream: ask again, untimed
            ids_out = server.ids_of(ids, n, self.cfg.temperature, self.cfg.top_p, seed)
            if len(ids_out) != c.generated:
                raise RuntimeError(f"llama-server generated {c.generated} tokens but returned {len(ids_out)} ids")
        p = self.prompts[i]
        return PromptRun(self.prefix + v.label, p.category, p.index, ids_out, wall, ttft, tpot, rounds,
                         committed, None, None)

    def merge_summary(self, runs, categories: list[str], greedy: bool, stats: dict, mismatches: list):
        """Beside our engine's rows: llama.cpp's, with speedup and identity against llama.cpp's own plain (its
        plain row has no identity figure: other weights than our plain's)."""
        from hybrid.bench import summarise

        plain = self.prefix + "plain"
        mine, theirs = summarise(runs, self.labels(), categories, greedy, plain=plain)
        for s in mine.get(plain, {}).values():
            s.identical_to_plain = None
        return {**stats, **mine}, mismatches + theirs

    def describe(self, stats: dict, mismatches: list) -> tuple[dict, list[str]]:
        """What the JSON records about llama.cpp's rows, and the lines the report prints under the tables."""
        from hybrid.bench import ALL

        plain = self.prefix + "plain"
        info = {"version": version(), "methods": [v.method for v in self.variants], **self.info,
                "skipped": self.skipped}
        notes = []
        if self.prefix:
            notes.append(f"{self.prefix}* rows: llama.cpp ({info['version']}) on {self.verifier.name}; their speedup "
                         f"and identity are against {plain}, llama.cpp's own plain decoding")
            if plain in stats and "plain" in stats:
                speed = lambda m: stats[m][ALL].tokens_per_s  # noqa: E731
                theirs = speed(plain)
                mine = max((m for m in stats if not m.startswith(self.prefix)), key=speed)
                their = max((m for m in stats if m.startswith(self.prefix)), key=speed)
                notes.append(f"{plain} decodes {theirs:.2f} tokens/s, {theirs / max(speed('plain'), 1e-9):.2f}x our "
                             f"plain; our fastest ({mine}) {speed(mine):.2f} tokens/s is {speed(mine) / max(theirs, 1e-9):.2f}x "
                             f"{plain} and {speed(mine) / max(speed(their), 1e-9):.2f}x llama.cpp's fastest "
                             f"({their}, {speed(their):.2f} tokens/s)")
        if info.get("hybrid_form") == "draft-simple":
            notes.append(f"{self.prefix}hybrid:draft-simple: our parallel drafter run as an ordinary draft model, one "
                         "drafter pass per draft token (llama.cpp has no parallel drafting mode)")
        for m, why in self.skipped.items():
            notes.append(f"{self.prefix}{m}: not available ({why})")
        if any(x.method.startswith(self.prefix) for x in mismatches):
            notes.append("llama.cpp's speculative decoding is not bit-exact: a verify pass over several rows computes "
                         "the logits with other kernels than a one-row pass, so where two tokens nearly tie its output "
                         "can differ from its plain output")
        return info, notes + [""] if notes else []


def peers_for_bench(cfg, prompts, skipped: dict, echo) -> LlamaCppPeers | None:
    """llama.cpp's methods beside our engine's in the default bench: those matching the methods asked for
    (draft-model for hf-assisted), with plain as their baseline. None, noted in `skipped`, when llama.cpp or a
    GGUF of the verifier is missing and --llama-cpp is auto; a UserError when it is on."""
    want = {"plain": "plain", "hybrid": "hybrid", "ngram": "ngram", "hf-assisted": "draft-model"}
    methods = [m for m in LLAMACPP_METHODS if m == "plain" or m in {want.get(x) for x in cfg.methods}]
    try:
        peers = LlamaCppPeers(cfg, methods, prompts, echo, prefix=PREFIX)
    except UserError as e:
        if cfg.llama_cpp == "on":
            raise
        skipped["llama.cpp"] = str(e)
        echo(f"note: no llama.cpp rows: {e}")
        return None
    for m, why in peers.skipped.items():
        skipped[PREFIX + m] = why
    return peers


def version() -> str:
    from hybrid.llamacpp import find_tool

    stamp = find_tool().parent / "llama.cpp.version"
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


def run_llamacpp_bench(cfg, progress: bool = True, echo=print):
    """`hybrid bench --backend llama.cpp`: one llama-server per (method, K), every prompt through each in turn."""
    from hybrid.bench import DEFAULT_PROMPTS, BenchResult, load_prompts, run_schedule, summarise
    from hybrid.engine import GenerationConfig

    GenerationConfig(max_new_tokens=cfg.max_new_tokens, block_size=cfg.block_size, temperature=cfg.temperature,
                     top_p=cfg.top_p)  # checked now
    if cfg.warmup_tokens < 1:
        raise UserError(f"warm-up tokens must be >= 1, got {cfg.warmup_tokens}")
    prompts = load_prompts(cfg.prompts or DEFAULT_PROMPTS, cfg.limit)
    categories = list(dict.fromkeys(p.category for p in prompts))
    peers = LlamaCppPeers(cfg, list(cfg.methods), prompts, echo)
    encoded = peers.encode()
    try:
        runs = run_schedule(peers.start(encoded), encoded, cfg, progress, desc="bench (llama.cpp)")
    finally:
        peers.close()
    labels = peers.labels()
    stats, mismatches = summarise(runs, labels, categories, cfg.temperature == 0)
    config = {k: (str(v) if k == "dtype" else v) for k, v in asdict(cfg).items()}
    info, notes = peers.describe(stats, mismatches)
    config.update(backend="llama.cpp", methods=list(cfg.methods), prompts=str(cfg.prompts or DEFAULT_PROMPTS),
                  num_prompts=len(prompts), llama_cpp=info, notes=notes)
    return BenchResult(config, categories, stats, peers.skipped, mismatches, runs)
