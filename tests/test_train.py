"""`hybrid train-drafter` on a tiny verifier: learns, is deterministic with a seed, resumes exactly."""
import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybrid.drafters.diffusion import DiffusionDrafter
from hybrid.drafters.train import TrainConfig, make_batch, train
from hybrid.verifiers.hf import HFVerifier


def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    # regular text: the tiny verifier's greedy predictions on it are a learnable function of the context
    for i in range(6):
        (d / f"f{i}.txt").write_text(" ".join(f"ab{(j * 7 + i) % 10} cd" for j in range(120)))
    return d


def cfg(tmp_path, model_dir, out, steps, **kw):
    return TrainConfig(
        verifier=str(model_dir), corpus=[str(corpus(tmp_path) if not (tmp_path / "corpus").exists() else tmp_path / "corpus")],
        out=str(out), block_size=4, seq_len=64, max_chunks=12, holdout_chunks=2, anchors=8, steps=steps, lr=3e-3,
        warmup=5, checkpoint_every=5, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=64, dtype="float32", **kw,
    )


def weights(out):
    return load_file(str(out / "model.safetensors"))


def test_training_is_deterministic_resumable_and_learns(tmp_path, model_dir):
    r = train(cfg(tmp_path, model_dir, tmp_path / "a", 10), progress=False)
    train(cfg(tmp_path, model_dir, tmp_path / "b", 10), progress=False)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same weights

    # 5 steps, then resume to 10 == 10 straight
    train(cfg(tmp_path, model_dir, tmp_path / "c", 10, extra={"stop_after": 5}), progress=False)
    train(cfg(tmp_path, model_dir, tmp_path / "c", 10, extra={"resume": True}), progress=False)
    wc = weights(tmp_path / "c")
    assert all(torch.allclose(wa[k], wc[k], atol=0, rtol=0) for k in wa)

    hist = [json.loads(l) for l in (tmp_path / "a" / "history.jsonl").read_text().splitlines()]
    assert hist[-1]["loss"] < hist[0]["loss"]
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["hybrid_drafter"]["verifier"] == str(model_dir) and saved["architectures"] == ["DFlashDraftModel"]
    assert r["heldout_teacher_forced_tau"] >= 1.0
    DiffusionDrafter.load(tmp_path / "a", HFVerifier.from_pretrained(str(model_dir)))


def test_batch_targets_are_the_verifiers_predictions():
    S, B = 20, 4
    feat = {"tokens": torch.arange(S), "pred": torch.arange(S) + 1, "hidden": torch.zeros(S, 8)}
    feat["pred"][6] = 99  # the verifier disagrees with the corpus about position 7
    c = TrainConfig(verifier="", corpus=[], out="", block_size=B, anchors=6, partial_mask_share=0.0)
    ids, positions, tgt, w, masked, anchors = make_batch(feat, c, mask_id=3, g=torch.Generator().manual_seed(0))
    for j, a in enumerate(anchors.tolist()):
        assert ids[j, 0] == a and (ids[j, 1:] == 3).all()  # [x_a, mask x B]
        assert positions[j].tolist() == list(range(a, a + B + 1))
        assert tgt[j].tolist() == [int(feat["pred"][a + k - 1]) for k in range(1, B + 1)]
        for k in range(1, B + 1):
            on_policy = all(a + i != 7 for i in range(1, k))  # rows after the disagreement weigh less
            assert (w[j, k - 1] == torch.exp(torch.tensor(-(k - 1) / 7.0))) == on_policy


def test_bfloat16_training_run_completes(tmp_path, model_dir):
    """The default dtype path: a bf16 verifier, an fp32 drafter under autocast, a bf16 drafter saved."""
    c = cfg(tmp_path, model_dir, tmp_path / "bf16", 2)
    c.dtype = "bfloat16"
    r = train(c, progress=False)
    assert r["heldout_teacher_forced_tau"] >= 1.0
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["fc.weight"].dtype == torch.bfloat16


