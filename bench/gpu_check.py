"""The GPU path in one prepared run: GPU tests, page-kernel bandwidth, the engine end to end, pass costs, and
the speedup those costs project with the acceptance measured on a CPU.

    bash bench/gpu_check.sh OUT_DIR                       # a GPU machine: under 8 minutes on an H200
    .venv/bin/python bench/gpu_check.py --dry-run --out OUT_DIR   # CPU, tiny models: keeps the script working

Stages, in order of what a short GPU lease needs most:
1. tests: `pytest -m gpu` over the test files that hold GPU tests, capped in time.
2. kernels: write_kv_all_layers, gather_kv and copy_pages (CuPy) against a device-to-device copy of the
   same bytes and against the torch reference, in GB/s (bytes read + written); plus the page work of one
   verifier pass at the demo verifier's shape, in microseconds.
3. engine: a tiny float32 model on the device through `Engine`: greedy and seeded sampling with deterministic
   drafters (parallel, diffusion) must commit exactly plain decoding's tokens.
4. costs: seconds per pass for 1..32 rows at batch 1 in bf16, random weights, for the demo verifier's shape
   (Qwen2.5-Coder-1.5B-Instruct) and the parallel drafter's (Qwen2.5-0.5B): through our paged verifier
   ("paged", what the engine runs today), transformers with a static cache ("static"), that forward replayed
   as a CUDA graph ("graph"), and torch.compile mode="reduce-overhead" ("compile", last: it takes longest).
5. projection: speedup per bench category from those costs and the mean acceptance measured on a CPU.

OUT_DIR/gpu_check.json is rewritten after every stage, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # hybrid without an install; tests/tiny.py's in-memory models

ROWS = (1, 2, 4, 8, 16, 32)  # new tokens in one pass
VOCAB = 151936
SHAPES = {  # random-weight stand-ins for the demo models (Qwen2 family, tied embeddings)
    "verifier": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                     intermediate_size=8960, vocab_size=VOCAB),  # Qwen2.5-Coder-1.5B-Instruct
    "drafter": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=4864, vocab_size=VOCAB),  # Qwen2.5-0.5B: the parallel drafter's base
}
TINY_SHAPES = {  # --dry-run
    "verifier": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=512),
    "drafter": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=64, vocab_size=512),
}
PROJECTION_NOTE = (
    "PROJECTION, not a measurement: a round of block size B costs draft(B rows) + verify(B + 1 rows) and commits "
    "tau tokens, plain decoding costs verify(1 row) per token; tau comes from a CPU bench run (acceptance does "
    "not depend on the hardware). Host work between passes (acceptance, coordinator, detokenising) is not counted. "
    "With block size auto the measured tau is charged the largest block's cost (pessimistic), while tau(B*) takes "
    "each position's acceptance among the rounds that drafted it (optimistic: the coordinator drafts far when "
    "confident)."
)


# -- timing ---------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, *, warmup: int, reps: int, inner: int = 1) -> float:
    """Median seconds of one fn() over reps timings of `inner` calls each, after warmup calls; CUDA events on a
    GPU (the device is idle when each timing starts), perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


# -- 1. tests ---------------------------------------------------------------------------------
def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def run_tests(files: list[str], timeout_s: float, log: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:  # its output may come as bytes, text=True or not
        out, rc = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or "", None
    log.write_text(out)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed)", out)}
    return {"files": files, "returncode": rc, "timed_out": rc is None, "counts": counts,
            "ok": rc in (0, 5) and not counts.get("failed") and not counts.get("error") and not counts.get("errors"),
            "wall_s": round(time.monotonic() - t0, 1), "log": log.name}


