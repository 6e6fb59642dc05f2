"""The block-diffusion drafter: vLLM-compatible folder, denoising schedule, vocabulary check."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_verifier
from hybrid.drafters.base import Context
from hybrid.drafters.diffusion import DiffusionDrafter, unmask_schedule
from hybrid.errors import UserError
from hybrid.pages import PagePool


def drafter_for(v, **kw):
    torch.manual_seed(0)
    return DiffusionDrafter.for_verifier(v, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, intermediate_size=64, block_size=8, **kw)


def test_unmask_schedule():
    assert unmask_schedule(8, 1) == [8]
    assert unmask_schedule(8, 3) == [3, 3, 2]
    assert unmask_schedule(2, 5) == [1, 1]


def test_saved_folder_is_a_vllm_dflash_checkpoint_and_reloads(tmp_path):
    v = make_verifier("qwen3")
    d = drafter_for(v)
    d.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["model_type"] == "qwen3"
    assert cfg["dflash_config"]["mask_token_id"] == d.config.mask_token_id
    assert cfg["dflash_config"]["target_layer_ids"] == sorted(d.config.target_layer_ids)
    assert cfg["vocab_size"] == v.vocab_size and cfg["hidden_size"] == v.hidden_size and "n_predict" not in cfg
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert "fc.weight" in names and "layers.1.self_attn.k_norm.weight" in names
    assert not any(n.startswith("model.") or "embed_tokens" in n or "lm_head" in n for n in names)
    d2 = DiffusionDrafter.load(tmp_path, v)
    for (k, a), (_, b) in zip(d.model.state_dict().items(), d2.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_refuses_a_verifier_with_another_vocabulary(tmp_path):
    drafter_for(make_verifier("qwen3")).save(tmp_path)
    with pytest.raises(UserError, match="different vocabularies"):
        DiffusionDrafter.load(tmp_path, make_verifier("qwen3", vocab=130))


def run_draft(v, d, tokens, block_size, steps):
    pool = PagePool(16, 4)
    v.attach(pool)
    d.attach(pool, v)
    seq = pool.new_sequence()
    ctx = Context(tokens, seq)
    d.observe(ctx, v.prefill(seq, torch.tensor(tokens[:-1]), d.capture_layers), 0)
    from hybrid.acceptance import SamplingParams

    return d.propose(ctx, block_size, steps, (SamplingParams(), None))


@torch.no_grad()
def direct_block_logits(v, d, tokens, n):
    """The DFlash function computed directly from the verifier's hidden states: [n, V] block logits."""
    hs = v.model(torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states
    h = torch.cat([hs[i + 1][0] for i in d.capture_layers], -1)  # outputs of the chosen layers
    ctx_kv = d.model.context_kv(d.model.context(h), torch.arange(len(tokens) - 1))
    ids = torch.tensor([tokens[-1]] + [d.config.mask_token_id] * n)
    out = d.model(v.model.get_input_embeddings()(ids), torch.arange(len(tokens) - 1, len(tokens) + n), ctx_kv)
    return v.head(out[1:])


def test_one_step_draft_equals_a_direct_full_block_forward():
    """T=1 through the pages == the DFlash function computed directly from the verifier's hidden states."""
    v = make_verifier("qwen3")
    d = drafter_for(v)
    tokens = [5, 9, 14, 20, 33, 7, 8]
    draft = run_draft(v, d, tokens, 6, 1)
    assert draft.tokens.tolist() == direct_block_logits(v, d, tokens, 6).argmax(-1).tolist()


def test_multi_step_commits_confident_positions_and_fills_the_block():
    v = make_verifier("qwen3")
    d = drafter_for(v)
    for steps in (1, 2, 4, 8):
        draft = run_draft(v, d, [5, 9, 14, 20], 8, steps)
        assert draft.tokens.shape == (8,) and d.config.mask_token_id not in draft.tokens.tolist()


def test_confidence_is_each_tokens_probability_when_committed():
    """Draft.conf[i] is the drafter's probability of token i at the step that committed it: at T=1 the
    softmax max of each position (what the coordinator's trimming reads)."""
    v = make_verifier("qwen3")
    d = drafter_for(v)
    tokens = [5, 9, 14, 20, 33, 7, 8]
    draft = run_draft(v, d, tokens, 6, 1)
    probs = torch.softmax(direct_block_logits(v, d, tokens, 6).float(), -1)  # [6, V]
    torch.testing.assert_close(draft.conf, probs.max(-1).values, atol=1e-5, rtol=1e-4)
    many = run_draft(v, d, tokens, 6, 3)
    assert many.conf.shape == (6,) and ((many.conf > 0) & (many.conf <= 1)).all()
    assert draft.prefix(2).tokens.tolist() == draft.tokens[:2].tolist() and draft.prefix(2).conf.shape == (2,)


def test_auto_with_trimming_is_lossless_and_verifies_less_than_it_drafts():
    """Block size auto with the diffusion drafter: rounds draft a block and verify a prefix chosen by the
    drafter's confidence; greedy output is still plain greedy decoding, sampled decoding runs."""
    from conftest import greedy_reference

    from hybrid.engine import Engine, GenerationConfig

    v = make_verifier("qwen3")
    engine = Engine(v, drafter_for(v), num_pages=32, page_size=8)
    prompt = [5, 9, 14, 20, 33]
    trims = []  # (drafted, verified) per round
    for seed in range(3):
        for tree in (0, "auto"):  # chains and draft trees (the default with block size auto)
            sched = engine.schedule(GenerationConfig(seed=seed))
            real = sched.trim
            sched.trim = lambda *a, real=real, tree=tree: trims.append((tree, len(a[0]), real(*a))) or trims[-1][2]
            r = engine.generate(prompt, GenerationConfig(max_new_tokens=24, stop_on_eos=False, seed=seed, tree=tree),
                                schedule=sched)
            assert r.token_ids == greedy_reference(v, prompt, 24)
    for tree in (0, "auto"):  # an untrained drafter: trimmed, never to nothing or past what was drafted
        mine = [(n, l) for t, n, l in trims if t == tree]
        assert mine and all(1 <= l <= n for n, l in mine) and any(l < n for n, l in mine), tree
    assert sum(engine.calibration.reached) > 0  # the engine-wide calibration heard the verified tokens
    r = engine.generate(prompt, GenerationConfig(max_new_tokens=12, temperature=0.8, seed=1))
    assert r.new_tokens >= 1


def test_draft_vocabulary_restricts_proposals_and_stays_lossless(tmp_path):
    """A drafter with a draft vocabulary proposes only those ids (greedy: the argmax among them; sampled:
    q is zero elsewhere and sums to 1), survives save/load, and greedy decoding with it is plain greedy."""
    from conftest import greedy_reference

    from hybrid.acceptance import Noise, SamplingParams
    from hybrid.engine import Engine, GenerationConfig

    v = make_verifier("qwen3")
    d = drafter_for(v)
    full = drafter_for(v)
    vocab = torch.arange(10, 60, 3)
    d.set_draft_vocab(vocab)
    h = torch.randn(5, v.hidden_size)
    logits = full.draft_logits(h)
    torch.testing.assert_close(d.draft_logits(h), logits[:, vocab])
    d.save(tmp_path)
    d2 = DiffusionDrafter.load(tmp_path, v)
    assert torch.equal(d2.draft_vocab, vocab)

    greedy = run_draft(v, d2, [5, 6, 7, 8], 6, 2)
    assert set(greedy.tokens.tolist()) <= set(vocab.tolist()) and greedy.q is None
    d2.config.draft_sampling = "sample"
    pool = PagePool(16, 4)
    v.attach(pool)
    d2.attach(pool, v)
    ctx = Context([5, 6, 7, 8], pool.new_sequence())
    d2.observe(ctx, v.prefill(ctx.seq, torch.tensor(ctx.tokens[:-1]), d2.capture_layers), 0)
    sampled = d2.propose(ctx, 6, 1, (SamplingParams(temperature=1.0), Noise(0)))
    assert set(sampled.tokens.tolist()) <= set(vocab.tolist())
    outside = torch.ones(sampled.q.shape[1], dtype=torch.bool)
    outside[vocab] = False
    assert (sampled.q[:, outside] == 0).all() and torch.allclose(sampled.q.sum(-1), torch.ones(6))

    ref = greedy_reference(v, [5, 40, 41, 42, 9], 24)
    r = Engine(v, DiffusionDrafter.load(tmp_path, v)).generate([5, 40, 41, 42, 9], GenerationConfig(
        max_new_tokens=24, block_size=4, stop_on_eos=False))
    assert r.token_ids == ref
