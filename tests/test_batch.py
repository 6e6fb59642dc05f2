"""Many sequences per verifier pass: each sequence's output is what it would be alone, whatever else is in the
batch; prompts join in chunks; the coordinator plans with the whole pass's cost."""
import random

import pytest
import torch

from conftest import greedy_reference, make_verifier
from hybrid.coordinator import Coordinator, CostModel, Load
from hybrid.drafters.causal import CausalDrafter
from hybrid.drafters.ngram import NgramDrafter
from hybrid.drafters.parallel import ParallelConfig, ParallelDrafter
from hybrid.engine import Engine, GenerationConfig
from hybrid.errors import PagesExhausted
from hybrid.pages import PagePool
from hybrid.verifiers.base import Rows
from test_speculative import small_diffusion

PROMPTS = [
    [5, 40, 41, 42, 9, 40, 41, 42, 9, 40],  # repeats: prompt lookup and the n-gram drafter find copies
    [7, 8],
    [11, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83],
    [30, 31, 30, 31, 30],
    [99],
]


def parallel(v):
    return ParallelDrafter(make_verifier("qwen3", seed=7), ParallelConfig(base="", mask_token_id=3, block_size=8))


DRAFTERS = {
    "none": lambda v: None,
    "ngram": lambda v: NgramDrafter(),
    "causal": lambda v: CausalDrafter(make_verifier("qwen3", seed=7)),
    "diffusion": small_diffusion,
    "parallel": parallel,
}


@pytest.mark.parametrize("drafter", list(DRAFTERS))
def test_each_sequence_of_a_batch_decodes_what_plain_greedy_decoding_alone_does(drafter):
    """float32, greedy: five prompts of 1 to 25 tokens decoded together (prompts prefilled in chunks of 8 beside the
    others' rounds), with fixed block sizes and with block size auto (trees, trimming, lookup): every sequence's
    tokens are transformers' own greedy output for its prompt."""
    v = make_verifier("qwen3")
    refs = [greedy_reference(v, p, 24) for p in PROMPTS]
    engine = Engine(v, DRAFTERS[drafter](v), num_pages=64, page_size=4)
    for block_size in (["auto"] if drafter == "none" else [1, 4, "auto"]):
        cfgs = [GenerationConfig(max_new_tokens=24, block_size=block_size, stop_on_eos=False)] * len(PROMPTS)
        results = engine.generate_many(PROMPTS, cfgs, prefill_chunk=8)
        assert [r.token_ids for r in results] == refs, block_size
        assert engine.pool.free_pages == engine.pool.num_pages and not engine.pool.sequences()


def test_one_pass_over_a_batch_gives_each_sequence_its_own_logits_and_pages():
    """The packed verifier pass: a chain, a tree, a prompt chunk wanting no logits and one wanting its last two
    rows', of four sequences in one forward pass, give each one the logits (and keys/values) of a pass over it
    alone; the head runs once for the whole pass (it is the largest matrix)."""
    v = make_verifier("qwen3")
    contexts = [[5, 9, 14, 20], [7, 8, 9, 10, 11, 12, 13], [40], [3, 4]]
    rows = [torch.tensor([33, 34, 35]), torch.tensor([33, 34, 35, 36]), torch.tensor([41, 42, 43, 44, 45]),
            torch.tensor([50, 51, 52])]
    parents = [None, torch.tensor([0, 0, 1]), None, None]
    wanted = [None, None, 0, 2]
    head, calls = v.head, []
    v.head = lambda x: calls.append(x.shape[0]) or head(x)

    def run(batched: bool):
        pool = PagePool(32, 4)
        v.attach(pool)
        seqs = [pool.new_sequence() for _ in contexts]
        for seq, ctx in zip(seqs, contexts):
            v.prefill(seq, torch.tensor(ctx))
        asks = [Rows(v.view(s), r, p, w) for s, r, p, w in zip(seqs, rows, parents, wanted)]
        calls.clear()
        outs = v.forward(asks) if batched else [v.forward([a])[0] for a in asks]
        kv = [pool.gather(v.name, 1, s, s.lengths[v.name]) for s in seqs]
        return [o.logits for o in outs], kv

    (alone, kv_alone), (together, kv_together) = run(False), run(True)
    assert calls == [3 + 4 + 2]  # one head call over the wanted rows of all four
    assert together[2] is None and [t.shape[0] for t in together[:2] + together[3:]] == [3, 4, 2]
    for a, b in zip(alone, together):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for (ka, va), (kb, vb) in zip(kv_alone, kv_together):
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)


