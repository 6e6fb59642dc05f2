"""Draft trees: building them, walking them, and decoding with them exactly as the verifier alone would."""
import pytest
import torch

from conftest import greedy_reference, make_verifier
from hybrid.acceptance import Noise, SamplingParams
from hybrid.drafters.base import Draft
from hybrid.drafters.diffusion import DiffusionDrafter
from hybrid.engine import Engine, GenerationConfig
from hybrid.tree import accept_tree, build_tree, chain_parents, depths, tree_mask

PROMPT = [5, 40, 41, 42, 9, 40, 41, 42, 9, 40]
N = 40
GREEDY = SamplingParams()


def test_build_tree_keeps_the_most_probable_paths_best_first():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.9, 0.05, 0.05]])  # [B=3, k=3]
    ids = torch.tensor([[10, 11, 12], [20, 21, 22], [30, 31, 32]])
    t = build_tree(probs, ids, budget=5)
    # path scores: 10 .6; 10-20 .30; 10-20-30 .27; 11 .3; 10-21 .24; 10-21-30 .216; 11-20 .15 ...
    assert t.tokens.tolist() == [10, 11, 20, 30, 21] or t.tokens.tolist() == [10, 20, 11, 30, 21]
    rows = {tok: i + 1 for i, tok in enumerate(t.tokens.tolist())}
    assert t.parents.tolist() == [{10: 0, 11: 0, 20: rows[10], 30: rows[20], 21: rows[10]}[x] for x in t.tokens.tolist()]
    assert t.depth.tolist() == depths(t.parents).tolist()
    assert torch.allclose(t.score, torch.tensor(sorted([0.6, 0.3, 0.3, 0.27, 0.24], reverse=True)))
    assert all(p < i + 1 for i, p in enumerate(t.parents.tolist()))  # parents come first
    # a budget that covers everything: every path, k^1 + k^2 + k^3 nodes
    assert build_tree(probs, ids, budget=100).size == 3 + 9 + 27


def test_tree_mask_is_ancestors_and_self():
    parents = torch.tensor([0, 1, 0, 3, 1])  # rows 1..5
    m = tree_mask(parents)
    expect = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, expect)
    assert torch.equal(tree_mask(chain_parents(4)), torch.ones(5, 5, dtype=torch.bool).tril())


def one_hot_logits(targets, V=50):
    logits = torch.full((len(targets), V), -5.0)
    logits[torch.arange(len(targets)), torch.tensor(targets)] = 5.0
    return logits


def test_accept_tree_follows_the_verifiers_tokens_down_a_side_branch():
    tokens = torch.tensor([7, 8, 9, 3, 4])
    parents = torch.tensor([0, 0, 1, 2, 2])  # 7 and 8 under the root; 9 under 7; 3 and 4 under 8
    # verifier: after root -> 8 (row 2), after row 2 -> 4 (row 5), after row 5 -> 11 (bonus)
    logits = one_hot_logits([8, 1, 4, 1, 1, 11])
    a = accept_tree(tokens, parents, logits, GREEDY, None)
    assert a.path == [2, 5] and a.bonus == 11
    # nothing matches at the root: no token accepted, the verifier's own is the bonus
    a = accept_tree(tokens, parents, one_hot_logits([5, 1, 1, 1, 1, 1]), GREEDY, None)
    assert a.path == [] and a.bonus == 5


def test_accept_tree_samples_then_matches():
    tokens, parents = torch.tensor([7, 8]), torch.tensor([0, 0])
    logits = torch.full((3, 10), -30.0)
    logits[0, 8] = 30.0  # the verifier's distribution at the root: all mass on 8
    logits[2, 3] = 30.0
    a = accept_tree(tokens, parents, logits, SamplingParams(temperature=1.0), Noise(0), start=5)
    assert a.path == [2] and a.bonus == 3