def test_self_distillation_features_are_the_verifiers_greedy_answers():
    """Batched, left-padded generation: each answer equals plain greedy decoding of its prompt alone, and its
    hidden states equal a fresh teacher-forced pass over prompt + answer."""
    from conftest import greedy_reference, make_verifier

    from hybrid.drafters.train import featurise, generate_features

    v = make_verifier("qwen3", seed=3)
    prompts = [[5, 9, 13], [7, 8, 9, 10, 11, 12, 40], [60, 61]]
    layers = [0, 2]
    feats = generate_features(v, layers, prompts, new_tokens=10)
    for p, f in zip(prompts, feats):
        ref = greedy_reference(v, p, 10)
        stop = next((j for j, t in enumerate(ref) if t in v.eos_token_ids), 9)
        full = p + ref[: stop + 1]
        assert f["tokens"].tolist() == full[:-1] and f["pred"].tolist() == full[1:]
        assert f["start"] == len(p) - 1
        again = featurise(v, layers, full[:-1])
        torch.testing.assert_close(f["hidden"].float(), again["hidden"].float(), atol=2e-2, rtol=2e-2)


def test_answers_from_elsewhere_give_the_same_features():
    """`answer_features` (an answer vLLM wrote, featurised by one verifier pass) gives generate_features'
    layout and values: same tokens, start and predictions, hidden states equal within bf16 rounding; a
    continuation past the first EOS is cut there."""
    from conftest import make_verifier

    from hybrid.drafters.train import answer_features, generate_features

    v = make_verifier("qwen3", seed=3)
    prompts = [[5, 9, 13], [7, 8, 9, 10, 11, 12, 40]]
    layers = [0, 2]
    eos = next(iter(v.eos_token_ids))
    for p, ref in zip(prompts, generate_features(v, layers, prompts, new_tokens=10)):
        answer = ref["tokens"][len(p):].tolist() + [ref["pred"][-1].item()]  # greedy, through EOS if it came
        got = answer_features(v, layers, p, answer + [eos, 7, 7])
        full = p + answer + ([] if answer[-1] in v.eos_token_ids else [eos])
        assert got["tokens"].tolist() == full[:-1] and got["start"] == ref["start"] == len(p) - 1
        n = len(ref["tokens"])  # the positions both have
        assert got["pred"][ref["start"]: n].tolist() == ref["pred"][ref["start"]:].tolist()  # the verifier's argmax
        torch.testing.assert_close(got["hidden"][:n].float(), ref["hidden"].float(), atol=2e-2, rtol=2e-2)


def test_a_run_with_more_prompts_answers_only_the_new_ones(tmp_path, monkeypatch):
    """Cached answers are found by prompt, whichever batch wrote them: adding prompts (which reshuffles the
    batches) answers only the added ones, and the earlier answers come back unchanged."""
    from conftest import make_verifier

    import hybrid.drafters.train as tr

    v = make_verifier("qwen3", seed=3)
    layers, asked = [0, 2], []
    real = tr.generate_features
    monkeypatch.setattr(tr, "generate_features", lambda v, l, ps, n: asked.append(ps) or real(v, l, ps, n))
    cfg = TrainConfig(verifier="tiny", corpus=[], out=str(tmp_path), block_size=2, gen_tokens=8, gen_batch=2)
    first = [[5, 9, 13], [7, 8, 9, 10], [60, 61], [3, 4, 5, 6, 7]]
    added = [[20, 21, 22], [30, 31]]
    by_prompt = {tuple(f["tokens"][: f["start"] + 1].tolist()): f
                 for f in tr.load_or_generate_features(cfg, v, layers, first, progress=False)}
    assert sorted(p for ps in asked for p in ps) == sorted(first)
    asked.clear()
    again = tr.load_or_generate_features(replace(cfg, gen_batch=3), v, layers, added + first, progress=False)
    assert sorted(p for ps in asked for p in ps) == sorted(added)  # only the new prompts were answered
    for f in again:
        key = tuple(f["tokens"][: f["start"] + 1].tolist())
        if key in by_prompt:
            assert torch.equal(f["tokens"], by_prompt[key]["tokens"]) and torch.equal(f["hidden"], by_prompt[key]["hidden"])
    assert {tuple(f["tokens"][: f["start"] + 1].tolist()) for f in again} <= {tuple(p) for p in added + first}
    asked.clear()
    tr.load_or_generate_features(cfg, v, layers, first, progress=False)
    assert asked == []  # all cached


