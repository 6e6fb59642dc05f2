"""Pages: write/gather by slot mapping, roll back (returns what it removed), free, fork, budget."""
import pytest
import torch

from conftest import make_verifier
from hybrid.cuda import reference as ref
from hybrid.errors import PagesExhausted
from hybrid.pages import PackedKV, PagePool


def make_pool(num_pages=8, page_size=4):
    pool = PagePool(num_pages, page_size)
    pool.register("a", num_layers=2, num_kv_heads=2, head_dim=3, dtype=torch.float32)
    pool.register("b", num_layers=1, num_kv_heads=1, head_dim=5, dtype=torch.float32)
    return pool


def test_a_packed_pass_writes_each_sequences_rows_to_its_pages_and_reads_them_all_back_in_order():
    """PackedKV (one write and one gather per layer for all sequences of a pass) against the pool's per-sequence
    write and gather: the same pages written, and the packed read is every sequence's [0, start + T) in order."""
    pool = make_pool(num_pages=12)
    seqs, parts, rows = [pool.new_sequence() for _ in range(3)], [], []
    for seq, (start, T) in zip(seqs, [(5, 3), (0, 4), (9, 1)]):  # page boundaries inside rows and contexts
        view = pool.view(seq, "a")
        view.extend(start)
        view.write(1, 0, *torch.randn(2, start, 2, 3).unbind(0))  # context written earlier
        view.extend(start + T)
        parts.append((view, start, T))
        rows.append(torch.randn(2, T, 2, 3))
    other = [torch.stack(pool.gather("a", 0, s, s.lengths["a"])) for s in seqs]  # layer 0 must stay untouched
    packed = PackedKV(parts)
    packed.write(1, torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))
    k, v = packed.fetch(1)
    want = [pool.gather("a", 1, s, start + T) for s, (_, start, T) in zip(seqs, parts)]
    assert torch.equal(k, torch.cat([w[0] for w in want])) and torch.equal(v, torch.cat([w[1] for w in want]))
    for (view, start, T), r in zip(parts, rows):
        wk, wv = pool.gather("a", 1, view.seq, start + T)
        assert torch.equal(wk[start:], r[0]) and torch.equal(wv[start:], r[1])
    assert all(torch.equal(torch.stack(pool.gather("a", 0, s, s.lengths["a"])), o) for s, o in zip(seqs, other))


def test_write_then_gather_returns_what_was_written_across_page_boundaries():
    pool = make_pool()
    seq = pool.new_sequence()
    k, v = torch.randn(10, 2, 3), torch.randn(10, 2, 3)
    pool.reserve(seq, 10)
    pool.write("a", 1, seq, 0, k[:3], v[:3])
    pool.write("a", 1, seq, 3, k[3:], v[3:])  # a page boundary inside the second write
    pool.advance("a", seq, 10)
    gk, gv = pool.gather("a", 1, seq, 10)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    assert len(seq.block_table) == 3


def test_slots_follow_the_block_table():
    table = torch.tensor([5, 2, 7])
    assert ref.slots_for(table, 2, 7, 3).tolist() == [5 * 3 + 2, 2 * 3, 2 * 3 + 1, 2 * 3 + 2, 7 * 3]


def test_move_copies_positions_of_every_layer_across_pages_and_leaves_other_models_alone():
    pool = make_pool()
    seq = pool.new_sequence()
    pool.reserve(seq, 10)
    k, v = torch.randn(2, 10, 2, 3), torch.randn(2, 10, 2, 3)  # [layer, position, H, D]
    for layer in range(2):
        pool.write("a", layer, seq, 0, k[layer], v[layer])
    b = pool.kv["b"].clone()
    pool.move("a", seq, [5, 9], [4, 5])  # an overlapping move: 5 -> 4 reads 5 before 9 -> 5 writes it
    order = [0, 1, 2, 3, 5, 9, 6, 7, 8, 9]
    for layer in range(2):
        gk, gv = pool.gather("a", layer, seq, 10)
        assert torch.equal(gk, k[layer, order]) and torch.equal(gv, v[layer, order])
    assert torch.equal(pool.kv["b"], b)


