"""`hybrid bench` on tiny models: every method lossless at temperature 0, figures present, one JSON line last."""
import json

import pytest
import torch

from conftest import save_tiny
from hybrid.bench import (ALL, DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPTS, BenchConfig, first_difference, load_prompts,
                          parse_methods, run_bench)
from hybrid.cli import main
from hybrid.drafters.diffusion import DiffusionDrafter
from hybrid.errors import UserError
from hybrid.verifiers.hf import HFVerifier

PROMPTS = [
    {"prompt": "abc abc abc abc", "category": "code", "chat": False},
    {"prompt": "hello there", "category": "chat"},
    {"prompt": "one two one two", "category": "chat"},
]
FIGURES = ("tokens_per_s", "speedup", "mean_acceptance_length", "acceptance_per_position", "ttft_s", "tpot_ms_p50",
           "tpot_ms_p90", "tpot_ms_p99", "draft_share", "verify_share", "identical_to_plain")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    verifier = save_tiny(root / "verifier", "qwen3", seed=0)
    assistant = save_tiny(root / "assistant", "qwen3", seed=1, layers=2)  # same tokenizer, other weights
    torch.manual_seed(0)
    drafter = root / "drafter"
    DiffusionDrafter.for_verifier(HFVerifier.from_pretrained(str(verifier)), num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, intermediate_size=64, block_size=8).save(drafter)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return verifier, assistant, drafter, prompts