def test_cached_answers_without_the_asked_soft_targets_are_featurised_again(tmp_path, monkeypatch):
    """A cache that a run without soft targets wrote into beside a run with them holds answers lacking them: a run
    asking soft targets featurises exactly those again (instead of failing mid-training), and the cache then
    serves every answer with them."""
    from conftest import make_verifier

    import hybrid.drafters.train as tr

    v = make_verifier("qwen3", seed=3)
    layers, prompts = [0, 2], [[5, 9, 13], [7, 8, 9, 10], [60, 61], [3, 4, 5, 6, 7]]
    plain = TrainConfig(verifier="tiny", corpus=[], out=str(tmp_path), block_size=2, gen_tokens=8, gen_batch=2,
                        feature_cache=str(tmp_path / "plain"))
    tr.load_or_generate_features(plain, v, layers, prompts, progress=False)  # fills the answers pool
    soft = replace(plain, soft_targets=2, gen_backend="pool", feature_cache=str(tmp_path / "soft"))
    tr.load_or_generate_features(soft, v, layers, prompts, progress=False)
    first = sorted((tmp_path / "soft").glob("*.pt"))[0]
    feats = torch.load(first)
    stripped = tr.prompt_key(feats[0])
    del feats[0]["soft_ids"], feats[0]["soft_probs"]  # as a run without soft targets would have written it
    torch.save(feats, first)
    asked, real = [], tr.answer_features
    monkeypatch.setattr(tr, "answer_features", lambda v, l, p, a, k=0: asked.append(tuple(p)) or real(v, l, p, a, k))
    again = tr.load_or_generate_features(soft, v, layers, prompts, progress=False)
    assert asked == [stripped]
    assert all(f["soft_ids"].shape[1] == 2 for f in again)
    asked.clear()
    tr.load_or_generate_features(soft, v, layers, prompts, progress=False)
    assert asked == []  # the new file supersedes the stripped entry


def test_batches_anchor_inside_the_answer():
    S, B = 30, 4
    feat = {"tokens": torch.arange(S), "pred": torch.arange(S) + 1, "hidden": torch.zeros(S, 8), "start": 20}
    c = TrainConfig(verifier="", corpus=[], out="", block_size=B, anchors=64)
    anchors = make_batch(feat, c, mask_id=3, g=torch.Generator().manual_seed(0))[5]
    assert anchors.min() >= 20 and anchors.max() <= S - B - 1


def test_loss_over_a_vocabulary_subset(monkeypatch):
    """Over every id the sampled softmax is the full one; over a subset the targets are always kept."""
    from hybrid.drafters.train import block_logits_loss, loss_vocabulary

    torch.manual_seed(0)
    V, H, B = 50, 8, 3

    h = torch.randn(2, B + 1, H)  # the drafter's output rows, fixed
    monkeypatch.setattr("hybrid.drafters.train.blocks_forward", lambda *a, **k: h)
    head = torch.nn.Linear(H, V, bias=False)
    tgt = torch.tensor([[3, 7, 49], [0, 7, 12]])
    masked = torch.tensor([[True, True, True], [False, True, True]])
    batch = (None, None, tgt, torch.ones(2, B), masked, None)
    full, acc_full = block_logits_loss(None, None, head, None, batch, B, None)
    every, acc_every = block_logits_loss(None, None, head, None, batch, B, torch.arange(V))
    torch.testing.assert_close(full, every)
    assert acc_full == acc_every
    few, _ = block_logits_loss(None, None, head, None, batch, B, torch.tensor([1, 2]))
    assert few < full  # fewer competitors; still finite, with every target in the softmax
    feats = [{"pred": torch.tensor([2, 2, 2, 5, 5, 5, 9, 9, 7]), "start": 3}]  # counted from position 3
    assert loss_vocabulary(feats, 2).tolist() == [5, 9] and loss_vocabulary(feats, 0) is None
    assert loss_vocabulary(feats, 5, vocab_size=12).tolist() == [0, 1, 5, 7, 9]  # then the lowest unseen ids