def test_rollback_returns_removed_count_and_frees_pages_for_both_models():
    pool = make_pool()
    seq = pool.new_sequence()
    pool.reserve(seq, 11)
    pool.advance("a", seq, 11)
    pool.advance("b", seq, 9)
    assert pool.free_pages == 5
    assert pool.rollback(seq, 4) == 7
    assert seq.lengths == {"a": 4, "b": 4}
    assert len(seq.block_table) == 1 and pool.free_pages == 7
    assert pool.rollback(seq, 4) == 0
    with pytest.raises(ValueError):
        pool.rollback(seq, 5)


def test_free_returns_every_page_and_budget_is_enforced():
    pool = make_pool(num_pages=4, page_size=4)
    s1, s2 = pool.new_sequence(), pool.new_sequence()
    pool.reserve(s1, 12)
    with pytest.raises(PagesExhausted, match="--num-pages"):
        pool.reserve(s2, 8)
    pool.free(s1)
    assert pool.free_pages == 4
    pool.reserve(s2, 8)
    assert pool.free_pages == 2


def test_promised_pages_stay_held_for_their_sequence_while_it_grows():
    """Two requests whose worst cases fit the pool only one at a time: the second is refused at creation, not
    cut halfway, and a running sequence always gets the pages it was promised, even after rolling back."""
    pool = make_pool(num_pages=12, page_size=4)
    a = pool.new_sequence(max_tokens=36)  # 9 pages promised, none taken yet
    assert pool.free_pages == 12 and pool.available_pages == 3
    with pytest.raises(PagesExhausted, match="needs 9 pages"):
        pool.new_sequence(max_tokens=36)
    b = pool.new_sequence(max_tokens=12)  # 3 pages: what is left
    pool.reserve(b, 12)
    with pytest.raises(PagesExhausted):
        pool.reserve(b, 13)  # past its promise: the free pages are a's
    pool.reserve(a, 20)
    pool.advance("a", a, 20)
    assert pool.rollback(a, 4) == 16 and pool.available_pages == 0  # pages given back stay a's
    pool.reserve(a, 36)
    assert pool.free_pages == 0
    pool.free(a)
    assert pool.available_pages == 9
    pool.new_sequence(max_tokens=36)


def test_fork_copies_pages_bit_for_bit():
    pool = make_pool()
    seq = pool.new_sequence()
    pool.reserve(seq, 6)
    k, v = torch.randn(6, 2, 3), torch.randn(6, 2, 3)
    for layer in range(2):
        pool.write("a", layer, seq, 0, k, v)
    pool.advance("a", seq, 6)
    child = pool.fork(seq)
    assert set(child.block_table).isdisjoint(seq.block_table)
    for layer in range(2):
        ck, cv = pool.gather("a", layer, child, 6)
        assert torch.equal(ck, k) and torch.equal(cv, v)


def test_copy_pages_and_write_all_layers_match_per_layer_writes():
    kv = torch.zeros(3, 2, 6, 4, 2, 8)
    k, v = torch.randn(3, 5, 2, 8), torch.randn(3, 5, 2, 8)
    slots = torch.tensor([3, 4, 5, 9, 22])
    ref.write_kv_all_layers(kv, k, v, slots)
    kv2 = torch.zeros_like(kv)
    for layer in range(3):
        ref.write_kv(kv2, layer, k[layer], v[layer], slots)
    assert torch.equal(kv, kv2)
    ref.copy_pages(kv, torch.tensor([0, 1]), torch.tensor([4, 5]))
    assert torch.equal(kv[:, :, 4:6], kv[:, :, 0:2])


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_generate_roll_back_regenerate_gives_same_tokens_and_logits(family):
    v = make_verifier(family)
    pool = PagePool(16, 4)
    v.attach(pool)
    seq = pool.new_sequence()
    prompt = torch.tensor([5, 9, 14, 20, 33, 7])
    v.prefill(seq, prompt[:-1])
    tokens = [int(prompt[-1])]
    logits = []
    for _ in range(10):  # plain greedy, one token per pass
        out = v.score(seq, torch.tensor(tokens[-1:]))
        logits.append(out.logits[0])
        tokens.append(int(out.logits[0].argmax()))
    n = seq.length
    assert pool.rollback(seq, n - 4) == 4
    assert seq.length == n - 4
    again = v.score(seq, torch.tensor(tokens[-5:-1]))  # the last 4 inputs again, in one pass
    assert again.logits.argmax(-1).tolist() == tokens[-4:]
    torch.testing.assert_close(again.logits, torch.stack(logits[-4:]), atol=1e-4, rtol=1e-4)