# -- 2. kernels -------------------------------------------------------------------------------
def kernel_stage(device: torch.device, dry: bool, reps: int) -> dict:
    """GB/s (bytes read + written) of each page op: the CuPy kernel, the torch reference, and copy_ of as many bytes."""
    from hybrid.cuda import kernels, reference as ref

    have = device.type == "cuda" and kernels.available()
    dtype = torch.bfloat16
    L, N, P, H, D = (2, 64, 16, 2, 16) if dry else (4, 8192, 16, 8, 128)  # a 2 GiB pool on a GPU
    kv = torch.randn(L, 2, N, P, H, D, device=device).to(dtype)
    table = torch.randperm(N, device=device)
    T = N * P // 2
    slots = ref.slots_for(table, 0, T, P)
    k, v = (torch.randn(L, T, H, D, device=device).to(dtype) for _ in range(2))
    half = torch.randperm(N, device=device)
    src, dst = half[: N // 2], half[N // 2 :]
    e = kv.element_size()
    cases = {  # op -> (bytes read + written, call(module))
        "write_kv_all_layers": (4 * L * T * H * D * e, lambda m: m.write_kv_all_layers(kv, k, v, slots)),
        "gather_kv": (4 * N * P * H * D * e, lambda m: m.gather_kv(kv, 1, table, N * P)),
        "copy_pages": (4 * L * (N // 2) * P * H * D * e, lambda m: m.copy_pages(kv, src, dst)),
    }
    flat = torch.empty(max(b for b, _ in cases.values()) // 2, dtype=torch.uint8, device=device)
    flat_dst = torch.empty_like(flat)
    result = {"dtype": str(dtype), "pool_shape": [L, 2, N, P, H, D], "kernels": have,
              "note": None if have else "CuPy kernels skipped: needs a CUDA GPU and CuPy (pip install cupy-cuda12x)"}
    timing = dict(warmup=2, reps=reps, inner=1 if dry else 5)
    ops = {}
    for name, (moved, call) in cases.items():
        def gbps(fn, moved=moved):
            return float(f"{moved / seconds_per_call(fn, device, **timing) / 1e9:.3g}")

        row = {"bytes_moved": moved,
               "copy_gbps": gbps(lambda: flat_dst[: moved // 2].copy_(flat[: moved // 2])),
               "reference_gbps": gbps(lambda: call(ref))}
        if have:
            row["kernel_gbps"] = gbps(lambda: call(kernels))
            row["kernel_over_copy"] = round(row["kernel_gbps"] / row["copy_gbps"], 3)
        ops[name] = row
    if have:  # the same calls give the same bits
        bits = lambda t: t.view(torch.int16)  # noqa: E731
        a, b = kv.clone(), kv.clone()
        ref.copy_pages(a, src, dst)
        kernels.copy_pages(b, src, dst)
        ops["copy_pages"]["equal_to_reference"] = torch.equal(bits(a), bits(b))
        ref.write_kv_all_layers(a, k, v, slots)
        kernels.write_kv_all_layers(b, k, v, slots)
        ops["write_kv_all_layers"]["equal_to_reference"] = torch.equal(bits(a), bits(b))
        ops["gather_kv"]["equal_to_reference"] = all(
            torch.equal(bits(x), bits(y)) for x, y in zip(ref.gather_kv(kv, 1, table, N * P),
                                                          kernels.gather_kv(kv, 1, table, N * P)))
        del a, b
    result["ops"] = ops
    del kv, k, v, flat, flat_dst
    result["per_pass"] = page_work_per_pass(device, dry, reps, have)
    return result


def page_work_per_pass(device: torch.device, dry: bool, reps: int, have: bool) -> dict:
    """What PagedLayer.update does in one verifier pass of 16 rows after 512 tokens (the demo verifier's cache
    shape): per layer, write 16 positions and gather 528, for every layer. Microseconds, kernels vs reference."""
    from hybrid.cuda import kernels, reference as ref

    shape = TINY_SHAPES["verifier"] if dry else SHAPES["verifier"]
    L, H = shape["num_hidden_layers"], shape["num_key_value_heads"]
    D, P, rows, ctx = shape["hidden_size"] // shape["num_attention_heads"], 16, 16, 512
    N = (ctx + rows) // P + 1
    kv = torch.zeros(L, 2, N, P, H, D, dtype=torch.bfloat16, device=device)
    table = torch.arange(N, device=device)
    slots = ref.slots_for(table, ctx, ctx + rows, P)
    k = torch.randn(rows, H, D, device=device).to(kv.dtype)

    def one_pass(m):
        for layer in range(L):
            m.write_kv(kv, layer, k, k, slots)
            m.gather_kv(kv, layer, table, ctx + rows)

    out = {"layers": L, "rows": rows, "context": ctx,
           "reference_us": round(seconds_per_call(lambda: one_pass(ref), device, warmup=2, reps=reps) * 1e6, 1)}
    if have:
        out["kernel_us"] = round(seconds_per_call(lambda: one_pass(kernels), device, warmup=2, reps=reps) * 1e6, 1)
    return out


# -- 3. engine --------------------------------------------------------------------------------
def engine_stage(device: torch.device, max_new_tokens: int) -> dict:
    """Tiny float32 models on the device through the engine; each case must commit plain decoding's tokens."""
    from tiny import tiny_model, tiny_tokenizer

    from hybrid.drafters.diffusion import DiffusionDrafter
    from hybrid.drafters.parallel import ParallelConfig, ParallelDrafter
    from hybrid.engine import Engine, GenerationConfig
    from hybrid.verifiers.hf import HFVerifier

    def lm(seed):
        return HFVerifier(tiny_model("qwen3", seed).to(device), tiny_tokenizer())

    prompt = [5, 40, 41, 42, 9, 40, 41, 42, 9, 40]
    verifier = lm(0)
    torch.manual_seed(1)
    drafters = {  # deterministic drafts: a seed commits plain sampling's tokens too
        "parallel": ParallelDrafter(lm(7), ParallelConfig(base="", mask_token_id=3, block_size=8)),
        "diffusion": DiffusionDrafter.for_verifier(verifier, num_hidden_layers=1, num_attention_heads=4,
                                                   num_key_value_heads=2, head_dim=16, intermediate_size=64),
    }
    plain = Engine(verifier, None, num_pages=64, page_size=8)
    settings = [dict(block_size=4), dict(block_size="auto"),
                dict(block_size=4, temperature=1.0, seed=3), dict(block_size="auto", temperature=1.0, seed=3)]
    configs = [GenerationConfig(max_new_tokens=max_new_tokens, stop_on_eos=False, **s) for s in settings]
    expected = [plain.generate(prompt, cfg).token_ids for cfg in configs]
    cases = []
    for name, drafter in drafters.items():
        engine = Engine(verifier, drafter, num_pages=64, page_size=8)
        for s, cfg, tokens in zip(settings, configs, expected):
            case = {"drafter": name, **s}
            try:
                r = engine.generate(prompt, cfg)
                case.update(identical_to_plain=r.token_ids == tokens, tokens=r.new_tokens,
                            mean_acceptance_length=round(r.mean_acceptance_length, 2))
            except Exception as e:  # a crash is this check's finding, not the end of the run
                case.update(identical_to_plain=False, error=first_line(e))
            cases.append(case)
    with torch.inference_mode():
        hf = verifier.model.generate(torch.tensor([prompt], device=device), max_new_tokens=max_new_tokens,
                                     min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = expected[0]
    chosen = os.environ.get("HYBRID_PAGE_OPS")
    os.environ["HYBRID_PAGE_OPS"] = "torch"
    try:
        with_reference_ops = plain.generate(prompt, configs[0]).token_ids
    finally:
        os.environ.pop("HYBRID_PAGE_OPS")
        if chosen is not None:
            os.environ["HYBRID_PAGE_OPS"] = chosen
    from hybrid.cuda import ops_for

    page_ops = ops_for(plain.pool.kv[verifier.name]).__name__.rsplit(".", 1)[-1]
    return {"device": str(device), "page_ops": "cupy" if page_ops == "kernels" else "torch reference",
            "cases": cases, "plain_equals_transformers_generate": ours == hf[0, len(prompt):].tolist(),
            "page_ops_equal_torch_reference": ours == with_reference_ops,
            "ok": all(c["identical_to_plain"] for c in cases) and ours == with_reference_ops}


# -- 4. costs ---------------------------------------------------------------------------------
def random_model(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=32768, use_sliding_window=False)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


class PassCosts:
    """Seconds per forward pass of n new rows after `context` cached tokens, for one model, several ways."""

    def __init__(self, model, context: int, device: torch.device, warmup: int, reps: int):
        from transformers import StaticCache

        self.model, self.context, self.device, self.timing = model, context, device, dict(warmup=warmup, reps=reps)
        vocab = model.config.vocab_size
        self.ctx = torch.randint(0, vocab, (context,), device=device)  # [C]
        self.tokens = {n: torch.randint(0, vocab, (1, n), device=device) for n in ROWS}  # [1, n]
        self.positions = {n: torch.arange(context, context + n, device=device) for n in ROWS}  # [n]
        self.cache = StaticCache(config=model.config, max_cache_len=context + max(ROWS))
        # every cache slot valid (the causal mask hides those past a row): transformers then builds the mask
        # without reading tensor values on the host, which a CUDA graph capture would refuse
        self.mask = torch.ones(1, context + max(ROWS), dtype=torch.long, device=device)  # [1, C + 32]
        with torch.inference_mode():
            model(input_ids=self.ctx[None], cache_position=torch.arange(context, device=device),
                  past_key_values=self.cache, use_cache=True)

    def paged(self) -> dict[int, float]:
        """Our verifier's pass (hybrid.verifiers.hf: paged cache, logits of every row), then a roll back."""
        from hybrid.pages import PagePool
        from hybrid.verifiers.hf import HFVerifier

        v = HFVerifier(self.model, None)
        pool = PagePool(-(-(self.context + max(ROWS)) // 16) + 1, 16, self.device)
        v.attach(pool)
        seq = pool.new_sequence()
        v.prefill(seq, self.ctx)

        def one(n):
            v.score(seq, self.tokens[n][0])
            seq.pool.rollback(seq, self.context)

        return {n: seconds_per_call(lambda: one(n), self.device, **self.timing) for n in ROWS}

    def _static(self, forward, n):
        self._rewind()
        pos = self.positions[n]
        return forward(input_ids=self.tokens[n], attention_mask=self.mask, position_ids=pos[None], cache_position=pos,
                       past_key_values=self.cache, use_cache=True).logits

    def _rewind(self) -> None:
        """Back to `context` cached tokens: transformers versions whose static layers count their own length
        (a device tensor: the reset is captured in a graph too) write each pass at the same positions."""
        for layer in self.cache.layers:
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, torch.Tensor):
                length.fill_(self.context)
            elif length is not None:
                layer.cumulative_length = self.context

    @torch.inference_mode()
    def static(self) -> dict[int, float]:
        """transformers with a static cache, eager."""
        return {n: seconds_per_call(lambda: self._static(self.model, n), self.device, **self.timing) for n in ROWS}

    @torch.inference_mode()
    def graph(self) -> dict[int, float]:
        """The static-cache forward captured once per row count as a CUDA graph, replayed."""
        out = {}
        for n in ROWS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._static(self.model, n)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._static(self.model, n)
            out[n] = seconds_per_call(g.replay, self.device, **self.timing)
            del g
        return out

    @torch.inference_mode()
    def compiled(self, deadline: float, entry: dict, save) -> None:
        """entry = torch.compile(mode="reduce-overhead") of the static-cache forward, 1 and 16 rows first, saved
        after each row count, until the deadline (a new row count may compile again). A failure makes the
        series unavailable, not the run."""
        seconds = {}
        entry.clear()
        entry.update(seconds=seconds, note="started; cut short by the run's time limit")
        try:
            forward = torch.compile(self.model.forward, mode="reduce-overhead")
            for n in (1, 16, 2, 4, 8, 32):
                if time.monotonic() > deadline:
                    entry["note"] = f"time budget spent before rows {sorted(set(ROWS) - set(map(int, seconds)))}"
                    return
                timing = {**self.timing, "warmup": self.timing["warmup"] + 3}  # compile, then record the graphs
                seconds[str(n)] = seconds_per_call(lambda: self._static(forward, n), self.device, **timing)
                save()
            entry["note"] = None
        except Exception as e:
            entry["unavailable"] = first_line(e)
            entry.pop("note")


def series(fn) -> dict:
    try:
        return {"seconds": {str(n): s for n, s in fn().items()}}
    except Exception as e:
        return {"unavailable": first_line(e)}


def curve(entry: dict) -> dict[int, float]:
    return {int(n): s for n, s in entry.get("seconds", {}).items()}


# -- 5. projection ------------------------------------------------------------------------------
def newest_bench(results: Path = ROOT / "bench" / "results") -> Path | None:
    """The newest CPU bench JSON with per-category acceptance for "parallel" or "hybrid" (by the date in its name,
    then a parallel-drafter run first, then name)."""
    found = []
    for p in results.glob("cpu-2cores-*.json"):
        try:
            methods = json.loads(p.read_text()).get("methods", {})
        except (OSError, ValueError):
            continue
        if {"parallel", "hybrid"} & set(methods):
            date = re.search(r"\d{4}-\d{2}-\d{2}", p.name)
            found.append((date.group() if date else "", "parallel" in methods, p.name, p))
    return max(found)[-1] if found else None


def load_acceptance(path: Path) -> dict:
    """Per category: mean acceptance length, acceptance per draft position, block size used."""
    data = json.loads(path.read_text())
    method = "parallel" if "parallel" in data["methods"] else "hybrid"
    fixed = data.get("config", {}).get("block_size")
    cats = {}
    for cat, s in data["methods"][method].items():
        used = [int(b) for b in (s.get("block_sizes") or {}) if int(b) > 0]
        cats[cat] = {"tau": s["mean_acceptance_length"],
                     "acceptance_per_position": s.get("acceptance_per_position") or [],
                     "block_size": fixed if isinstance(fixed, int) else max(used, default=1)}
    try:
        source = str(path.resolve().relative_to(ROOT))
    except ValueError:
        source = str(path)
    return {"source": source, "method": method, "categories": cats}


def cost_at(curve: dict[int, float], rows: float) -> float:
    """Seconds of a pass of `rows` rows, linear between the measured row counts (and past the last)."""
    xs = sorted(curve)
    i = min(max(bisect.bisect_left(xs, rows), 1), len(xs) - 1)  # the segment xs[i - 1] .. xs[i] holding rows
    lo, hi = xs[i - 1], xs[i]
    return curve[lo] + (curve[hi] - curve[lo]) * (rows - lo) / (hi - lo)


def expected_tau(acceptance_per_position: list[float], block_size: int) -> float:
    """1 + the chance that each of the first B draft positions is accepted (a position is accepted only when the
    ones before it are: the shares are made non-increasing)."""
    tau, share = 1.0, 1.0
    for a in acceptance_per_position[:block_size]:
        share = min(share, a)
        tau += share
    return tau


def speedup(tau: float, block_size: int, verify: dict[int, float], draft: dict[int, float]) -> float:
    return tau * verify[1] / (cost_at(draft, block_size) + cost_at(verify, block_size + 1))


def project(category: dict, verify: dict[int, float], draft: dict[int, float]) -> dict:
    """The measured tau at the block size used, and the best block size for the acceptance per position."""
    b, tau = category["block_size"], category["tau"]
    out = {"measured": {"block_size": b, "tau": tau, "speedup": speedup(tau, b, verify, draft)}}
    acc = category["acceptance_per_position"]
    sizes = range(1, min(len(acc), max(verify) - 1) + 1)  # verify(B + 1) within the measured rows
    candidates = [(speedup(expected_tau(acc, b), b, verify, draft), b) for b in sizes]
    if candidates:
        s, b = max(candidates)
        out["best"] = {"block_size": b, "tau": expected_tau(acc, b), "speedup": s}
    else:
        out["best"] = dict(out["measured"])
    return out


def projection_stage(costs: dict, acceptance: dict) -> dict:
    """Projections for each cost set: "paged" (the engine today) and "best" (the cheapest way per row count)."""
    def best_of(model):
        curves = [curve(e) for e in costs[model]["series"].values() if curve(e)]
        return {n: min(c[n] for c in curves if n in c) for n in ROWS if any(n in c for c in curves)}

    cost_sets = {"paged": {m: curve(costs[m]["series"]["paged"]) for m in ("verifier", "drafter")},
                 "best": {m: best_of(m) for m in ("verifier", "drafter")}}
    out = {"note": PROJECTION_NOTE, "acceptance_source": acceptance["source"], "method": acceptance["method"],
           "categories": {}}
    for cat, c in acceptance["categories"].items():
        out["categories"][cat] = {name: project(c, cs["verifier"], cs["drafter"]) for name, cs in cost_sets.items()
                                  if len(cs["verifier"]) == len(ROWS) and len(cs["drafter"]) == len(ROWS)}
    return out


# -- report ---------------------------------------------------------------------------------
def goals(report: dict) -> dict:
    """The issue's goals, where this run measured what they need."""
    g = {}
    ops = report.get("kernels", {}).get("ops", {})
    if any("kernel_over_copy" in o for o in ops.values()):
        g["write_and_gather_at_least_70pct_of_copy"] = all(
            ops[k].get("kernel_over_copy", 0) >= 0.7 for k in ("write_kv_all_layers", "gather_kv"))
    for name, entry in report.get("costs", {}).get("verifier", {}).get("series", {}).items():
        c = curve(entry)
        if 1 in c and 16 in c:
            g[f"verify_16_rows_at_most_1.3x_1_row_{name}"] = c[16] / c[1] <= 1.3
    code = report.get("projection", {}).get("categories", {}).get("code", {})
    if "best" in code:
        g["projected_code_speedup_at_least_3x"] = code["best"]["best"]["speedup"] >= 3
    return g


def _kernel_lines(k: dict) -> list[str]:
    lines = [f"page ops, bf16 pool {k['pool_shape']}: GB/s read + written" + (f"  ({k['note']})" if k["note"] else ""),
             f"  {'op':22s} {'kernel':>8s} {'copy_':>8s} {'ratio':>6s} {'torch ref':>9s}"]
    for name, o in k["ops"].items():
        lines.append(f"  {name:22s} {o.get('kernel_gbps', '-'):>8} {o['copy_gbps']:>8} "
                     f"{o.get('kernel_over_copy', '-'):>6} {o['reference_gbps']:>9}")
    p = k["per_pass"]
    lines.append(f"  page work of one pass ({p['layers']} layers x write {p['rows']} + gather "
                 f"{p['context'] + p['rows']}): kernel {p.get('kernel_us', '-')} us, torch ref {p['reference_us']} us")
    return lines


def _engine_lines(e: dict) -> list[str]:
    same = sum(c["identical_to_plain"] for c in e["cases"])
    return [f"engine on {e['device']} ({e['page_ops']} page ops): {same}/{len(e['cases'])} runs identical to plain "
            f"decoding; page ops == torch reference: {e['page_ops_equal_torch_reference']}; plain == transformers "
            f"generate: {e['plain_equals_transformers_generate']}"] + [
        f"  FAILED {c}" for c in e["cases"] if not c["identical_to_plain"]]


def _cost_lines(costs: dict, context: int) -> list[str]:
    lines = [f"pass cost, ms (bf16, batch 1, {context} cached tokens, random weights)",
             f"  {'model':9s} {'series':8s}" + "".join(f"{n:>8d}" for n in ROWS) + f"{'16/1':>8s}"]
    for model, entry in costs.items():
        for name, s in entry.get("series", {}).items():
            c = curve(s)
            cells = "".join(f"{c[n] * 1e3:8.2f}" if n in c else f"{'-':>8s}" for n in ROWS)
            ratio = f"{c[16] / c[1]:8.2f}" if 1 in c and 16 in c else f"{'':8s}"
            why = [s["unavailable"]] if "unavailable" in s else [f"({s['note']})"] if s.get("note") else []
            lines.append(f"  {model:9s} {name:8s}{cells}{ratio}" + "".join(f"  {w}" for w in why))
    return lines


def _projection_lines(pr: dict) -> list[str]:
    lines = [pr["note"], f"acceptance: {pr['acceptance_source']}, method {pr['method']}",
             f"  {'category':14s} {'tau':>5s} {'B':>3s} {'paged':>6s} | {'B*':>3s} {'tau(B*)':>7s} {'paged':>6s}"
             f" | {'B*':>3s} {'tau(B*)':>7s} {'best':>6s}"]
    for cat, p in pr["categories"].items():
        if "paged" in p and "best" in p:
            mp, bp, bb = p["paged"]["measured"], p["paged"]["best"], p["best"]["best"]
            cells = [f"{x['block_size']:3d} {x['tau']:7.2f} {x['speedup']:5.2f}x" for x in (bp, bb)]
            measured = f"{mp['tau']:5.2f} {mp['block_size']:3d} {mp['speedup']:5.2f}x"
            lines.append(f"  {cat:14s} {measured} | " + " | ".join(cells))
    lines.append("  (tau, B: measured on the CPU; B*: the best block for the acceptance per position; paged: our "
                 "engine's passes today; best: the cheapest series per row count, for plain decoding too)")
    return lines


def format_table(report: dict) -> str:
    m = report["meta"]
    lines = [f"GPU check{' (DRY RUN: tiny models on a CPU, the figures mean nothing)' if m['dry_run'] else ''}: "
             f"{m['device_name']}, torch {m['torch']}, cupy {m['cupy']}, {m['date']}"]
    if t := report.get("tests"):
        lines.append(f"tests (pytest -m gpu): {t.get('counts')}, rc {t.get('returncode')}, {t['wall_s']} s"
                     + (" TIMED OUT" if t.get("timed_out") else ""))
    if "ops" in report.get("kernels", {}):
        lines += _kernel_lines(report["kernels"])
    if "cases" in report.get("engine", {}):
        lines += _engine_lines(report["engine"])
    if report.get("costs"):
        lines += _cost_lines(report["costs"], m["context"])
    if report.get("projection", {}).get("categories"):
        lines += _projection_lines(report["projection"])
    if report.get("goals"):
        lines.append("goals: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in report["goals"].items()))
    if report["errors"]:
        lines.append(f"ERRORS: {report['errors']}")
    return "\n".join(lines)


class Report:
    """The run's JSON, rewritten after every stage, so a run cut short keeps what it measured."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.start = path, time.monotonic()
        self.data: dict = {"meta": meta, "errors": {}}

    def save(self) -> None:
        self.data["goals"] = goals(self.data)
        self.data["meta"]["wall_s"] = round(time.monotonic() - self.start, 1)
        self.path.write_text(json.dumps(self.data, indent=1))

    def stage(self, name: str, fn, into: dict | None = None, key: str | None = None) -> None:
        """into[key] = fn() (default: the report's `name`); an exception is recorded and the run goes on."""
        into, key, t0 = self.data if into is None else into, key or name, time.monotonic()
        try:
            into[key] = fn()
        except Exception as e:
            into[key] = {"error": first_line(e)}
            self.data["errors"][name] = first_line(e)
            traceback.print_exc()
        into[key]["wall_s"] = round(time.monotonic() - t0, 1)
        self.save()
        print(f"[{time.monotonic() - self.start:6.1f} s] {name} done", flush=True)


def meta(args, device: torch.device) -> dict:
    try:
        import cupy

        cupy_version = cupy.__version__
    except ImportError:
        cupy_version = None
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "dry_run": args.dry_run,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
            "cupy": cupy_version, "python": platform.python_version(), "budget_s": args.budget,
            "context": args.context, "warmup": args.warmup, "reps": args.reps}


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and pytest.log")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, few repetitions (CI)")
    ap.add_argument("--budget", type=float, default=420, help="seconds for the whole run (compile stops at it)")
    ap.add_argument("--tests-timeout", type=float, default=150)
    ap.add_argument("--tests", nargs="*", default=None, help="test files (default: those holding GPU tests)")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="measure torch.compile (default: on a CUDA device outside a dry run)")
    ap.add_argument("--context", type=int, default=None, help="cached tokens before each pass (default 512; dry 32)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed passes first (default 3; dry 1)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions, the median is kept (default 15; dry 2)")
    ap.add_argument("--acceptance", type=Path, default=None,
                    help="CPU bench JSON (default: the newest under bench/results)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.context = args.context or (32 if dry else 512)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 3)
    args.reps = args.reps or (2 if dry else 15)
    args.device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if args.compile is None:
        args.compile = args.device.type == "cuda" and not dry
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)  # tiny models: one thread is fastest, and steady on a busy machine
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> int:
    device, dry = args.device, args.dry_run
    report = Report(args.out / "gpu_check.json", meta(args, device))
    deadline = report.start + args.budget
    if not args.no_tests:
        files = args.tests if args.tests is not None else gpu_test_files()
        report.stage("tests", lambda: run_tests(files, min(args.tests_timeout, deadline - time.monotonic()),
                                                args.out / "pytest.log"))
    report.stage("kernels", lambda: kernel_stage(device, dry, args.reps))
    report.stage("engine", lambda: engine_stage(device, 16 if dry else 48))

    shapes, dtype = (TINY_SHAPES if dry else SHAPES), torch.bfloat16
    costs, passes = report.data.setdefault("costs", {}), {}
    for model in ("verifier", "drafter"):
        def measure(model=model):
            passes[model] = pc = PassCosts(random_model(shapes[model], device, dtype), args.context, device,
                                           args.warmup, args.reps)
            graph = series(pc.graph) if device.type == "cuda" else {"unavailable": "CUDA graphs need a CUDA device"}
            return {"shape": shapes[model], "dtype": str(dtype), "context": args.context,
                    "series": {"paged": series(pc.paged), "static": series(pc.static), "graph": graph}}
        report.stage(f"costs {model}", measure, into=costs, key=model)
    for model, pc in passes.items():  # last: compiling takes longest
        entry = costs[model]["series"]
        if not args.compile:
            entry["compile"] = {"unavailable": "skipped (a dry run, no CUDA device, or --no-compile)"}
            continue
        t0 = time.monotonic()
        entry["compile"] = {}
        pc.compiled(deadline - 30, entry["compile"], report.save)
        entry["compile"]["wall_s"] = round(time.monotonic() - t0, 1)
        report.save()
        print(f"[{time.monotonic() - report.start:6.1f} s] compile {model} done", flush=True)

    path = args.acceptance or newest_bench()
    if path is None:
        report.data["projection"] = {"note": "no CPU bench JSON with per-category acceptance under bench/results"}
    elif all("series" in costs.get(m, {}) for m in ("verifier", "drafter")):
        report.stage("projection", lambda: projection_stage(costs, load_acceptance(Path(path))))
    report.save()
    print(format_table(report.data))
    print(f"wrote {report.path}")
    r = report.data
    failed = r["errors"] or not r.get("engine", {}).get("ok") or not r.get("tests", {"ok": True}).get("ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