def test_training_from_prompts_resumes_and_reports(tmp_path, model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"ab{i} cd ab{i + 1}", "category": "code", "chat": False}) + "\n"
                               for i in range(8)))
    c = TrainConfig(verifier=str(model_dir), corpus=[], prompts=[str(prompts)], out=str(tmp_path / "sd"),
                    block_size=4, holdout_chunks=2, anchors=4, steps=6, lr=3e-3, warmup=2, checkpoint_every=3,
                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=64, dtype="float32", gen_tokens=12, gen_batch=3, loss_vocab=16)
    r = train(c, progress=False)
    assert r["heldout_teacher_forced_tau"] >= 1.0 and r["train_chunks"] >= 1
    assert len(json.loads((tmp_path / "sd" / "holdout-prompts.json").read_text())) == 2
    w = weights(tmp_path / "sd")
    # the answers are cached: a second run from a checkpoint reuses them and ends on the same weights
    train(replace(c, out=str(tmp_path / "sd2"), extra={"stop_after": 3}), progress=False)
    train(replace(c, out=str(tmp_path / "sd2"), extra={"resume": True}), progress=False)
    w2 = weights(tmp_path / "sd2")
    assert all(torch.equal(w[k], w2[k]) for k in w)

    # going on from it (--init) on other prompts keeps the vocabulary it drafts from, which those prompts
    # alone would have chosen otherwise
    other = tmp_path / "q.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"cd ab{i + 5} cd cd", "category": "code", "chat": False}) + "\n"
                             for i in range(8)))
    vocab = lambda d: load_file(str(tmp_path / d / "draft_vocab.safetensors"))["ids"]  # noqa: E731
    train(replace(c, prompts=[str(other)], out=str(tmp_path / "fresh")), progress=False)
    train(replace(c, prompts=[str(other)], out=str(tmp_path / "more"), init=str(tmp_path / "sd")), progress=False)
    assert not torch.equal(vocab("fresh"), vocab("sd"))
    assert torch.equal(vocab("more"), vocab("sd"))


def test_answers_pool_is_filled_once_and_read_by_every_later_run(tmp_path, model_dir, monkeypatch):
    """The verifier's answers go to one pool file (gzip JSONL, a member per addition): a later run in a fresh
    folder trains on them without answering again, and --answers-only adds just the prompts it lacks."""
    import hybrid.drafters.train as train_mod
    from hybrid.drafters.answers import append_answers, read_answers
    from hybrid.drafters.train import fill_answers

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"ab{i} cd", "category": "code", "chat": False}) + "\n"
                               for i in range(6)))
    pool = tmp_path / "pool" / "tiny-12.jsonl.gz"
    c = TrainConfig(verifier=str(model_dir), corpus=[], prompts=[str(prompts)], out=str(tmp_path / "a"),
                    block_size=4, holdout_chunks=2, anchors=4, steps=2, warmup=1, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=64,
                    dtype="float32", gen_tokens=12, gen_batch=4, loss_vocab=16, answers=str(pool))
    assert fill_answers(c, progress=False) == (6, 6)
    answers = read_answers(pool)
    assert len(answers) == 6 and all(len(a) <= 12 for a in answers.values())
    assert fill_answers(c, progress=False) == (6, 0)  # nothing new to answer
    w = weights_after(c)
    monkeypatch.setattr(train_mod, "generate_features", lambda *a, **k: pytest.fail("answered again"))
    assert all(torch.equal(w[k], v) for k, v in weights_after(replace(c, out=str(tmp_path / "b"))).items())
    with open(pool, "ab") as f:  # an interrupted append: a gzip member cut short
        f.write(gzip.compress(b'{"prompt": [1, 2], "answer": [3]}\n')[:20])
    assert read_answers(pool) == answers
    append_answers(tmp_path / "plain.jsonl", [([1], [2, 3])])
    assert read_answers(tmp_path / "plain.jsonl") == {(1,): [2, 3]}


def weights_after(cfg):
    train(cfg, progress=False)
    return weights(Path(cfg.out))


