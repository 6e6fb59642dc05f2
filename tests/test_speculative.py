"""The loop: greedy speculative output == plain greedy output, for every drafter and block size."""
import numpy as np
import pytest
import torch

from conftest import greedy_reference, make_verifier
from hybrid.drafters.causal import CausalDrafter
from hybrid.drafters.diffusion import DiffusionDrafter
from hybrid.drafters.ngram import NgramDrafter, find_suffix, lookup
from hybrid.engine import Engine, GenerationConfig

PROMPT = [5, 40, 41, 42, 9, 40, 41, 42, 9, 40]  # repeats, so the n-gram drafter finds matches
N = 40


def small_diffusion(v, **kw):
    torch.manual_seed(1)
    return DiffusionDrafter.for_verifier(
        v, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=64, **kw
    )


DRAFTERS = {
    "none": lambda v: None,
    "ngram": lambda v: NgramDrafter(),
    "causal-other": lambda v: CausalDrafter(make_verifier(v.config.model_type, seed=7)),
    "causal-same": lambda v: CausalDrafter(make_verifier(v.config.model_type, seed=0)),
    "diffusion": small_diffusion,
}


FAMILIES = ["qwen3", "qwen2", "llama", "mistral"]
CASES = [(f, d) for f in FAMILIES for d in ("none", "diffusion")] + [
    ("qwen3", d) for d in DRAFTERS if d not in ("none", "diffusion")
] + [("llama", "causal-other")]


@pytest.mark.parametrize("family, drafter", CASES)
def test_greedy_output_equals_plain_greedy(family, drafter):
    v = make_verifier(family)
    ref = greedy_reference(v, PROMPT, N)
    engine = Engine(v, DRAFTERS[drafter](v), num_pages=16, page_size=8)
    for block_size in (1, 4, 16):
        for steps in ((1, 3) if drafter == "diffusion" and block_size == 16 else (1,)):
            cfg = GenerationConfig(max_new_tokens=N, block_size=block_size, steps=steps, stop_on_eos=False)
            r = engine.generate(PROMPT, cfg)
            assert r.token_ids == ref, (drafter, block_size, steps)
            assert r.new_tokens == N and sum(r.acceptance_lengths) == N
            assert engine.pool.free_pages == engine.pool.num_pages  # everything freed


def test_engines_over_one_verifier_interleaved_round_by_round_each_match_plain():
    """Several engines over one verifier (the bench's variants), with pools of their own or one shared pool,
    their requests interleaved round by round: each decodes exactly what the verifier alone would."""
    v = make_verifier("qwen3")
    ref = greedy_reference(v, PROMPT, N)
    cfg = GenerationConfig(max_new_tokens=N, block_size=4, stop_on_eos=False)
    shared = Engine(v, small_diffusion(v), num_pages=16, page_size=8).pool
    engines = [Engine(v, None, num_pages=16, page_size=8), Engine(v, small_diffusion(v), num_pages=16, page_size=8),
               Engine(v, NgramDrafter(), pool=shared), Engine(v, small_diffusion(v), pool=shared)]
    streams = [e.stream(PROMPT, cfg) for e in engines]
    tokens = [[] for _ in engines]
    while streams:
        for i, s in enumerate(streams):
            if s is None:
                continue
            ev = next(s, None)
            if ev is None:
                streams[i] = None
            else:
                tokens[i] += ev.tokens
        if all(s is None for s in streams):
            break
    assert tokens == [ref] * len(engines)
    assert all(e.pool.free_pages == e.pool.num_pages for e in engines)


def test_drafter_equal_to_verifier_accepts_every_token():
    v = make_verifier("qwen3")
    engine = Engine(v, CausalDrafter(make_verifier("qwen3", seed=0)), num_pages=16, page_size=8)
    r = engine.generate(PROMPT, GenerationConfig(max_new_tokens=40, block_size=4, stop_on_eos=False, lookup=0))
    assert r.acceptance_lengths == [5] * 8
    assert r.accepted_per_position == [1.0] * 4


