"""The parallel drafter (a causal LM filling mask tokens in one pass) and its training from a pretrained model."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from conftest import greedy_reference, make_verifier, save_tiny
from hybrid.drafters import load_drafter
from hybrid.drafters.base import Context
from hybrid.drafters.parallel import ParallelConfig, ParallelDrafter, merge_lora
from hybrid.drafters.parallel_train import block_layout, forward_rows, targets_of
from hybrid.drafters.train import TrainConfig, train
from hybrid.engine import Engine, GenerationConfig
from hybrid.errors import UserError
from hybrid.pages import PagePool

PROMPT = [5, 40, 41, 42, 9, 40, 41, 42, 9, 40]
MASK = 3  # the tiny tokenizer's <mask>


def parallel_drafter(seed=7, block_size=16):
    return ParallelDrafter(make_verifier("qwen3", seed=seed), ParallelConfig(base="", mask_token_id=MASK,
                                                                             block_size=block_size))


def test_block_layout_places_each_mask_block_after_its_anchor():
    positions, attn, rows, offsets = block_layout(L=5, start=1, anchors=[1, 2], B=3)
    assert positions.tolist() == [0, 1, 2, 3, 4, 2, 3, 3, 4]
    assert rows.tolist() == [-1, 1, 2, 3, -1, 1, 1, 2, -1]  # the last real token and mask (2, 2) pass s's end
    assert offsets.tolist() == [-1, 0, 0, 0, -1, 1, 2, 1, -1]
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0, 0],  # anchor 1, mask 1: real tokens 0..1, itself
        [1, 1, 0, 0, 0, 1, 1, 0, 0],  # anchor 1, mask 2: also mask 1
        [1, 1, 1, 0, 0, 0, 0, 1, 0],  # anchor 2, mask 1
        [1, 1, 1, 0, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(attn, want)
    seq = torch.tensor([10, 11, 12, 13, 14])
    assert targets_of(seq, rows, offsets).tolist() == [-1, 12, 13, 14, -1, 13, 14, 14, -1]


@torch.no_grad()
def test_training_rows_compute_what_the_drafter_computes_at_inference():
    """A mask block in a training pass (appended after the whole sequence, attending up to its anchor) gives the
    logits the drafter gets from its paged keys/values at that point of the text."""
    d = parallel_drafter()
    seq = torch.tensor(PROMPT + [7, 8, 9, 10])
    a, B = 6, 4
    positions, attn, rows, offsets = block_layout(seq.numel(), 0, [a], B)
    want = torch.cat([torch.tensor([a]), seq.numel() + torch.arange(B - 1)])
    trained = forward_rows(d.lm.model, seq, positions, attn, MASK, want)  # [B, V]
    pool = PagePool(16, 4)
    d.lm.attach(pool)
    ctx = Context(seq[: a + 1].tolist(), pool.new_sequence())
    d.lm.prefill(ctx.seq, seq[:3])  # part of the context already read, as after earlier rounds
    inferred = d.block_logits([ctx], [B])[0]
    torch.testing.assert_close(trained, inferred, atol=1e-4, rtol=1e-4)
    assert ctx.seq.lengths[d.lm.name] == a + 1  # the mask rows are not kept


def test_merge_lora_adds_the_low_rank_product():
    model = make_verifier("qwen3").model
    w = model.model.layers[0].self_attn.q_proj.weight.clone()
    a, b = torch.randn(2, w.shape[1]), torch.randn(w.shape[0], 2)
    merge_lora(model, {"model.layers.0.self_attn.q_proj.lora_A": a, "model.layers.0.self_attn.q_proj.lora_B": b}, 0.5)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, w + 0.5 * b @ a)


@pytest.mark.parametrize("tree", [0, 6])
def test_parallel_drafter_is_lossless_greedy_and_drafts_from_its_own_model(tree):
    v = make_verifier("qwen3")
    ref = greedy_reference(v, PROMPT, 40)
    engine = Engine(v, parallel_drafter(seed=0), num_pages=32, page_size=8)  # the verifier's own weights
    for block in (1, 4, 8):
        r = engine.generate(PROMPT, GenerationConfig(max_new_tokens=40, block_size=block, tree=tree, stop_on_eos=False,
                                                     lookup=0))
        assert r.token_ids == ref
        assert r.accepted_per_position[0] == 1.0  # draft position 1 is the verifier's own next token
    assert engine.pool.free_pages == engine.pool.num_pages


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A parallel drafter trained from a tiny pretrained model on a tiny verifier's answers."""
    tmp = tmp_path_factory.mktemp("parallel")
    verifier = save_tiny(tmp / "verifier", "qwen3", seed=0)
    base = save_tiny(tmp / "base", "qwen3", seed=5)
    prompts = tmp / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"ab{i} cd ab{i + 1}", "category": "code", "chat": False}) + "\n"
                               for i in range(12)))
    cfg = TrainConfig(verifier=str(verifier), corpus=[], prompts=[str(prompts)], out=str(tmp / "drafter"),
                      init_from=str(base), block_size=4, steps=24, lr=5e-3, warmup=2, anchors=6, eval_every=8,
                      checkpoint_every=8, holdout_chunks=2, dtype="float32", gen_tokens=16, gen_batch=6,
                      lora_rank=4, lora_alpha=8, answers=str(tmp / "pool.jsonl.gz"))
    return cfg, train(cfg, progress=False)