def pool_config(tmp_path, model_dir, out, **kw):
    """Self-distillation from a pool the tiny verifier has filled (no new answers during training)."""
    from hybrid.drafters.train import fill_answers

    prompts = tmp_path / "pool-prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"prompt": f"ab{i} cd ab{i + 1}", "category": "code", "chat": False}) + "\n"
                                   for i in range(10)))
    c = TrainConfig(verifier=str(model_dir), corpus=[], prompts=[str(prompts)], out=str(out), block_size=4,
                    holdout_chunks=2, anchors=4, steps=6, lr=3e-3, warmup=2, checkpoint_every=3, eval_every=3,
                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=64,
                    dtype="float32", gen_tokens=12, gen_batch=4, loss_vocab=16, answers=str(tmp_path / "pool.jsonl.gz"))
    fill_answers(c, progress=False)
    return replace(c, gen_backend="pool", **kw)


def test_drafter_layers_start_as_the_verifiers(tmp_path, model_dir):
    """--init-layers-from-verifier: the drafter's layer is the verifier's layer (weights and shape), fc passes the last
    captured layer through, hidden_norm is that layer's input norm and norm the verifier's final norm (lr 0 keeps them)."""
    c = pool_config(tmp_path, model_dir, tmp_path / "init", init_layers_from_verifier=[3], lr=0.0, steps=2)
    train(c, progress=False)
    w = weights(tmp_path / "init")
    v = HFVerifier.from_pretrained(str(model_dir))
    src = {k: p for k, p in v.body.layers[3].named_parameters()}
    assert {k[len("layers.0."):] for k in w if k.startswith("layers.0.")} == set(src)
    for k, p in src.items():
        assert torch.equal(w[f"layers.0.{k}"], p), k
    saved = json.loads((tmp_path / "init" / "config.json").read_text())["hybrid_drafter"]
    assert saved["target_layer_ids"] == [0, 2] and saved["num_hidden_layers"] == 1
    assert saved["intermediate_size"] == v.config.intermediate_size == w["layers.0.mlp.up_proj.weight"].shape[0]
    H = v.hidden_size
    assert torch.equal(w["fc.weight"], torch.cat([torch.zeros(H, H), torch.eye(H)], 1))  # layer 2's hidden state
    assert torch.equal(w["hidden_norm.weight"], src["input_layernorm.weight"])  # layer 3 reads layer 2's output
    assert torch.equal(w["norm.weight"], v.body.norm.weight)


def test_layers_of_a_verifier_without_qk_norms(tmp_path):
    """A Qwen2 verifier (q/k/v biases, no q/k norms): weights and biases copied (o_proj's bias zero, as vLLM's DFlash
    layer with attention_bias has one), q_norm and k_norm the mean RMS of the layer's head queries and keys on the
    sample text; the drafter exports for vLLM with its biases; a drafter of another shape is refused."""
    from conftest import make_verifier

    from hybrid.drafters.init_layers import copy_verifier_layers, verifier_layer_shape
    from hybrid.errors import UserError
    from hybrid.vllm_export import expected_shapes, export_vllm

    v = make_verifier("qwen2", seed=1)
    drafter = DiffusionDrafter.for_verifier(v, target_layer_ids=[0], num_hidden_layers=1, **verifier_layer_shape(v))
    sample = torch.tensor([5, 9, 13, 40, 41, 42, 7, 8])
    copy_verifier_layers(drafter.model, v, [1], [sample])
    layer = v.body.layers[1]
    attn = layer.self_attn
    mine = drafter.model.layers[0].self_attn
    assert torch.equal(mine.q_proj.weight, attn.q_proj.weight)
    assert torch.equal(drafter.model.layers[0].mlp.down_proj.weight, layer.mlp.down_proj.weight)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(mine, name).bias, getattr(attn, name).bias)
    assert attn.o_proj.bias is None and torch.equal(mine.o_proj.bias, torch.zeros(v.hidden_size))
    drafter.save(tmp_path / "d")
    export_vllm(tmp_path / "d", tmp_path / "vllm")
    cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert cfg["attention_bias"] and "layers.0.self_attn.o_proj.bias" in expected_shapes(cfg)
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("hidden_states", args[0] if args else None)),
                                             with_kwargs=True)
    with torch.no_grad():
        v.body(input_ids=sample[None], use_cache=False)
    handle.remove()
    x = layer.input_layernorm(seen[0][0])  # [T, H] the layer's normed input
    d = drafter.config.head_dim
    for proj, norm in ((attn.q_proj, drafter.model.layers[0].self_attn.q_norm),
                       (attn.k_proj, drafter.model.layers[0].self_attn.k_norm)):
        heads = (x @ proj.weight.T + proj.bias).reshape(-1, d)
        expected = heads.pow(2).mean(-1).sqrt().mean()
        torch.testing.assert_close(norm.weight, torch.full((d,), expected.item()))
    narrow = DiffusionDrafter.for_verifier(v, target_layer_ids=[0], num_hidden_layers=1, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=16, intermediate_size=32)
    with pytest.raises(UserError, match="mlp|gate_proj|up_proj"):
        copy_verifier_layers(narrow.model, v, [1], [sample])


