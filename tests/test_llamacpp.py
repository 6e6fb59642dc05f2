"""llama.cpp runs what export-gguf writes, and `hybrid bench` runs llama.cpp (needs `bash setup.sh --llama-cpp`;
skipped without it). Tiny float32 models with a byte-level tokenizer, written as GGUF files here."""
import json

import pytest
import torch

from conftest import greedy_reference
from tiny_bytes import save_byte_model, save_diffusion_drafter, save_parallel_drafter
from hybrid.bench import ALL, BenchConfig, format_report, run_bench
from hybrid import bench_llamacpp
from hybrid.bench_llamacpp import LLAMACPP_METHODS, run_llamacpp_bench
from hybrid.errors import UserError
from hybrid.gguf_export import special_ids, verifier_config, write_causal_lm
from hybrid.llamacpp import LlamaServer, ServerConfig, find_tool
from hybrid.verifiers.hf import HFVerifier, encode_prompt, load_causal_lm


def _have_llama_cpp() -> bool:
    try:
        find_tool()
        return True
    except UserError:
        return False


pytestmark = [pytest.mark.llama_cpp,
              pytest.mark.skipif(not _have_llama_cpp(), reason="llama.cpp not installed (bash setup.sh --llama-cpp)")]
PROMPTS = [{"prompt": "hello hello hello", "category": "chat"},
           {"prompt": "def add(a, b):\n    return a + b\n\ndef add(a, b):", "category": "code", "chat": False}]


def write_gguf(folder, out):
    """A model folder as a float32 GGUF of its architecture (export-gguf's writer)."""
    model, tok = load_causal_lm(str(folder), torch.float32)
    write_causal_lm(model, tok, special_ids(tok, verifier_config(str(folder))), out, "f32")
    return out