def test_training_prints_a_learning_curve_and_the_drafter_loads_and_stays_lossless(trained):
    cfg, report = trained
    curve = [json.loads(line) for line in open(f"{cfg.out}/curve.jsonl")]
    assert [p["step"] for p in curve] == [0, 8, 16, 24]
    assert curve[0]["target_tokens"] == 0 and curve[-1]["target_tokens"] == report["target_tokens"] > 0
    assert all(len(p["per_position"]) == 4 and p["tau"] >= 1 for p in curve)
    assert curve[-1]["tau"] > curve[0]["tau"]  # it learns the verifier's answers
    adapter = load_file(f"{cfg.out}/adapter.safetensors")
    assert adapter and all(k.endswith((".lora_A", ".lora_B")) for k in adapter)
    from hybrid.verifiers.hf import HFVerifier

    v = HFVerifier.from_pretrained(cfg.verifier, torch.float32)
    drafter = load_drafter(cfg.out, v, torch.float32)
    assert isinstance(drafter, ParallelDrafter) and drafter.max_block_size == 4
    prompt = v.encode("ab3 cd ab4")
    r = Engine(v, drafter).generate(prompt, GenerationConfig(max_new_tokens=16, block_size=4, stop_on_eos=False))
    assert r.token_ids == Engine(v, None).generate(prompt, GenerationConfig(max_new_tokens=16, stop_on_eos=False)).token_ids


def test_training_resumes_exactly(trained, tmp_path):
    cfg, _ = trained
    part = replace(cfg, out=str(tmp_path / "again"), extra={"stop_after": 12})
    train(part, progress=False)
    train(replace(part, extra={"resume": True}), progress=False)
    a, b = load_file(f"{cfg.out}/adapter.safetensors"), load_file(f"{tmp_path}/again/adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_training_continues_a_run_from_its_adapter_on_the_same_held_out_prompts(trained, tmp_path):
    cfg, report = trained
    more = replace(cfg, out=str(tmp_path / "more"), init=cfg.out, steps=8, eval_every=8)
    again = train(more, progress=False)
    curve = [json.loads(line) for line in open(f"{more.out}/curve.jsonl")]
    first = json.loads(open(f"{cfg.out}/curve.jsonl").readlines()[-1])
    # step 0 of the new run measures the adapter it starts from, on the held-out prompts of the run it continues
    assert curve[0]["tau"] == pytest.approx(first["tau"]) and curve[0]["target_tokens"] == report["target_tokens"]
    assert again["target_tokens"] > report["target_tokens"]
    assert json.load(open(f"{more.out}/holdout-prompts.json")) == json.load(open(f"{cfg.out}/holdout-prompts.json"))
    with pytest.raises(UserError, match="LoRA rank"):
        train(replace(more, out=str(tmp_path / "bad"), lora_rank=8), progress=False)


def test_a_parallel_drafter_folder_can_be_the_shipped_drafter(trained, tmp_path, monkeypatch):
    import shutil

    import hybrid.drafters as drafters

    cfg, _ = trained
    monkeypatch.setattr(drafters, "ASSETS", tmp_path)
    assert drafters.shipped_drafter(cfg.verifier) is None
    shutil.copytree(cfg.out, tmp_path / "verifier")  # named after the verifier's folder
    assert drafters.shipped_drafter(cfg.verifier) == tmp_path / "verifier"
    from hybrid.verifiers.hf import HFVerifier

    assert isinstance(load_drafter("auto", HFVerifier.from_pretrained(cfg.verifier, torch.float32)), ParallelDrafter)