def test_soft_target_loss_by_hand(monkeypatch):
    """--soft-targets: each row's cross-entropy against the verifier's top-k probabilities renormalised, mixed with
    the hard target's by --soft-weight, over the full vocabulary or a subset plus the targets and soft tokens."""
    import math

    from hybrid.drafters.train import block_logits_loss

    V, B = 6, 2
    h = torch.zeros(1, B + 1, V)
    h[0, 1] = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # row 1's logits (the head is the identity)
    h[0, 2] = torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0, 0.0])
    monkeypatch.setattr("hybrid.drafters.train.blocks_forward", lambda *a, **k: h)
    head = torch.nn.Linear(V, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(V))
    feat = {"soft_ids": torch.tensor([[0, 1, 5], [2, 3, 5], [0, 0, 0]], dtype=torch.int32),  # top 2 of 3 kept
            "soft_probs": torch.tensor([[0.375, 0.125, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float16)}
    batch = (None, None, torch.tensor([[0, 2]]), torch.tensor([[1.0, 0.5]]), torch.ones(1, B, dtype=torch.bool),
             torch.tensor([0]))

    def by_hand(ids, weight):
        lse0 = math.log(sum(math.exp([2, 1, 0, 0, 0, 0][i]) for i in ids))
        lse1 = math.log(sum(math.exp([0, 0, 3, 0, 0, 0][i]) for i in ids))
        hard = [lse0 - 2, lse1 - 3]
        soft = [-(0.75 * (2 - lse0) + 0.25 * (1 - lse0)), -(0.5 * (3 - lse1) + 0.5 * (0 - lse1))]
        rows = [(1 - weight) * a + weight * b for a, b in zip(hard, soft)]
        return (1.0 * rows[0] + 0.5 * rows[1]) / 1.5

    for weight in (1.0, 0.5):
        loss, _ = block_logits_loss(None, None, head, feat, batch, B, None, soft_k=2, soft_weight=weight)
        assert loss.item() == pytest.approx(by_hand(range(V), weight), rel=1e-6)
        loss, _ = block_logits_loss(None, None, head, feat, batch, B, torch.tensor([4]), soft_k=2, soft_weight=weight)
        assert loss.item() == pytest.approx(by_hand([0, 1, 2, 3, 4], weight), rel=1e-6)  # {4} + targets + soft tokens
    hard, _ = block_logits_loss(None, None, head, feat, batch, B, None)
    mixed, _ = block_logits_loss(None, None, head, feat, batch, B, None, soft_k=2, soft_weight=0.0)
    assert hard.item() == pytest.approx(mixed.item(), rel=1e-6)


def test_soft_targets_are_the_verifiers_top_probabilities():
    from conftest import make_verifier

    from hybrid.drafters.train import answer_features

    v = make_verifier("qwen3", seed=3)
    prompt, answer = [5, 9, 13], [40, 41, 7, 8, 9]
    f = answer_features(v, [0, 2], prompt, answer, soft_k=4)
    with torch.no_grad():
        p = torch.softmax(v.model(torch.tensor([f["tokens"].tolist()])).logits[0].float(), -1)  # [S, V]
    for i in range(f["start"], len(f["tokens"])):
        top = p[i].topk(4)
        assert f["soft_ids"][i].tolist() == top.indices.tolist() and f["soft_ids"][i, 0] == f["pred"][i]
        torch.testing.assert_close(f["soft_probs"][i].float(), top.values, atol=1e-3, rtol=1e-3)


def test_soft_targets_and_initialised_layers_resume_exactly_with_a_curve(tmp_path, model_dir, monkeypatch):
    """Both options together: deterministic, an interrupted run resumes to the same weights and the same learning
    curve (step, target tokens, held-out tau), and the pool is never answered again."""
    import hybrid.drafters.train as train_mod

    kw = dict(init_layers_from_verifier=[3], soft_targets=4, soft_weight=0.5, feature_cache=str(tmp_path / "feats"))
    c = pool_config(tmp_path, model_dir, tmp_path / "a", **kw)
    monkeypatch.setattr(train_mod, "generate_features", lambda *a, **k: pytest.fail("answered again"))
    r = train(c, progress=False)
    train(replace(c, out=str(tmp_path / "b"), extra={"stop_after": 3}), progress=False)
    train(replace(c, out=str(tmp_path / "b"), extra={"resume": True}), progress=False)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    curve = lambda d: [json.loads(l) for l in (tmp_path / d / "curve.jsonl").read_text().splitlines()]  # noqa: E731
    ca, cb = curve("a"), curve("b")
    assert [p["step"] for p in ca] == [0, 3, 6] and ca[0]["target_tokens"] == 0
    assert ca[1]["target_tokens"] < ca[2]["target_tokens"] and ca[1]["wall_s"] <= ca[2]["wall_s"]
    assert [(p["step"], p["target_tokens"], p["tau"], p["per_position"]) for p in ca] == \
        [(p["step"], p["target_tokens"], p["tau"], p["per_position"]) for p in cb]
    assert r["heldout"]["tau"] == ca[-1]["tau"] >= 1.0 and len(ca[-1]["per_position"]) == 4
    # one feature cache for both runs; asking it for more soft targets than it holds is an error
    from hybrid.errors import UserError

    with pytest.raises(UserError, match="--soft-targets"):
        train(replace(c, out=str(tmp_path / "c"), soft_targets=8), progress=False)


def test_heldout_answers_are_the_parallel_drafters(tmp_path, model_dir):
    """Diffusion and parallel drafter runs hold out the same answers: the first usable ones in prompt order."""
    from hybrid.drafters.parallel_train import prompt_key, sequences
    from hybrid.drafters.train import verifier_tokenizer

    c = pool_config(tmp_path, model_dir, tmp_path / "h", steps=1)
    train(c, progress=False)
    held = json.loads((tmp_path / "h" / "holdout-prompts.json").read_text())
    parallel = sequences(c, verifier_tokenizer(str(model_dir)), progress=False)
    assert held == [list(prompt_key(*d)) for d in parallel[:2]]


def test_heldout_acceptance_blocks(monkeypatch):
    """A block at every 4th answer position, [x_a, mask x B] drafting x_{a+1..a+B}, accepted up to its first miss."""
    from hybrid.drafters.train import heldout_acceptance

    S, B, start, V = 30, 4, 9, 200
    x = torch.arange(100, 100 + S)
    feat = {"tokens": x, "pred": x.roll(-1), "hidden": torch.zeros(S, 8), "start": start}
    monkeypatch.setattr("hybrid.drafters.train.blocks_forward",
                        lambda d, e, f, ids, positions, anchors, B: positions.float()[..., None])  # h = the position

    class Drafter:
        config = type("C", (), {"mask_token_id": 3})
        draft_vocab = None

        def draft_logits(self, h):  # right at positions not divisible by 3
            pos = h[..., 0].long()
            tok = torch.where(pos % 3 == 0, 0, x[pos.clamp(max=S - 1)])
            return torch.nn.functional.one_hot(tok, V).float()

    r = heldout_acceptance(Drafter(), None, [feat], B)
    anchors = range(start, S - B, 4)
    acc = [next((j for j in range(B) if (a + 1 + j) % 3 == 0), B) for a in anchors]
    assert r["blocks"] == len(anchors) and r["tau"] == pytest.approx(1 + sum(acc) / len(acc))
    assert r["per_position"] == pytest.approx([sum(n > j for n in acc) / len(acc) for j in range(B)])
