"""`hybrid bench --backend llama.cpp` without llama.cpp: rounds from llama.cpp's counters, commits from streamed
chunks, finding the binary, and the one-line errors a user can cause."""
import stat
import sys

import pytest

from hybrid.bench import BenchConfig, parse_methods, run_bench
from hybrid.bench_llamacpp import commits, counter_delta, gguf_model, rounds_from_counters
from hybrid.cli import main
from hybrid.errors import UserError
from hybrid.llamacpp import ENV_SERVER, ServerConfig, find_tool


def test_rounds_are_rebuilt_exactly_from_the_per_position_counts():
    # 11 drafted steps of K=2: position 1 accepted in all 11, position 2 in 9 -> 2 steps accepted 1, 9 accepted 2
    delta = {"steps": 11, "drafted": 21, "accepted": 20, "per_position": [11, 9]}
    rounds, committed = rounds_from_counters(delta, 2, new_tokens=32)
    assert sorted(rounds) == [(2, 1)] * 2 + [(2, 2)] * 9
    assert sum(committed) == 31  # every token after the first
    # steps with no draft (ngram found no match) committed the rest, one token each
    rounds, committed = rounds_from_counters({"steps": 3, "drafted": 9, "accepted": 4, "per_position": [2, 1, 1]}, 3, 20)
    assert sorted(rounds[:3]) == [(3, 0), (3, 1), (3, 3)]
    assert rounds[3:] == [(0, 0)] * 12 and committed == [1, 2, 4] + [1] * 12


def test_counter_delta_is_per_request():
    a = {"steps": 4, "drafted": 8, "accepted": 5, "per_position": [3, 2]}
    b = {"steps": 9, "drafted": 18, "accepted": 11, "per_position": [7, 4, 0]}
    assert counter_delta(a, b) == {"steps": 5, "drafted": 10, "accepted": 6, "per_position": [4, 2, 0]}


def test_chunks_of_one_verify_step_are_one_commit():
    arrivals = [(1.0, 1), (1.5, 1), (1.5002, 1), (1.5003, 1), (2.0, 1)]
    assert commits(arrivals) == [(1.0, 1), (1.5003, 3), (2.0, 1)]


def test_server_arguments():
    a = ServerConfig(model="v.gguf", spec_type="draft-simple", draft_model="d.gguf", draft_max=3).args(8080)
    assert a[a.index("--spec-type") + 1] == "draft-simple" and a[a.index("--spec-draft-n-max") + 1] == "3"
    assert "--metrics" in a and a[a.index("-np") + 1] == "1"
    a = ServerConfig(model="v.gguf", spec_type="ngram-simple", draft_max=4, ngram_size=3).args(1)
    assert a[a.index("--spec-ngram-simple-size-m") + 1] == "4" and a[a.index("--spec-ngram-simple-size-n") + 1] == "3"
    assert "--spec-draft-n-max" not in a


def test_the_binary_is_found_by_env_then_venv_else_a_hint(tmp_path, monkeypatch):
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv(ENV_SERVER, str(fake))
    assert find_tool() == fake
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))  # a venv and a PATH without llama.cpp
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(UserError, match="llama-quantize is not installed: run bash setup.sh --llama-cpp"):
        find_tool("llama-quantize")
    monkeypatch.setenv(ENV_SERVER, str(tmp_path / "nope"))
    with pytest.raises(UserError, match="setup.sh --llama-cpp"):
        find_tool()


def test_llama_cpp_methods_parse():
    assert parse_methods(None, "llama.cpp") == ("plain", "hybrid", "draft-model", "ngram")
    with pytest.raises(UserError, match="hf-assisted"):
        parse_methods("hf-assisted", "llama.cpp")


def test_models_must_be_gguf_files(tmp_path):
    with pytest.raises(UserError, match="GGUF"):
        gguf_model(str(tmp_path), "verifier")
    with pytest.raises(UserError, match="not found"):
        gguf_model(str(tmp_path / "x.gguf"), "assistant")


def test_without_llama_cpp_the_backend_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_SERVER, str(tmp_path / "nope"))
    with pytest.raises(SystemExit) as e:
        main(["bench", "--backend", "llama.cpp", "--verifier", str(tmp_path / "v.gguf")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "setup.sh --llama-cpp" in err and len(err.strip().splitlines()) == 1


def test_default_bench_notes_missing_llama_cpp_and_runs_on(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_SERVER, str(tmp_path / "nope"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello", "category": "chat"}\n')
    notes = []
    cfg = BenchConfig(verifier=str(model_dir), methods=("plain",), prompts=str(prompts), max_new_tokens=4,
                      block_size=2, llama_cpp="auto")
    result = run_bench(cfg, progress=False, echo=notes.append)
    assert list(result.stats) == ["plain"] and "setup.sh --llama-cpp" in result.skipped["llama.cpp"]
    assert any("no llama.cpp rows" in n for n in notes)
    with pytest.raises(UserError, match="setup.sh --llama-cpp"):
        run_bench(BenchConfig(**{**cfg.__dict__, "llama_cpp": "on"}), progress=False, echo=notes.append)