def test_ngram_drafter_accepts_on_repetitive_text():
    v = make_verifier("qwen3")
    assert NgramDrafter().lookup([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]
    assert NgramDrafter().lookup([1, 2, 3], 3) == []
    assert NgramDrafter().lookup([5, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]  # a loop is continued past the context's end


def brute_force_lookup(tokens, block_size, min_ngram, max_ngram):
    """Longest suffix first, then its latest earlier occurrence: what followed it, continued by copying
    the copy where it runs into the end of the context."""
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tokens[len(tokens) - n :]:
                text = list(tokens)
                for i in range(block_size):
                    text.append(text[start + n + i])
                return text[len(tokens):]
    return []


def test_lookup_equals_brute_force_search():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        tokens = rng.integers(0, rng.choice([2, 3, 5]) + 1, size=rng.integers(0, 30)).tolist()
        lo = int(rng.integers(1, 5))
        hi, b = int(rng.integers(lo, 6)), int(rng.integers(1, 7))
        assert lookup(tokens, b, lo, hi) == brute_force_lookup(tokens, b, lo, hi), (tokens, b, lo, hi)
    assert find_suffix([7, 1, 2, 3, 1, 2, 3], 2) == (3, 3)  # the longest suffix (1 2 3), its latest occurrence
    assert find_suffix([1, 2, 9, 2], 2) == (-1, 0)  # only a 1-token match: below min_ngram


@pytest.mark.parametrize("block_size", [4, "auto"])
def test_prompt_lookup_is_lossless_and_drafts_repeated_text(block_size):
    v = make_verifier("qwen3", seed=3)  # its greedy text ends repeating one token for 20+ positions
    n = 100
    ref = greedy_reference(v, PROMPT, n)
    engine = Engine(v, small_diffusion(v), num_pages=32, page_size=8)
    observe = engine.costs.observe  # synthetic costs (a verifier pass costs little more per token): deterministic
    engine.costs.observe = lambda b, t, d, vs, drafted=None: observe(b, t, 0.001 * t * (b + 1), 0.05 + 0.001 * b, drafted)
    on = engine.generate(PROMPT, GenerationConfig(max_new_tokens=n, block_size=block_size, stop_on_eos=False))
    off = engine.generate(PROMPT, GenerationConfig(max_new_tokens=n, block_size=block_size, stop_on_eos=False, lookup=0))
    assert on.token_ids == ref and off.token_ids == ref
    assert on.lookup_rounds > 0 and off.lookup_rounds == 0
    # copying the repetition is accepted where an untrained drafter is not
    assert on.rounds < off.rounds - 5
    assert engine.pool.free_pages == engine.pool.num_pages


def test_eos_stops_generation_and_is_included():
    v = make_verifier("qwen3")
    ref = greedy_reference(v, PROMPT, N)
    v.eos_token_ids = {ref[5]}
    first = ref.index(ref[5])
    engine = Engine(v, CausalDrafter(make_verifier("qwen3", seed=0)), num_pages=16, page_size=8)
    r = engine.generate(PROMPT, GenerationConfig(max_new_tokens=N, block_size=4))
    assert r.token_ids == ref[: first + 1] and r.finish_reason == "eos"


def test_max_new_tokens_is_exact_with_large_blocks():
    v = make_verifier("qwen3")
    engine = Engine(v, CausalDrafter(make_verifier("qwen3", seed=0)), num_pages=16, page_size=8)
    for n in (1, 2, 7):
        r = engine.generate(PROMPT, GenerationConfig(max_new_tokens=n, block_size=16, stop_on_eos=False))
        assert r.new_tokens == n and r.finish_reason == "length"


def test_context_window_ends_generation_with_length():
    v = make_verifier("qwen3", max_position_embeddings=20)
    engine = Engine(v, NgramDrafter(), num_pages=16, page_size=8)
    r = engine.generate(PROMPT, GenerationConfig(max_new_tokens=50, block_size=4, stop_on_eos=False))
    assert r.new_tokens == 10 and r.finish_reason == "length"


def test_stop_strings_cut_text_and_stream_matches_final_text(tok):
    v = make_verifier("qwen3")
    engine = Engine(v, NgramDrafter(), num_pages=16, page_size=8)
    full = engine.generate("abc", GenerationConfig(max_new_tokens=30, stop_on_eos=False))
    stop = full.text[10:12]
    streamed = []
    r = engine.generate("abc", GenerationConfig(max_new_tokens=30, stop=[stop], stop_on_eos=False), on_text=streamed.append)
    assert r.text == full.text[: full.text.index(stop)] and r.finish_reason == "stop"
    assert "".join(streamed) == r.text


def test_stop_string_cuts_token_ids_where_plain_decoding_stops():
    """A round that commits several tokens and completes a stop string keeps only the tokens up to the one that
    completed it: token ids, counts and text are plain decoding's."""
    v = make_verifier("qwen3")
    plain, spec = Engine(v, None, num_pages=16, page_size=8), Engine(v, CausalDrafter(make_verifier("qwen3", seed=0)),
                                                                     num_pages=16, page_size=8)
    full = plain.generate(PROMPT, GenerationConfig(max_new_tokens=30, stop_on_eos=False))
    for at in (3, 9, 14):
        stop = v.tokenizer.decode(full.token_ids[at : at + 2])  # completed by token at + 1, mid-round for spec
        cfg = GenerationConfig(max_new_tokens=30, block_size=8, stop=[stop], stop_on_eos=False, lookup=0)
        a, b = plain.generate(PROMPT, cfg), spec.generate(PROMPT, cfg)
        assert b.rounds < a.rounds  # the speculative rounds commit several tokens each
        assert b.token_ids == a.token_ids and b.new_tokens == a.new_tokens == len(a.token_ids)
        assert b.text == a.text and a.finish_reason == b.finish_reason == "stop"
        assert a.token_ids == full.token_ids[: len(a.token_ids)] and len(a.token_ids) <= at + 2


def test_same_seed_reproduces_sampled_output():
    v = make_verifier("qwen3")
    engine = Engine(v, small_diffusion(v), num_pages=16, page_size=8)
    cfg = GenerationConfig(max_new_tokens=30, block_size=4, temperature=0.9, top_p=0.95, seed=3, stop_on_eos=False)
    a, b = engine.generate(PROMPT, cfg), engine.generate(PROMPT, cfg)
    c = engine.generate(PROMPT, GenerationConfig(**{**cfg.__dict__, "seed": 4}))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def generate_auto(drafter_seed: int, draft_s, verify_s):
    """Greedy decoding with block size auto, the coordinator fed synthetic costs draft_s(b, t) and
    verify_s(b) (machine-independent) -> (result, plain greedy reference)."""
    v = make_verifier("qwen3")
    ref = greedy_reference(v, PROMPT, N)
    engine = Engine(v, CausalDrafter(make_verifier("qwen3", seed=drafter_seed)), num_pages=16, page_size=8)
    observe = engine.costs.observe
    engine.costs.observe = lambda b, t, d, vs, drafted=None: observe(b, t, draft_s(drafted or b, t), verify_s(b), drafted)
    return engine.generate(PROMPT, GenerationConfig(max_new_tokens=N, stop_on_eos=False)), ref


def test_auto_block_size_is_lossless_and_reports_the_sizes_it_used():
    # a perfect drafter (the verifier itself), a cheap draft and a verifier pass that costs little more per
    # token, so the coordinator's choice depends on acceptance alone
    r, ref = generate_auto(0, lambda b, t: 0.001 * t * (b + 1), lambda b: 0.05 + 0.001 * b)
    assert r.token_ids == ref
    assert sum(r.block_sizes.values()) + r.lookup_rounds == r.rounds and max(r.block_sizes) > 4  # perfect drafter: grows the block


def test_auto_decodes_plainly_when_no_block_pays():
    """A drafter that is almost never right, and a verifier whose pass costs much more per extra token: the
    coordinator's plain rounds (block size 0) take over, and the output is still plain greedy decoding."""
    r, ref = generate_auto(5, lambda b, t: 0.01 * t * (b + 1), lambda b: 0.05 + 0.02 * b)
    assert r.token_ids == ref
    assert r.block_sizes.get(0, 0) > r.rounds / 2, r.block_sizes