class OracleTreeDrafter:
    """Knows the verifier's greedy continuation and hides it on the last branch of a tree of decoys, so
    every accepted token sits off the first path: the verifier's keys/values must move to the committed positions."""

    name, max_block_size, max_steps, capture_layers = "oracle", 8, 1, []

    def __init__(self, prompt, continuation, width=3):
        self.text, self.width = list(prompt) + list(continuation), width

    def attach(self, pool, verifier):
        pass

    def observe(self, ctx, hidden, start):
        pass

    def propose(self, ctx, block_size, steps, sampler):
        raise AssertionError("tree mode drafts trees")

    def propose_tree(self, ctx, block_size, budget, sampler):
        n = len(ctx.tokens)
        tokens, parents, parent = [], [], 0
        for d in range(block_size):
            truth = self.text[n + d] if n + d < len(self.text) else 0
            decoys = [(truth + j) % 100 + 10 for j in range(1, self.width)]
            for t in decoys + [truth]:  # siblings: decoys first, the truth last
                tokens.append(t)
                parents.append(parent)
            parent = len(tokens)  # the truth's row
        return Draft(torch.tensor(tokens), None, None, torch.tensor(parents))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_tree_decoding_moves_keys_values_of_side_paths_and_equals_plain(family):
    v = make_verifier(family)
    ref = greedy_reference(v, PROMPT, N)
    engine = Engine(v, OracleTreeDrafter(PROMPT, ref), num_pages=32, page_size=8)
    r = engine.generate(PROMPT, GenerationConfig(max_new_tokens=N, block_size=4, tree=12, stop_on_eos=False, lookup=0))
    assert r.token_ids == ref
    assert r.acceptance_lengths == [5] * 8  # every tree's truth path accepted whole
    assert engine.pool.free_pages == engine.pool.num_pages


def test_tree_keys_values_without_the_move_would_be_wrong(monkeypatch):
    """The same oracle with PagePool.move disabled: stale keys/values change the output (the test can fail)."""
    v = make_verifier("qwen3")
    ref = greedy_reference(v, PROMPT, N)
    engine = Engine(v, OracleTreeDrafter(PROMPT, ref), num_pages=32, page_size=8)
    monkeypatch.setattr(engine.pool, "move", lambda *a, **k: None)
    r = engine.generate(PROMPT, GenerationConfig(max_new_tokens=N, block_size=4, tree=12, stop_on_eos=False, lookup=0))
    assert r.token_ids != ref


def small_diffusion(v):
    torch.manual_seed(1)
    return DiffusionDrafter.for_verifier(v, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, intermediate_size=64)


@pytest.mark.parametrize("block_size", [1, 4, "auto"])
def test_diffusion_drafter_trees_are_lossless(block_size):
    v = make_verifier("qwen3")
    ref = greedy_reference(v, PROMPT, N)
    engine = Engine(v, small_diffusion(v), num_pages=32, page_size=8)
    r = engine.generate(PROMPT, GenerationConfig(max_new_tokens=N, block_size=block_size, tree=16, stop_on_eos=False))
    assert r.token_ids == ref
    assert engine.pool.free_pages == engine.pool.num_pages


def test_diffusion_tree_holds_its_chain_and_runners_up():
    v = make_verifier("qwen3")
    d = small_diffusion(v)
    engine = Engine(v, d, num_pages=32, page_size=8)
    seq = engine.pool.new_sequence()
    from hybrid.drafters.base import Context

    ctx = Context(tokens=list(PROMPT), seq=seq)
    d.observe(ctx, v.prefill(seq, torch.tensor(PROMPT[:-1]), d.capture_layers), 0)
    chain = d.propose(ctx, 4, 1, (GREEDY, None))
    tree = d.propose_tree(ctx, 4, 10, (GREEDY, None))
    assert tree.size == 10 and int(depths(tree.parents).max()) <= 4
    assert tree.tokens[0] == chain.tokens[0]  # the most probable first token heads the tree
    scores = build_tree(*torch.softmax(torch.randn(4, 50), -1).topk(8), budget=10).score
    assert (scores[:-1] >= scores[1:]).all()  # best first
    assert tree.conf.shape == (10,) and (tree.conf > 0).all() and (tree.conf <= 1).all()
    engine.pool.free(seq)


def test_tree_option_is_checked_and_auto_means_trees_only_with_block_size_auto():
    from hybrid.engine import AUTO_TREE, tree_budget
    from hybrid.errors import UserError

    for bad in (-1, 65, "big"):
        with pytest.raises(UserError, match="tree must be"):
            GenerationConfig(tree=bad)  # checked when made
    assert tree_budget(GenerationConfig()) == AUTO_TREE and tree_budget(GenerationConfig(block_size=4)) == 0
    assert tree_budget(GenerationConfig(block_size=4, tree=6)) == 6 and tree_budget(GenerationConfig(tree=0)) == 0