def run_cli(capsys, *args):
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_cli_all_methods_lossless_json_last(models, capsys):
    verifier, assistant, drafter, prompts = models
    code, out, err = run_cli(
        capsys, "bench", "--verifier", str(verifier), "--drafter", str(drafter), "--assistant", str(assistant),
        "--prompts", str(prompts), "--max-new-tokens", "12", "--block-size", "4", "--json",
        "--methods", "plain,hybrid,ngram,hf-assisted,hf-prompt-lookup",
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    methods = result["methods"]
    assert list(methods) == ["plain", "hybrid", "ngram", "hf-assisted", "hf-prompt-lookup"]
    assert result["categories"] == ["code", "chat"]
    config = result["config"]  # the machine, as far as it decides what a verify pass over several rows costs
    assert config["torch_threads"] >= 1 and config["cpu_capability"] and isinstance(config["cpu_matmul_flags"], list)
    for m, cats in methods.items():
        assert set(cats) == {"code", "chat", ALL}
        for c, s in cats.items():
            for key in FIGURES:
                assert key in s, (m, c, key)
            assert s["identical_to_plain"] is True, (m, c)
            assert s["tokens_per_s"] > 0 and s["new_tokens"] > 0
        assert result["identical_to_plain"][m] is True
    for c in ("code", "chat", ALL):
        assert methods["plain"][c]["speedup"] == 1.0
        assert methods["plain"][c]["mean_acceptance_length"] == 1.0
    assert methods["plain"]["chat"]["prompts"] == 2
    assert methods["ngram"][ALL]["draft_share"] is not None and methods["hybrid"][ALL]["acceptance_per_position"]
    # transformers' assisted decoding: acceptance from the streamer's chunks and the verifier's input lengths
    for m in ("hf-assisted", "hf-prompt-lookup"):
        assert methods[m][ALL]["mean_acceptance_length"] >= 1.0
        assert methods[m][ALL]["acceptance_per_position"] is not None
    assert methods["hf-prompt-lookup"][ALL]["draft_share"] is None  # lookup time is not measured separately
    assert result["mismatches"] == []
    text = "\n".join(lines[:-1])
    assert "overall" in text and "code (1 prompt)" in text and "chat (2 prompts)" in text
    assert "identical to plain at temperature 0: hybrid, ngram, hf-assisted, hf-prompt-lookup" in text


def test_bench_function_block_size_auto_tokens_equal_plain_and_limit(models):
    verifier, assistant, _, prompts = models
    r = run_bench(BenchConfig(verifier=str(verifier), assistant=str(assistant), prompts=str(prompts), limit=1,
                              methods=("plain", "ngram", "hf-prompt-lookup"), max_new_tokens=10, block_size="auto"),
                  progress=False)
    assert r.categories == ["code", "chat"] and r.stats["plain"][ALL].prompts == 2
    plain = {x.index: x.token_ids for x in r.runs if x.method == "plain"}
    for x in r.runs:
        assert x.token_ids == plain[x.index] and len(x.token_ids) <= 10
        assert len(x.tpot_s) <= len(x.token_ids) - 1
    assert r.skipped == {} and r.mismatches == []


def test_sampling_not_checked_and_hybrid_skipped_without_drafter(models, capsys):
    verifier, _, _, prompts = models
    code, out, err = run_cli(capsys, "bench", "--verifier", str(verifier), "--prompts", str(prompts), "--limit", "1",
                             "--methods", "plain,hybrid,ngram", "--max-new-tokens", "6", "--temperature", "0.8", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["identical_to_plain"] == {"plain": None, "ngram": None}
    assert "not checked" in out
    # no --drafter and none shipped for this verifier: hybrid is skipped with a note, the rest runs
    assert "hybrid" in result["skipped"] and "skipping hybrid" in err


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "prompts file not found"),
        ('{"prompt": "hi", "category": "chat"}\n{"prompt": "oops"\n', ":2: not valid JSON"),
        ('{"prompt": "", "category": "chat"}\n', '"prompt" must be a non-empty string'),
        ('{"prompt": "hi"}\n', '"category" must be'),
        ('{"prompt": "hi", "category": "chat", "chat": "yes"}\n', '"chat" must be true or false'),
        ("\n\n", "has no prompts"),
    ],
)
def test_bad_prompts_file_is_one_line_error(models, tmp_path, capsys, content, message):
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    code, out, err = run_cli(capsys, "bench", "--verifier", str(models[0]), "--prompts", str(path))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_bad_method_and_figures_are_one_line_errors(models, capsys):
    verifier, _, _, prompts = models
    for args, message in (
        (["--methods", "plain,medusa"], "unknown method 'medusa'"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--block-size", "0"], "block size must be"),
        (["--limit", "0"], "--limit must be >= 1"),
    ):
        code, out, err = run_cli(capsys, "bench", "--verifier", str(verifier), "--prompts", str(prompts), *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_helpers(capsys):
    _, out, _ = run_cli(capsys, "bench", "--help")
    assert f"default: {DEFAULT_MAX_NEW_TOKENS}," in " ".join(out.split())  # the help states the default
    assert parse_methods("hf-assisted, plain") == ("plain", "hf-assisted")
    with pytest.raises(UserError):
        parse_methods(" , ")
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_default_prompt_set_has_every_category():
    prompts = load_prompts(DEFAULT_PROMPTS)
    cats = {p.category for p in prompts}
    assert cats == {"code", "chat", "math", "summarisation", "translation"}
    assert all(sum(p.category == c for p in prompts) >= 4 for c in cats)
    assert any(not p.chat for p in prompts)  # raw code completion


def test_plot_without_matplotlib_is_one_line_error(models, tmp_path, capsys):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("matplotlib is installed")
    verifier, _, _, prompts = models
    code, out, err = run_cli(capsys, "bench", "--verifier", str(verifier), "--prompts", str(prompts),
                             "--plot", str(tmp_path / "x.png"))
    assert code == 2 and "pip install matplotlib" in err and len(err.strip().splitlines()) == 1


def test_block_sizes_compare_fixed_and_auto_in_one_run(models, capsys):
    from hybrid.bench import parse_block_sizes, variant_settings

    assert parse_block_sizes("2, 4,auto,4,auto-notrim") == (2, 4, "auto", "auto-notrim")
    assert parse_block_sizes("auto-nolookup,4-nolookup,auto-notrim-nolookup") == (
        "auto-nolookup", "4-nolookup", "auto-notrim-nolookup")
    for bad in ("2,zero", "4-notrim", "auto-lookup", "0"):
        with pytest.raises(UserError):
            parse_block_sizes(bad)
    assert parse_block_sizes("auto-tree16,4-tree0-nolookup") == ("auto-tree16", "4-tree0-nolookup")
    assert variant_settings("4-nolookup", 2) == {"block_size": 4, "trim": True, "lookup": 0, "tree": "auto"}
    assert variant_settings("auto-notrim", 2, 8) == {"block_size": "auto", "trim": False, "lookup": 2, "tree": 8}
    assert variant_settings("auto-tree16", 2) == {"block_size": "auto", "trim": True, "lookup": 2, "tree": 16}
    assert variant_settings("4-tree0-nolookup", 2, 8) == {"block_size": 4, "trim": True, "lookup": 0, "tree": 0}
    verifier, assistant, drafter, prompts = models
    code, out, err = run_cli(capsys, "bench", "--verifier", str(verifier), "--drafter", str(drafter), "--prompts",
                             str(prompts), "--max-new-tokens", "10", "--methods", "plain,hybrid",
                             "--block-sizes", "1,4,auto,auto-notrim,auto-nolookup,auto-tree0,4-tree8", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert list(result["methods"]) == ["plain", "hybrid@1", "hybrid@4", "hybrid@auto", "hybrid@auto-notrim",
                                       "hybrid@auto-nolookup", "hybrid@auto-tree0", "hybrid@4-tree8"]
    assert result["methods"]["hybrid@auto-nolookup"][ALL]["lookup_share"] == 0
    assert result["methods"]["hybrid@4"][ALL]["tree_sizes"] is None  # tree auto: chains at a fixed size
    assert result["methods"]["hybrid@auto-tree0"][ALL]["tree_sizes"] is None  # chains asked for
    assert set(result["methods"]["hybrid@4-tree8"][ALL]["tree_sizes"]) == {"8"}  # a fixed size verifies whole trees
    assert "hybrid@4-tree8 rounds by block size " in out and "; draft trees by tokens verified 8:" in out
    assert all(result["identical_to_plain"].values())
    assert set(result["methods"]["hybrid@4"][ALL]["block_sizes"]) <= {"4", "3", "2", "1", "0"}
    assert set(result["methods"]["hybrid@1"][ALL]["block_sizes"]) <= {"1", "0"}  # 0: the last token of a prompt
    assert set(result["methods"]["hybrid@4"][ALL]["steps"]) <= {"1", "0"}
    assert sum(result["methods"]["hybrid@auto"][ALL]["steps"].values()) > 0
    assert "hybrid@auto rounds by block size " in out and "; by denoising steps " in out
    assert "hybrid@auto / best fixed size: code " in out and "hybrid@auto-nolookup / each fixed size overall: @1 " in out
    assert "best fixed size per category in hindsight (code @" in out


def test_auto_lines_compare_with_best_and_each_fixed_size():
    from hybrid.bench import BenchResult, MethodStats, auto_lines

    def stats(tps):
        return MethodStats(1, 10, 1.0, tps, None, None, None, 0.1, None, None, None, None, None, None, None)

    tps = {"plain": (1, 1, 1), "hybrid@2": (4, 2, 3), "hybrid@4": (2, 4, 3.3), "hybrid@auto": (4, 3, 3.63)}
    result = BenchResult({}, ["code", "chat"], {m: dict(zip(["code", "chat", ALL], map(stats, v))) for m, v in tps.items()},
                         {}, [], [])
    assert auto_lines(result) == ["hybrid@auto / best fixed size: code 1.00 (@2), chat 0.75 (@4), all 1.10 (@4)",
                                  "hybrid@auto / each fixed size overall: @2 1.21, @4 1.10", ""]
    del result.stats["hybrid@2"], result.stats["hybrid@4"]
    assert auto_lines(result) == []


def test_hindsight_lines_pick_each_categorys_fastest_fixed_size_and_survive_a_saved_json(tmp_path):
    from hybrid.bench import BenchResult, MethodStats, hindsight_lines, load_result

    def stats(tokens, wall):
        return MethodStats(1, tokens, wall, tokens / wall, None, None, None, 0.1, None, None, None, None, None,
                           None, None)

    # code: @2 takes 10 s, @4 30 s; chat: @2 30 s, @4 15 s (20 tokens each). Best single size: @2, 40 tokens in
    # 40 s; picking @2 for code and @4 for chat: 40 tokens in 25 s, 1.6x.
    walls = {"plain": (40, 40), "hybrid@2": (10, 30), "hybrid@4": (30, 15), "hybrid@auto": (12, 18)}
    result = BenchResult({"temperature": 0, "max_new_tokens": 20}, ["code", "chat"],
                         {m: {"code": stats(20, w[0]), "chat": stats(20, w[1]), ALL: stats(40, sum(w))}
                          for m, w in walls.items()})
    expected = ["best fixed size per category in hindsight (code @2, chat @4): 1.60x the best single fixed size "
                "(@2) overall", ""]
    assert hindsight_lines(result) == expected
    path = tmp_path / "run.json"
    path.write_text("progress\n" + json.dumps(result.to_json()) + "\n")
    assert hindsight_lines(load_result(path)) == expected
    del result.stats["hybrid@4"]
    assert hindsight_lines(result) == []


@pytest.mark.parametrize("order", ["interleaved", "method"])
def test_order_interleaves_methods_per_prompt_over_one_pool(models, monkeypatch, order):
    import hybrid.bench as bench

    verifier, _, drafter, prompts = models
    calls = []
    run_engine = bench.run_engine

    def spy(engine, ids, cfg, method, category, index):
        calls.append((method, cfg.max_new_tokens))
        return run_engine(engine, ids, cfg, method, category, index)

    monkeypatch.setattr(bench, "run_engine", spy)
    r = run_bench(BenchConfig(verifier=str(verifier), drafter=str(drafter), prompts=str(prompts), max_new_tokens=10,
                              methods=("plain", "hybrid", "hf-prompt-lookup"), block_sizes=(1, "auto"), order=order),
                  progress=False)
    labels = ["plain", "hybrid@1", "hybrid@auto"]
    timed = [m for m, n in calls if n == 10]
    assert [m for m, n in calls if n != 10] == labels  # one warm-up each, first
    assert timed == (labels * 3 if order == "interleaved" else [m for m in labels for _ in range(3)])
    # results come back method-major, prompts in file order, and every method matches plain
    assert [(x.method, x.index) for x in r.runs] == [(m, i) for m in labels + ["hf-prompt-lookup"] for i in range(3)]
    assert r.mismatches == [] and all(s[ALL].identical_to_plain for s in r.stats.values())


def test_parallel_drafter_runs_beside_the_others_when_given(models, tmp_path, capsys):
    """`--parallel-drafter PATH` adds the `parallel` method to the default run; asked for without one, it is
    skipped with a note."""
    from dataclasses import asdict

    from hybrid.drafters.parallel import CONFIG_FILE, ParallelConfig

    verifier, assistant, drafter, prompts = models
    folder = save_tiny(tmp_path / "parallel", "qwen3", seed=0)  # a whole model: the verifier's own weights
    (folder / CONFIG_FILE).write_text(json.dumps(asdict(ParallelConfig(base="", mask_token_id=3, block_size=8))))
    code, out, err = run_cli(capsys, "bench", "--verifier", str(verifier), "--prompts", str(prompts), "--limit", "1",
                             "--drafter", str(drafter), "--assistant", str(assistant), "--parallel-drafter", str(folder),
                             "--max-new-tokens", "8", "--lookup", "0", "--block-size", "4", "--json")  # fixed: no timing
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["identical_to_plain"]["parallel"] is True and "parallel" in result["methods"]
    assert result["methods"]["parallel"][ALL]["acceptance_per_position"][0] == 1.0  # its own next token: the verifier's
    assert parse_methods("parallel,plain") == ("plain", "parallel")
    r = run_bench(BenchConfig(verifier=str(verifier), prompts=str(prompts), limit=1, methods=("plain", "parallel"),
                              max_new_tokens=4), progress=False, echo=lambda *_: None)
    assert "parallel" in r.skipped


def test_concurrency_bench_runs_each_level_batched_and_lossless(models, capsys):
    """`--concurrency 1,3`: plain and our drafter at one and three clients at once; every figure per level, every
    output equal to plain's, the coordinator's choices reported (rows per pass grow with the clients)."""
    verifier, _, drafter, prompts = models
    code, out, err = run_cli(capsys, "bench", "--concurrency", "1,3", "--verifier", str(verifier), "--drafter",
                             str(drafter), "--prompts", str(prompts), "--max-new-tokens", "10", "--block-size", "3",
                             "--methods", "plain,hybrid", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    stats = {(s["method"], s["clients"]): s for s in result["stats"]}
    assert set(stats) == {("plain", 1), ("hybrid", 1), ("plain", 3), ("hybrid", 3)}
    for (m, c), s in stats.items():
        assert s["tokens_per_s_total"] > 0 and s["tokens_per_s_per_client"] > 0 and s["ttft_p50_s"] > 0
        assert s["tpot_p50_s"] is not None and s["mean_pass_rows"] >= 1
        if m == "hybrid":
            assert s["identical_to_plain"] is True and s["mean_block_size"] > 0
    assert stats[("plain", 3)]["mean_pass_rows"] > stats[("plain", 1)]["mean_pass_rows"]  # one pass for all
    runs = [r for r in result["runs"] if r["clients"] == 3]
    assert len(runs) == 6 and all(len(r["token_ids"]) == 10 for r in runs)
    assert "vs 1 client" in out and "rows/pass" in out
    code, _, err = run_cli(capsys, "bench", "--concurrency", "1,x", "--verifier", str(verifier))
    assert code == 2 and "--concurrency" in err
    code, _, err = run_cli(capsys, "bench", "--concurrency", "2", "--methods", "plain,turbo", "--verifier", str(verifier))
    assert code == 2 and "turbo" in err