def test_a_long_prompt_joins_in_chunks_while_the_others_keep_decoding():
    """Prefill is split into chunks of at most `prefill_chunk` tokens a step in all: a 60-token prompt arriving
    beside a decoding sequence takes several steps, and the other sequence commits tokens in every one of them."""
    v = make_verifier("qwen3")
    engine = Engine(v, None, num_pages=64, page_size=4)
    batch = engine.batch(prefill_chunk=16)
    cfg = GenerationConfig(max_new_tokens=30, stop_on_eos=False)
    first = batch.start([5, 6, 7], cfg)
    batch.step()  # its prefill
    batch.step()
    long = batch.start(list(range(10, 70)), cfg)
    steps = []
    while not long.active.started:
        events = batch.step()
        steps.append({h: (e.round.rows, len(e.tokens)) for h, e in events})
    assert len(steps) == 4  # 59 prompt tokens in chunks of at most 16
    assert all(s[first][1] == 1 for s in steps)  # one token a step for the decoding sequence, every step
    assert all(s[first][0] <= 16 + 1 for s in steps)  # rows of the pass: the chunk and its last token
    while len(batch):
        batch.step()
    assert engine.pool.free_pages == engine.pool.num_pages


def test_generate_many_starts_requests_in_order_as_the_pool_can_hold_them():
    """A pool that holds two requests at a time: the rest wait their turn, first in first out, and every output
    equals the prompt's alone; max_concurrent caps the batch; a request the pool can never hold is refused."""
    v = make_verifier("qwen3")
    engine = Engine(v, NgramDrafter(), num_pages=12, page_size=4)
    cfg = GenerationConfig(max_new_tokens=12, block_size=4, stop_on_eos=False)
    prompts = [[5, 6, 7, 8, i] for i in range(10, 16)]
    assert engine.request_pages(5, cfg) == 6  # two at a time
    alone = [engine.generate(p, cfg).token_ids for p in prompts]
    sizes = []
    real = engine.batch

    def batch(prefill_chunk=None):
        b = real(prefill_chunk)
        step = b.step
        b.step = lambda: sizes.append(len(b)) or step()
        return b

    engine.batch = batch
    assert [r.token_ids for r in engine.generate_many(prompts, cfg)] == alone
    assert max(sizes) == 2
    sizes.clear()
    assert [r.token_ids for r in engine.generate_many(prompts, cfg, max_concurrent=1)] == alone
    assert max(sizes) == 1
    with pytest.raises(PagesExhausted, match="pages"):
        engine.generate_many([[5] * 30], GenerationConfig(max_new_tokens=40))
    assert engine.pool.free_pages == engine.pool.num_pages


def test_under_load_a_sequence_is_charged_its_share_of_the_pass():
    """Alone, a round costs v(B); in a pass with others it costs its share: the pass with its plain row split
    evenly, plus what its draft rows add. With a CPU's pass (a fixed cost for reading the weights, then about a
    hundredth of it per row) the coordinator drafts less under load; where rows are nearly free it drafts more
    under the same load."""
    def costs_for(per_row):
        costs = CostModel()
        for _ in range(40):
            for rows in range(1, 65):
                costs.observe(rows - 1, 1, 0.002 + 0.001 * rows, 0.25 + per_row * rows, rows - 1)
        return costs

    dear, free = costs_for(0.01), costs_for(0.0002)
    assert dear.verify_share(4) == pytest.approx(dear.verify_seconds(4))  # alone (the default load)
    dear.load = Load(sequences=8, others=28)
    assert dear.verify_share(0) == pytest.approx(dear.verify_seconds(28) / 8)
    assert dear.verify_share(4) == pytest.approx(dear.verify_seconds(28) / 8 + dear.verify_seconds(32)
                                                 - dear.verify_seconds(28))

    def chosen(costs, load):
        costs.load = load
        coord, rng = Coordinator(16, costs=costs, explore=0.0, allow_plain=True), random.Random(0)
        for _ in range(200):  # acceptance 0.7 at every position
            coord._acc.observe(16, 1, next(i for i in range(17) if i == 16 or rng.random() >= 0.7))
        return coord.next()[0]

    assert chosen(dear, Load(16, 60)) < chosen(dear, Load())
    assert chosen(free, Load(16, 60)) > chosen(dear, Load(16, 60))


def test_rounds_report_the_pass_they_shared():
    v = make_verifier("qwen3")
    engine = Engine(v, NgramDrafter(), num_pages=64, page_size=4)
    batch = engine.batch()
    cfg = GenerationConfig(max_new_tokens=6, block_size=3, stop_on_eos=False)
    handles = [batch.start(p, cfg) for p in PROMPTS[:3]]
    batch.step()  # the three prompts' prefill, one pass
    events = batch.step()
    assert {e.round.batch for _, e in events} == {3}
    rows = {e.round.rows for _, e in events}
    assert len(rows) == 1 and rows.pop() == sum(e.round.tree_size or (e.round.block_size + 1) for _, e in events)
    for h in handles:
        batch.close(h)
    assert engine.pool.free_pages == engine.pool.num_pages