@pytest.fixture(autouse=True)
def test_settings(tmp_path_factory, monkeypatch):
    """Drafter GGUFs the bench exports go to a test cache, not the user's; one thread per server: tiny models need
    no more, and two threads that sync by spinning crawl on cores another job keeps busy."""
    monkeypatch.setenv("HYBRID_HOME", str(tmp_path_factory.getbasetemp() / "hybrid-home"))
    monkeypatch.setattr(bench_llamacpp, "THREADS", 1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("llamacpp")
    v = save_byte_model(d / "verifier", "qwen2", seed=0)
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return {"dir": d, "verifier": v, "gguf": write_gguf(v, d / "verifier.gguf"), "prompts": prompts,
            "drafter": save_parallel_drafter(d / "parallel", v, block_size=4)}


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_llama_cpp_decodes_our_gguf_as_transformers_does(tmp_path, family):
    folder = save_byte_model(tmp_path / family, family, seed=3)
    gguf = write_gguf(folder, tmp_path / f"{family}.gguf")
    v = HFVerifier.from_pretrained(str(folder), torch.float32)
    ids = encode_prompt(v.tokenizer, "hello there", True)
    want = greedy_reference(v, ids, 16)
    with LlamaServer(ServerConfig(model=gguf, ctx_size=256, threads=1), tmp_path / "server.log") as s:
        s.wait_ready(120)
        c = s.complete(ids, 16)
        got = c.token_ids if c.complete_ids else s.ids_of(ids, 16)
    # llama.cpp stops at its end-of-generation tokens (<|im_end|>, and <|endoftext|> by its name)
    eog = {v.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert got == want[:len(got)] and (len(got) == 16 or got[-1] in eog)


def test_bench_backend_runs_every_method_losslessly_with_llama_cpps_counters(models):
    cfg = BenchConfig(verifier=str(models["gguf"]), assistant=str(models["gguf"]), drafter=str(models["drafter"]),
                      methods=LLAMACPP_METHODS, prompts=str(models["prompts"]), max_new_tokens=24, block_size=3)
    notes = []
    r = run_llamacpp_bench(cfg, progress=False, echo=notes.append)
    assert list(r.stats) == ["plain", "hybrid:draft-simple", "draft-model", "ngram"]
    assert all(cats[ALL].identical_to_plain for cats in r.stats.values()) and not r.mismatches
    assert any("no parallel drafting" in n for n in notes) and r.config["llama_cpp"]["hybrid_form"] == "draft-simple"
    # the assistant is the verifier itself: every draft token is accepted; llama.cpp drafts fewer than K tokens
    # only when fewer remain to be generated, and its per-position figure counts those steps as not accepting
    s = r.stats["draft-model"][ALL]
    assert s.acceptance_per_position[:2] == [1.0, 1.0] and s.acceptance_per_position[2] > 0.5
    runs = [x for x in r.runs if x.method == "draft-model"]
    assert all(len([c for c in x.committed_per_round if c < 4]) <= 1 for x in runs)
    assert all(sum(x.committed_per_round) == len(x.token_ids) - 1 for x in runs)
    for m, cats in r.stats.items():
        assert cats[ALL].new_tokens > 0 and 0 < cats[ALL].ttft_s <= cats[ALL].wall_s  # (tiny models: too fast for TPOT)
        assert (cats[ALL].mean_acceptance_length is None) == (m == "plain")
    json.dumps(r.to_json())
    report = format_report(r)
    assert "hybrid:draft-simple" in report and "identical to plain at temperature 0" in report
    assert "no parallel drafting mode" in report


def test_default_bench_puts_llama_cpps_rows_beside_ours(models):
    """One run, one schedule: our engine on the GGUF (dequantized) and llama.cpp on the same file; llama.cpp's
    rows are checked against llama.cpp's own plain."""
    cfg = BenchConfig(verifier=str(models["gguf"]), drafter=str(models["drafter"]), methods=("plain", "hybrid"),
                      prompts=str(models["prompts"]), max_new_tokens=12, block_size=3, llama_cpp="on",
                      dtype=torch.float32)
    r = run_bench(cfg, progress=False, echo=lambda s: None)
    assert list(r.stats) == ["plain", "hybrid", "llama.cpp/plain", "llama.cpp/hybrid:draft-simple"]
    assert r.stats["llama.cpp/plain"][ALL].identical_to_plain is None  # other weights than our plain's: not compared
    assert r.stats["llama.cpp/hybrid:draft-simple"][ALL].identical_to_plain
    assert r.stats["llama.cpp/plain"][ALL].speedup == 1.0
    report = format_report(r)
    assert "llama.cpp/plain decodes" in report and "llama.cpp's own plain decoding" in report
    assert "x llama.cpp's fastest (llama.cpp/" in report
    assert r.config["llama_cpp"]["verifier_arch"] == "qwen2"


def test_diffusion_drafter_runs_as_draft_dflash_where_the_target_allows(models, tmp_path):
    target = save_byte_model(tmp_path / "qwen3", "qwen3", seed=1, layers=4)
    gguf = write_gguf(target, tmp_path / "qwen3.gguf")
    drafter = save_diffusion_drafter(tmp_path / "dflash", target)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(PROMPTS[0]) + "\n")
    cfg = BenchConfig(verifier=str(gguf), drafter=str(drafter), methods=("plain", "hybrid"), prompts=str(prompts),
                      max_new_tokens=6, block_size=3, warmup_tokens=1)
    r = run_llamacpp_bench(cfg, progress=False, echo=lambda s: None)
    assert list(r.stats) == ["plain", "hybrid:draft-dflash"]
    assert r.stats["hybrid:draft-dflash"][ALL].identical_to_plain
    assert r.stats["hybrid:draft-dflash"][ALL].mean_acceptance_length >= 1.0
    # a qwen2 target: llama.cpp's qwen2 graph does not expose the layer inputs DFlash reads
    drafter2 = save_diffusion_drafter(tmp_path / "dflash2", models["verifier"])
    cfg = BenchConfig(**{**cfg.__dict__, "verifier": str(models["gguf"]), "drafter": str(drafter2)})
    r = run_llamacpp_bench(cfg, progress=False, echo=lambda s: None)
    assert list(r.stats) == ["plain"] and "qwen2" in r.skipped["hybrid"]
