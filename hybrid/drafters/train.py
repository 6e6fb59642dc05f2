"""Distil a block-diffusion drafter from its verifier (`hybrid train-drafter`).

Data. Corpus text is cut into chunks of `seq_len` tokens and run through the verifier once
(teacher forcing). Per position i we keep the hidden states of the drafter's target layers
``h[i]`` and the verifier's own greedy prediction ``t[i+1] = argmax p(. | x_<=i)``; features are
cached on disk so a resumed run does not recompute them.

Targets are the verifier's predictions, not the corpus: the drafter learns what *this* verifier
will say. For a block anchored at position a (block = [x_a, mask x B] at positions a..a+B,
context = positions < a), the target of block row k is t[a+k]. It equals the verifier's greedy
continuation exactly while the corpus agrees with the verifier (x[a+j] == t[a+j] for 0 < j < k);
past the first disagreement it is an approximation and is weighted down (`off_policy_weight`).
Rows are also weighted by w_k = exp(-(k-1)/gamma) (DFlash's recipe; gamma = 7).

Denoising. Half the blocks are all masks (the one-step draft); in the other half a random share of
rows is filled with their targets and the loss covers the rows still masked, so later denoising
steps learn to use committed tokens.

Many anchors per chunk are trained at once: every block attends to the chunk's context keys
before its anchor and to its own rows (one boolean mask), like DFlash's training.

Self-distillation (`--prompts FILE.jsonl`, DFlash's recipe). The verifier answers each prompt greedily
(batched `generate`, or vLLM) and the answers join the pool committed under data/answers
(hybrid.drafters.answers), so no run answers a prompt twice; the hidden states are kept from that same pass
(or one verifier pass over a pooled answer): every target is then on-policy,
the exact text the drafter will face at inference (chat answers, maths, translations), and no second
featurising pass is needed. Anchors start at the prompt's last token (``start``).

Loss vocabulary (`loss_vocab`). The frozen head's full softmax (V = 151,936 for Qwen) costs about 8x
the drafter's own layer per row on a CPU; the loss is taken over the `loss_vocab` tokens the verifier
predicts most often in the training features, plus every target of the batch (a sampled softmax). The
drafter is saved with that vocabulary (draft_vocab.safetensors) and drafts from it: the same saving at
inference, and lossless since the verifier checks every draft token.

Soft targets (`soft_targets` K). The same verifier pass keeps its K most probable next tokens and their
probabilities per position; a row's loss is then the cross-entropy against those K renormalised (mixed with the
greedy token's by `soft_weight`), which tells the drafter how close the runners-up were.

Pretrained layers (`init_layers_from_verifier`). The drafter's layers start as the verifier's own decoder layers,
with fc passing the last target layer through (hybrid.drafters.init_layers), instead of at random.

Progress is a learning curve (OUT/curve.jsonl, every `eval_every` steps): the held-out teacher-forced acceptance
length, defined as for parallel drafters (heldout_acceptance) on the same held-out answers (split_holdout), next to
the target tokens (rows with a loss) and the wall and CPU seconds trained so far. Featurising is logged apart, in
the feature cache's featurise.jsonl: one verifier pass per answer, shared by the runs that read that cache.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from hybrid.drafters.answers import append_answers, read_answers
from hybrid.drafters.diffusion import DiffusionDrafter
from hybrid.errors import UserError

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".jsonl", ".gz", ""}


@dataclass
class TrainConfig:
    verifier: str
    corpus: list[str]
    out: str
    block_size: int = 16
    seq_len: int = 512
    max_chunks: int = 256  # corpus chunks to featurise (seq_len tokens each)
    holdout_chunks: int = 8
    anchors: int = 32  # blocks per chunk per step
    steps: int = 1000
    lr: float = 6e-4
    warmup: int = 50
    weight_decay: float = 0.01
    gamma: float = 7.0
    off_policy_weight: float = 0.3
    partial_mask_share: float = 0.5
    chat_share: float = 0.5  # share of corpus files framed as a chat answer
    seed: int = 0
    checkpoint_every: int = 100
    num_hidden_layers: int = 1
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int = 128
    intermediate_size: int = 3584
    target_layer_ids: list[int] | None = None
    max_steps: int = 4
    dtype: str = "bfloat16"  # verifier and autocast dtype
    eval_prompts: int = 4
    eval_tokens: int = 48
    prompts: list[str] = field(default_factory=list)  # JSONL prompt files for self-distillation
    gen_tokens: int = 128  # new tokens per self-distillation answer
    gen_batch: int = 32  # answers generated at once
    max_prompts: int | None = None
    gen_batches: int | None = None  # answer at most this many batches (the first ones of the fixed batch order)
    gen_backend: str = "hf"  # "hf": transformers' generate; "vllm": vLLM answers, then one transformers prefill each;
    # "pool": only the prompts the answers pool has answered (a parallel drafter)
    loss_vocab: int = 32768  # 0: full softmax
    init: str | None = None  # start from this drafter folder's weights
    init_from: str | None = None  # a pretrained causal LM to adapt into a parallel drafter (hybrid.drafters.parallel)
    lora_rank: int = 16  # with init_from: LoRA rank and alpha over its linear layers
    lora_alpha: float = 32.0
    eval_every: int = 50  # steps between points of the held-out learning curve (OUT/curve.jsonl)
    answers: str | None = None  # the answers pool file (None: one of this run's own, under out; the CLI's
    # default is the committed pool, data/answers/<verifier>-<gen_tokens>.jsonl.gz)
    init_layers_from_verifier: list[int] | None = None  # verifier decoder layers whose weights start the drafter's
    # layers, one each (hybrid.drafters.init_layers); the drafter then takes the verifier's layer shape
    soft_targets: int = 0  # the verifier's top-k next-token probabilities kept per position and learnt (0: hard targets)
    soft_weight: float = 1.0  # with soft_targets: the soft cross-entropy's share of each row's loss (the rest: hard)
    feature_cache: str | None = None  # folder of the self-distillation features (None: OUT/generated); runs with the
    # same verifier, target layers and soft targets can share one
    extra: dict = field(default_factory=dict)


# -- corpus ---------------------------------------------------------------------------------
def iter_corpus_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise UserError(f"corpus not found: {p} (give files or folders of text)")
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES - {""})
        else:
            files.append(path)
    if not files:
        raise UserError(f"no text files in corpus {paths} (.py, .txt, .md, .rst, .jsonl, .gz)")
    return files


def read_text(path: Path) -> str:
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8", errors="ignore")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        parts = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                parts.append("".join(str(rec[k]) for k in ("prompt", "canonical_solution", "text", "completion") if k in rec))
        text = "\n\n".join(parts)
    return text


def chat_prefix(tokenizer, name: str) -> list[int]:
    """Tokens that open an assistant answer writing the file `name` (empty without a chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    lang = "python" if name.endswith(".py") else ""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": f"Write the file {name}."}],
                                        add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids) + tokenizer(f"```{lang}\n", add_special_tokens=False)["input_ids"]


def corpus_chunks(files: list[Path], tokenizer, seq_len: int, max_chunks: int, seed: int,
                  chat_share: float = 0.0) -> list[list[int]]:
    """Token chunks of seq_len from a shuffled file order, at most max_chunks. A share of the files
    is framed as the assistant's answer in the verifier's chat format (every chunk of such a file
    starts with that frame), so the drafter also sees the verifier in its chat-answer state."""
    rng = random.Random(seed)
    files = list(files)
    rng.shuffle(files)
    chunks = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    plain: list[int] = []
    for f in files:
        text = read_text(f)
        if not text.strip():
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prefix = chat_prefix(tokenizer, f.name) if rng.random() < chat_share else []
        if prefix and len(prefix) < seq_len // 2:
            body = seq_len - len(prefix)
            for i in range(0, len(ids) - body // 2, body):
                piece = ids[i : i + body]
                if len(piece) == body:
                    chunks.append(prefix + piece)
        else:
            plain += ids + eos
            while len(plain) >= seq_len:
                chunks.append(plain[:seq_len])
                plain = plain[seq_len:]
        if len(chunks) >= max_chunks:
            return chunks[:max_chunks]
    if not chunks:
        raise UserError(f"corpus too small: fewer than {seq_len} tokens (lower --seq-len or add text)")
    return chunks


def prompt_tokens(cfg: TrainConfig, verifier) -> list[list[int]]:
    """The self-distillation prompts, encoded as the verifier sees them (chat template unless "chat": false)."""
    from hybrid.bench import load_prompts
    from hybrid.verifiers.hf import encode_prompt

    prompts = [p for f in cfg.prompts for p in load_prompts(f)]
    random.Random(cfg.seed).shuffle(prompts)
    tokenizer = getattr(verifier, "tokenizer", verifier)  # a verifier, or just its tokenizer
    return [encode_prompt(tokenizer, p.prompt, p.chat) for p in prompts[: cfg.max_prompts]]


def verifier_tokenizer(spec: str):
    """The verifier's tokenizer alone (prompts can be encoded without loading the model)."""
    from transformers import AutoTokenizer

    from hybrid.demo import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(spec))


def fill_answers(cfg: TrainConfig, progress: bool = True, prompts: list[list[int]] | None = None) -> tuple[int, int]:
    """Answer the prompts of cfg.prompts (or these, already encoded) that the answers pool lacks and add them to
    it, without training -> (answers in the pool, answers added)."""
    from hybrid.demo import resolve_model
    from hybrid.verifiers.hf import HFVerifier

    if not cfg.prompts:
        raise UserError("nothing to answer: give --prompts FILE.jsonl")
    path = answers_file(cfg)
    pool = read_answers(path)
    before = len(pool)
    if prompts is None:
        prompts = prompt_tokens(cfg, verifier_tokenizer(cfg.verifier))
    todo = sorted({tuple(p) for p in prompts} - set(pool), key=len)
    if not todo or cfg.gen_backend == "pool":  # "pool": train on the answers there are, answer nothing
        return before, 0
    if cfg.gen_backend == "vllm":
        from hybrid.drafters.vllm_answers import answer_with_vllm

        pool = answer_with_vllm(resolve_model(cfg.verifier), [list(p) for p in todo], cfg.gen_tokens, cfg.dtype, path)
        return len(pool), len(pool) - before
    verifier = HFVerifier.from_pretrained(cfg.verifier, getattr(torch, cfg.dtype))
    for i in range(0, len(todo), cfg.gen_batch):  # similar lengths together: little padding
        batch = [list(p) for p in todo[i : i + cfg.gen_batch]]
        feats = generate_features(verifier, [0], batch, cfg.gen_tokens)
        append_answers(path, [(p, answer_of(f)) for p, f in zip(batch, feats)])
        if progress:
            print(f"answered {min(i + cfg.gen_batch, len(todo))}/{len(todo)}", flush=True)
    return before + len(todo), len(todo)


# -- features -------------------------------------------------------------------------------
@contextmanager
def layer_outputs(verifier, layer_ids: list[int]):
    """While open: every forward's output of each target layer, appended to out[i] ([B, s, Ht], bf16)."""
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layer_ids}
    hooks = [
        verifier.body.layers[i].register_forward_hook(
            lambda m, a, o, i=i: out[i].append((o[0] if isinstance(o, tuple) else o).to(torch.bfloat16)))
        for i in layer_ids
    ]
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()


@torch.inference_mode()
def featurise(verifier, layer_ids: list[int], chunk: list[int], start: int = 0, soft_k: int = 0) -> dict:
    """One verifier pass over a chunk -> hidden [S, L*Ht] of the target layers, greedy predictions [S]
    (pred[i] predicts chunk[i+1]; before `start`, where no loss is taken, the chunk's own next token), and with
    soft_k the verifier's top soft_k next-token probabilities (soft_targets)."""
    with layer_outputs(verifier, layer_ids) as captured:
        out = verifier.body(input_ids=torch.tensor([chunk], device=verifier.device), use_cache=False)
        pred = torch.tensor(chunk[1:] + [chunk[-1]])  # [S]
        logits = verifier.head(out.last_hidden_state[0, start:])  # [S - start, V]
        pred[start:] = logits.argmax(-1).cpu()
    hidden = torch.cat([captured[i][0][0] for i in sorted(layer_ids)], -1)  # [S, L*Ht]
    feat = {"tokens": torch.tensor(chunk), "hidden": hidden.cpu(), "pred": pred}
    if soft_k:
        feat.update(soft_targets(logits, pred, start, soft_k))
    return feat


def soft_targets(logits: torch.Tensor, pred: torch.Tensor, start: int, k: int) -> dict:
    """The verifier's k most probable next tokens and their probabilities at positions start.. (logits [S - start, V])
    -> soft_ids [S, k] int32, soft_probs [S, k] float16, most probable first; before `start`, where no loss is
    taken, the chunk's own next token with probability 1."""
    S = pred.shape[0]
    ids = torch.zeros(S, k, dtype=torch.int32)
    probs = torch.zeros(S, k, dtype=torch.float16)
    ids[:start, 0], probs[:start, 0] = pred[:start].int(), 1.0
    top = torch.softmax(logits.float(), -1).topk(k, -1)
    ids[start:], probs[start:] = top.indices.int().cpu(), top.values.half().cpu()
    return {"soft_ids": ids, "soft_probs": probs}


def through_eos(answer: list[int], eos_token_ids) -> list[int]:
    """An answer up to and including its first EOS (all of it when there is none)."""
    return answer[: next((j + 1 for j, t in enumerate(answer) if t in eos_token_ids), len(answer))]


def answer_features(verifier, layer_ids: list[int], prompt: list[int], answer: list[int], soft_k: int = 0) -> dict:
    """Features of an answer produced elsewhere (vLLM), in generate_features' layout: one verifier pass
    over prompt + answer; start = the prompt's last index."""
    full = list(prompt) + through_eos(list(answer), verifier.eos_token_ids)
    feat = featurise(verifier, layer_ids, full[:-1], start=len(prompt) - 1, soft_k=soft_k)
    feat["start"] = len(prompt) - 1
    return feat


def load_or_build_features(cfg: TrainConfig, verifier, layer_ids: list[int], chunks: list[list[int]], progress=True):
    cache = Path(cfg.out) / "features"
    cache.mkdir(parents=True, exist_ok=True)
    feats = []
    from tqdm import tqdm

    bar = tqdm(total=len(chunks), desc="verifier features", unit="chunk", disable=not progress)
    t0, done_tokens = time.perf_counter(), 0
    for i, chunk in enumerate(chunks):
        f = cache / f"{i:05d}.pt"
        d = torch.load(f) if f.exists() else None
        if d is not None and has_soft_targets(d, cfg.soft_targets):
            feats.append(d)
        else:
            d = featurise(verifier, layer_ids, chunk, soft_k=cfg.soft_targets)
            torch.save(d, f)
            feats.append(d)
            done_tokens += len(chunk)
        bar.update(1)
        bar.set_postfix(tok_s=f"{done_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    return feats


@torch.inference_mode()
def generate_features(verifier, layer_ids: list[int], prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """The verifier answers a batch of prompts greedily; per answer: tokens [S], the target layers' hidden
    states [S, L*Ht] of that same pass, pred [S] (pred[i] = token i+1) and start = the prompt's last index."""
    model, tok = verifier.model, verifier.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(verifier.eos_token_ids))
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    # only the target layers are kept (output_hidden_states would hold every layer of every step)
    with layer_outputs(verifier, layer_ids) as captured:  # per layer: the prefill, then one [B, 1, Ht] per step
        seqs = model.generate(input_ids=ids.to(verifier.device), attention_mask=mask.to(verifier.device),
                              max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                              temperature=None, top_p=None, top_k=None).cpu()  # [B, P + n]
    hidden = torch.cat([torch.cat(captured[i], 1) for i in sorted(layer_ids)], -1)  # [B, P+n-1, L*Ht]
    feats = []
    for b, p in enumerate(prompts):
        answer = through_eos(seqs[b, P:].tolist(), verifier.eos_token_ids)
        full = seqs[b, P - len(p): P + len(answer)]  # prompt + answer (through the first EOS)
        n = len(full) - 1  # positions with a hidden state and a known next token
        feats.append({"tokens": full[:n].clone(), "pred": full[1:].clone(), "start": len(p) - 1,
                      "hidden": hidden[b, P - len(p): P - len(p) + n].cpu().clone()})
    return feats


def answer_of(feat: dict) -> list[int]:
    """The answer tokens of a self-distillation feature (everything after the prompt)."""
    return feat["tokens"][feat["start"] + 1 :].tolist() + feat["pred"][-1:].tolist()


def answers_file(cfg: TrainConfig) -> Path:
    """The answers pool this run reads and adds to (hybrid.drafters.answers)."""
    return Path(cfg.answers) if cfg.answers else Path(cfg.out) / f"answers-{cfg.gen_tokens}.jsonl.gz"


def prompt_key(feat: dict) -> tuple[int, ...]:
    """The prompt a cached answer answers: its tokens through `start`."""
    return tuple(feat["tokens"][: feat["start"] + 1].tolist())


def has_soft_targets(feat: dict, k: int) -> bool:
    """Whether cached features hold the verifier's top k probabilities (k = 0: none needed)."""
    return not k or ("soft_ids" in feat and feat["soft_ids"].shape[1] >= k)


def load_feature_cache(cache: Path) -> dict[tuple[int, ...], dict]:
    """Every cached answer's features in `cache`, by prompt, whichever run and batch wrote them."""
    return {prompt_key(f): f for file in sorted(cache.glob("*.pt")) for f in torch.load(file)}


def feature_cache_dir(cfg: TrainConfig, layer_ids: list[int]) -> Path:
    """The self-distillation feature cache (cfg.feature_cache or OUT/generated), checked against its features.json:
    the target layers and soft targets its features hold, written by the run that creates it."""
    cache = Path(cfg.feature_cache) if cfg.feature_cache else Path(cfg.out) / "generated"
    cache.mkdir(parents=True, exist_ok=True)
    meta_file = cache / "features.json"
    meta = {"verifier": cfg.verifier, "target_layer_ids": sorted(layer_ids), "soft_targets": cfg.soft_targets}
    if not meta_file.exists():  # a cache from before features.json holds no soft targets
        meta_file.write_text(json.dumps({**meta, "soft_targets": 0 if any(cache.glob("*.pt")) else cfg.soft_targets}))
    have = json.loads(meta_file.read_text())
    if have["target_layer_ids"] != meta["target_layer_ids"]:
        raise UserError(f"{cache} holds verifier layers {have['target_layer_ids']}, this drafter reads "
                        f"{meta['target_layer_ids']}: give another --feature-cache")
    if have.get("soft_targets", 0) < cfg.soft_targets:
        raise UserError(f"{cache} holds the verifier's top {have.get('soft_targets', 0)} probabilities, --soft-targets "
                        f"asks {cfg.soft_targets}: give another --feature-cache")
    return cache


def load_or_generate_features(cfg: TrainConfig, verifier, layer_ids: list[int], prompts: list[list[int]],
                              progress=True) -> list[dict]:
    """Self-distillation features, generated in batches of similar prompt length and cached per prompt
    (files of one batch each): a run with more prompts only answers the new ones. With gen_backend "pool"
    only the prompts the answers pool has answered are used, and none is answered."""
    from tqdm import tqdm

    cache = feature_cache_dir(cfg, layer_ids)
    pool_file = answers_file(cfg)
    pool = read_answers(pool_file)  # the verifier's answers from earlier runs, on any machine
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    if cfg.gen_backend == "pool":
        order = [i for i in order if tuple(prompts[i]) in pool]
    batches = [order[i: i + cfg.gen_batch] for i in range(0, len(order), cfg.gen_batch)]
    random.Random(cfg.seed).shuffle(batches)  # a partial run still covers every prompt length
    batches = batches[: cfg.gen_batches]
    # answers cached without the soft targets this run asks (a run without them wrote into the cache beside one
    # with them) are featurised again, into a later file that supersedes theirs
    cached = {k: f for k, f in load_feature_cache(cache).items() if has_soft_targets(f, cfg.soft_targets)}
    todo = [[i for i in batch if tuple(prompts[i]) not in cached] for batch in batches]
    unanswered = [i for t in todo for i in t if tuple(prompts[i]) not in pool]
    if cfg.gen_backend == "vllm" and unanswered:
        from hybrid.demo import resolve_model
        from hybrid.drafters.vllm_answers import answer_with_vllm

        pool = answer_with_vllm(resolve_model(cfg.verifier), [prompts[i] for i in unanswered], cfg.gen_tokens,
                                cfg.dtype, pool_file)
    elif unanswered and cfg.soft_targets:
        raise UserError(f"--soft-targets: {len(unanswered)} prompts have no answer in the pool, and transformers' generate "
                        "keeps no probabilities: answer them first (--answers-only, or --gen-backend vllm)")
    bar = tqdm(total=sum(map(len, todo)), desc="verifier answers", unit="answer", disable=not progress or not any(todo))
    done = 0
    next_file = max((int(f.stem) + 1 for f in cache.glob("*.pt") if f.stem.isdigit()), default=0)
    for batch in filter(None, todo):
        t0, c0 = time.perf_counter(), time.process_time()
        known = [i for i in batch if tuple(prompts[i]) in pool]  # answered before: one verifier pass each
        got = [answer_features(verifier, layer_ids, prompts[i], pool[tuple(prompts[i])], cfg.soft_targets) for i in known]
        new = [i for i in batch if tuple(prompts[i]) not in pool]
        if new:  # answered now by transformers' generate, whose pass gives the hidden states too
            fresh = generate_features(verifier, layer_ids, [prompts[i] for i in new], cfg.gen_tokens)
            append_answers(pool_file, [(prompts[i], answer_of(f)) for i, f in zip(new, fresh)])
            pool.update((tuple(prompts[i]), answer_of(f)) for i, f in zip(new, fresh))
            got += fresh
        torch.save(got, cache / f"{next_file:05d}.pt")
        with open(cache / "featurise.jsonl", "a") as f:  # what featurising cost: a share of each run's CPU budget
            f.write(json.dumps({"file": next_file, "answers": len(got), "positions": sum(len(g["tokens"]) for g in got),
                                "wall_s": round(time.perf_counter() - t0, 1),
                                "cpu_s": round(time.process_time() - c0, 1)}) + "\n")
        next_file += 1
        cached.update((prompt_key(g), g) for g in got)
        done += sum(len(g["tokens"]) for g in got)
        bar.update(len(batch))
        bar.set_postfix(pos=done)
    bar.close()
    feats = [cached[tuple(prompts[i])] for batch in batches for i in batch]
    return [f for f in feats if len(f["tokens"]) - cfg.block_size - 1 > f["start"]]


def split_holdout(feats: list[dict], prompts: list[list[int]], n: int) -> tuple[list[dict], list[dict]]:
    """(held out, training): the first n usable answers in prompt order, as parallel drafter runs hold out
    (hybrid.drafters.parallel_train.sequences), so drafters of both kinds are measured on the same answers."""
    by_prompt = {prompt_key(f): f for f in feats}
    first = [by_prompt[tuple(p)] for p in prompts if tuple(p) in by_prompt][:n]
    held = {prompt_key(f) for f in first}
    return first, [f for f in feats if prompt_key(f) not in held]


def loss_vocabulary(feats: list[dict], size: int, vocab_size: int | None = None) -> torch.Tensor | None:
    """`size` token ids (sorted), or None for size 0: those the verifier predicts at trainable positions,
    most frequent first, then, up to `size`, the lowest ids not seen (byte-level BPE vocabularies number
    tokens in merge order, so low ids are the common ones), so that the drafter also learns to rank
    tokens its training text lacks, and drafts can still hold them."""
    if not size:
        return None
    preds = torch.cat([f["pred"][f.get("start", 1):] for f in feats])
    counts = torch.bincount(preds, minlength=vocab_size or 0)
    ranked = counts.argsort(descending=True, stable=True)  # seen by frequency, then unseen by id
    return ranked[:size].sort().values


# -- batches --------------------------------------------------------------------------------
def on_policy_rows(x: torch.Tensor, tgt: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """[nb, B] bool: block row k is on-policy while the corpus agrees with the verifier's predictions on
    rows < k (the verifier's greedy continuation is then known). x [S] corpus; tgt [nb, B]; anchors [nb]."""
    B = tgt.shape[1]
    agree = x[anchors[:, None] + torch.arange(1, B + 1)[None]] == tgt  # corpus token == verifier's prediction
    return torch.cat([torch.ones(len(anchors), 1, dtype=torch.bool), agree[:, :-1].cumprod(1).bool()], 1)


def make_batch(feat: dict, cfg: TrainConfig, mask_id: int, g: torch.Generator):
    """Anchors for one chunk -> block ids [nb, B+1], positions [nb, B+1], targets [nb, B], weights [nb, B],
    loss mask [nb, B], anchors [nb]."""
    x, t = feat["tokens"], feat["pred"]  # x [S]; t[i] predicts x[i+1]
    S, B = x.shape[0], cfg.block_size
    nb = cfg.anchors
    anchors = torch.randint(int(feat.get("start", 1)), S - B, (nb,), generator=g)  # context >= 1 position
    k = torch.arange(1, B + 1)  # [B]
    tgt = t[anchors[:, None] + k[None] - 1]  # [nb, B]: verifier's prediction of position a+k
    on_policy = on_policy_rows(x, tgt, anchors)
    w = torch.exp(-(k - 1).float() / cfg.gamma)[None].expand(nb, B).clone()
    w = torch.where(on_policy, w, w * cfg.off_policy_weight)
    ids = torch.full((nb, B + 1), mask_id, dtype=torch.long)
    ids[:, 0] = x[anchors]
    masked = torch.ones(nb, B, dtype=torch.bool)
    partial = torch.rand(nb, generator=g) < cfg.partial_mask_share
    ratio = torch.rand(nb, 1, generator=g)  # share of rows revealed in a partial block
    reveal = (torch.rand(nb, B, generator=g) < ratio) & partial[:, None]
    reveal &= ~reveal.all(1, keepdim=True)  # keep at least one masked row
    ids[:, 1:] = torch.where(reveal, tgt, ids[:, 1:])
    masked &= ~reveal
    positions = anchors[:, None] + torch.arange(B + 1)[None]  # [nb, B+1]
    return ids, positions, tgt, w, masked, anchors


def block_attention_mask(anchors: torch.Tensor, S: int, B: int) -> torch.Tensor:
    """[nb, 1, B+1, S + B+1] bool: a block sees context positions < its anchor and all its own rows."""
    ctx_ok = torch.arange(S)[None] < anchors[:, None]  # [nb, S]
    own = torch.ones(anchors.shape[0], B + 1, dtype=torch.bool)
    return torch.cat([ctx_ok, own], 1)[:, None, None, :].expand(-1, 1, B + 1, -1)


def blocks_forward(drafter, embed, feat, ids, positions, anchors, B: int) -> torch.Tensor:
    """All blocks of a chunk in one drafter pass: each sees the context before its anchor -> [nb, B+1, H]."""
    model = drafter.model
    S = feat["hidden"].shape[0]
    ctx_feats = model.context(feat["hidden"].to(model.fc.weight.dtype))  # [S, H]
    nb = ids.shape[0]
    ctx_kv = [(k[None].expand(nb, -1, -1, -1), v[None].expand(nb, -1, -1, -1))  # [nb, S, h, d], no copy
              for k, v in model.context_kv(ctx_feats, torch.arange(S))]
    return model(embed(ids), positions, ctx_kv, block_attention_mask(anchors, S, B))


def soft_targets_of(feat: dict, anchors: torch.Tensor, B: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The verifier's top-k next tokens for each block row -> ids [nb, B, k], probabilities renormalised over
    those k [nb, B, k]; row j of anchor a predicts position a + j + 1, as its hard target does."""
    at = anchors[:, None] + torch.arange(B)[None]  # [nb, B]
    ids = feat["soft_ids"][at][..., :k].long()
    p = feat["soft_probs"][at][..., :k].float()
    return ids, p / p.sum(-1, keepdim=True)


def block_logits_loss(drafter: DiffusionDrafter, embed, head, feat, batch, B: int, vocab: torch.Tensor | None = None,
                      soft_k: int = 0, soft_weight: float = 1.0):
    """Weighted cross-entropy of the masked rows, over `vocab` (sorted ids) plus the batch's targets, or
    the full vocabulary; returns (loss, accuracy of masked rows within that vocabulary).

    With soft_k, each row's loss is (1 - soft_weight) x the hard target's cross-entropy + soft_weight x the
    cross-entropy against the verifier's top soft_k probabilities, renormalised (soft_targets_of); those
    tokens join the softmax's vocabulary as the targets do."""
    ids, positions, tgt, w, masked, anchors = batch
    h = blocks_forward(drafter, embed, feat, ids, positions, anchors, B)  # [nb, B+1, H]
    rows = h[:, 1:][masked]  # [m, H]
    target = tgt[masked]  # [m]
    if soft_k:
        soft_ids, soft_p = (x[masked] for x in soft_targets_of(feat, anchors, B, soft_k))  # [m, k]
    if vocab is None:
        logits = head(rows).float()  # [m, V]
    else:
        vocab = torch.unique(torch.cat([vocab, target] + ([soft_ids.flatten()] if soft_k else [])))  # [V'] sorted
        bias = None if head.bias is None else head.bias[vocab]
        logits = F.linear(rows, head.weight[vocab], bias).float()  # [m, V']
        target = torch.searchsorted(vocab, target)
        if soft_k:
            soft_ids = torch.searchsorted(vocab, soft_ids)
    logp = torch.log_softmax(logits, -1)
    ce = -logp.gather(1, target[:, None])[:, 0]  # [m]
    if soft_k:
        ce = (1 - soft_weight) * ce - soft_weight * (soft_p * logp.gather(1, soft_ids)).sum(-1)
    ww = w[masked]
    loss = (ce * ww).sum() / ww.sum()
    acc = (logits.argmax(-1) == target).float().mean()
    return loss, acc


@torch.no_grad()
def heldout_acceptance(drafter, embed, feats, B: int, stride: int = 4) -> dict:
    """Teacher-forced acceptance, defined as for parallel drafters (hybrid.drafters.parallel_train.heldout_acceptance):
    at every `stride`-th answer position a the block [x_a, mask x B] is drafted in one pass and accepted while it
    matches the verifier's answer x_{a+1..a+B} -> {"tau": mean accepted + 1, "per_position": acceptance rate at
    each draft position, "blocks"}. Corpus chunks (no answer) count a row only while the text agrees with the
    verifier's predictions, since past that the verifier's own continuation is unknown."""
    from hybrid.drafters.parallel_train import block_acceptance

    oks, k = [], torch.arange(B)
    for feat in feats:
        x = feat["tokens"]
        anchors = torch.arange(int(feat.get("start", 1)), x.shape[0] - B, stride)  # [A]; a + B <= last index
        if not len(anchors):
            continue
        ids = torch.full((len(anchors), B + 1), drafter.config.mask_token_id, dtype=torch.long)
        ids[:, 0] = x[anchors]
        positions = anchors[:, None] + torch.arange(B + 1)[None]  # [A, B+1]
        h = blocks_forward(drafter, embed, feat, ids, positions, anchors, B)
        draft = drafter.draft_logits(h[:, 1:]).argmax(-1)  # [A, B] indices into the draft vocabulary
        if drafter.draft_vocab is not None:
            draft = drafter.draft_vocab[draft]
        truth = x[anchors[:, None] + k[None] + 1]  # [A, B]
        ok = draft == truth
        if "start" not in feat:
            ok &= truth == feat["pred"][anchors[:, None] + k[None]]  # the text is the verifier's prediction
        oks.append(ok)
    return block_acceptance(oks, B)


# -- the training run -----------------------------------------------------------------------
def new_drafter(cfg: TrainConfig, verifier) -> DiffusionDrafter:
    """The drafter to train, shaped by cfg, or by the verifier's decoder layers with init_layers_from_verifier."""
    from hybrid.drafters.init_layers import check_layer_ids, verifier_layer_shape

    shape = {"num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
             "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
             "intermediate_size": cfg.intermediate_size}
    if cfg.init_layers_from_verifier:
        if cfg.init:
            raise UserError("--init-layers-from-verifier starts a new drafter: leave out --init")
        check_layer_ids(verifier, cfg.init_layers_from_verifier)
        shape = {**verifier_layer_shape(verifier), "num_hidden_layers": len(cfg.init_layers_from_verifier)}
    return DiffusionDrafter.for_verifier(verifier, block_size=cfg.block_size, max_steps=cfg.max_steps,
                                         target_layer_ids=cfg.target_layer_ids, **shape)


def training_features(cfg: TrainConfig, verifier, layer_ids: list[int], progress: bool) -> tuple[list[dict], list[dict]]:
    """(held out, training) features of the corpus chunks and the prompts' answers."""
    corpus_feats, gen_held, gen_train = [], [], []
    if cfg.corpus:
        chunks = corpus_chunks(iter_corpus_files(cfg.corpus), verifier.tokenizer, cfg.seq_len,
                               cfg.max_chunks + cfg.holdout_chunks, cfg.seed, cfg.chat_share)
        if len(chunks) <= cfg.holdout_chunks:
            raise UserError(f"corpus gives only {len(chunks)} chunks of {cfg.seq_len} tokens: add text or lower --seq-len")
        corpus_feats = load_or_build_features(cfg, verifier, layer_ids, chunks, progress)
    if cfg.prompts:
        prompts = prompt_tokens(cfg, verifier)
        gen_feats = load_or_generate_features(cfg, verifier, layer_ids, prompts, progress)
        if len(gen_feats) <= cfg.holdout_chunks:
            raise UserError(f"--prompts gave only {len(gen_feats)} usable answers: add prompts or raise --gen-tokens")
        gen_held, gen_train = split_holdout(gen_feats, prompts, cfg.holdout_chunks)
    return corpus_feats[: cfg.holdout_chunks] + gen_held, corpus_feats[cfg.holdout_chunks:] + gen_train


def build_features(cfg: TrainConfig, progress: bool = True) -> dict:
    """Featurise the corpus and the prompts' answers into the caches and stop (`train-drafter --features-only`)."""
    from hybrid.verifiers.hf import HFVerifier

    verifier = HFVerifier.from_pretrained(cfg.verifier, getattr(torch, cfg.dtype))
    t0 = time.perf_counter()
    held, train_feats = training_features(cfg, verifier, new_drafter(cfg, verifier).capture_layers, progress)
    feats = held + train_feats
    return {"answers": len(feats), "positions": sum(len(f["tokens"]) for f in feats),
            "wall_s": round(time.perf_counter() - t0, 1)}


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    from tqdm import tqdm

    from hybrid.verifiers.hf import HFVerifier

    if cfg.init_from:
        from hybrid.drafters.parallel_train import train_parallel

        return train_parallel(cfg, progress)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.corpus and not cfg.prompts:
        raise UserError("nothing to train on: give --corpus PATH and/or --prompts FILE.jsonl")
    dtype = getattr(torch, cfg.dtype)
    verifier = HFVerifier.from_pretrained(cfg.verifier, dtype)
    for p in verifier.model.parameters():
        p.requires_grad_(False)

    drafter = new_drafter(cfg, verifier)
    init = None
    if cfg.init:
        init = DiffusionDrafter.load(cfg.init, verifier)
        if init.capture_layers != drafter.capture_layers:
            raise UserError(f"--init {cfg.init} reads verifier layers {init.capture_layers}, not {drafter.capture_layers}")
        try:
            drafter.model.load_state_dict(init.model.state_dict())
        except RuntimeError as e:
            raise UserError(f"--init {cfg.init} has another architecture than the one asked for: {str(e).splitlines()[0]}")
    drafter.config.verifier = cfg.verifier
    drafter.model.float().train()
    layer_ids = drafter.capture_layers

    holdout, train_feats = training_features(cfg, verifier, layer_ids, progress)
    (out / "holdout-prompts.json").write_text(json.dumps(
        [f["tokens"][: f["start"] + 1 if "start" in f else min(128, cfg.seq_len // 2)].tolist() for f in holdout]))
    if cfg.init_layers_from_verifier:
        from hybrid.drafters.init_layers import copy_verifier_layers

        copy_verifier_layers(drafter.model, verifier, cfg.init_layers_from_verifier,
                             [f["tokens"] for f in train_feats[:4]])  # q/k norm calibration text, if needed
    if init is not None and init.draft_vocab is not None and cfg.loss_vocab == init.draft_vocab.numel():
        vocab = init.draft_vocab.cpu()  # go on with the vocabulary --init learnt on all of its data, not this run's
    else:
        vocab = loss_vocabulary(train_feats, cfg.loss_vocab, verifier.vocab_size)
    drafter.set_draft_vocab(vocab)  # it also drafts from the tokens it was trained to tell apart

    opt = torch.optim.AdamW(drafter.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    g = torch.Generator().manual_seed(cfg.seed)
    start, seen, curve = 0, 0, []  # target tokens: rows with a loss
    before = {"wall_s": 0.0, "cpu_s": 0.0}  # wall and CPU (all threads) seconds of training before this process
    ckpt = out / "checkpoint.pt"
    if cfg.extra.get("resume") and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        drafter.model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        seen, curve = state["seen"], state["curve"]
        before = {"wall_s": state["wall_s"], "cpu_s": state["cpu_s"]}

    embed, head = verifier.model.get_input_embeddings(), verifier.head
    autocast = dict(device_type="cpu", dtype=dtype, enabled=verifier.device.type == "cpu" and dtype != torch.float32)
    t0, c0 = time.perf_counter(), time.process_time()

    def clocks() -> dict:
        return {"wall_s": round(before["wall_s"] + time.perf_counter() - t0, 1),
                "cpu_s": round(before["cpu_s"] + time.process_time() - c0, 1)}

    def evaluate(step: int) -> dict:
        drafter.model.eval()
        with torch.autocast(**autocast):
            r = heldout_acceptance(drafter, embed, holdout, cfg.block_size)
        drafter.model.train()
        curve.append({"step": step, "target_tokens": seen, **clocks(), **r})
        (out / "curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in curve))
        if progress:
            tqdm.write(f"step {step}: {seen} target tokens, held-out tau {r['tau']:.2f} "
                       f"{[round(x, 2) for x in r['per_position']]}")
        return r

    if start == 0:
        evaluate(0)  # where the curve starts
    order = torch.randperm(len(train_feats), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    bar = tqdm(range(start, cfg.steps), desc="train drafter", unit="step", disable=not progress, initial=start, total=cfg.steps)
    loss_ema = None
    history = []
    for step in bar:
        feat = train_feats[order[step % len(order)]]
        batch = make_batch(feat, cfg, drafter.config.mask_token_id, g)
        with torch.autocast(**autocast):
            loss, acc = block_logits_loss(drafter, embed, head, feat, batch, cfg.block_size, vocab,
                                          cfg.soft_targets, cfg.soft_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.model.parameters(), 1.0)
        opt.step()
        sched.step()
        seen += int(batch[4].sum())
        loss_v = loss.item()
        loss_ema = loss_v if loss_ema is None else 0.95 * loss_ema + 0.05 * loss_v
        bar.set_postfix(loss=f"{loss_ema:.3f}", acc=f"{float(acc):.2f}", tok=seen)
        history.append({"step": step + 1, "loss": loss_v, "acc": acc.item()})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evaluate(step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(drafter, opt, sched, g, step + 1, cfg, out, {"seen": seen, **clocks(), "curve": curve})
        if step + 1 == cfg.extra.get("stop_after"):  # an interrupted run (tests)
            return {"stopped_at": step + 1}
    drafter.model.eval()
    report = {"steps": cfg.steps, "final_loss_ema": loss_ema, "heldout": curve[-1],
              "heldout_teacher_forced_tau": curve[-1]["tau"], "target_tokens": seen,
              "train_chunks": len(train_feats), "train_positions": sum(len(f["tokens"]) for f in train_feats),
              "seq_len": cfg.seq_len}
    drafter.config.training = {**asdict(cfg), "report": report}
    save_drafter(drafter, out, verifier.dtype)
    (out / "history.jsonl").write_text("\n".join(json.dumps(h) for h in history))
    return report


def save_drafter(drafter: DiffusionDrafter, out: Path, dtype) -> None:
    """The drafter folder (config.json + model.safetensors) in the verifier's dtype."""
    model = drafter.model
    was = next(model.parameters()).dtype
    model.to(dtype)
    drafter.save(out)
    model.to(was)


def save_checkpoint(drafter, opt, sched, g, step, cfg, out: Path, progress: dict) -> None:
    """Everything an exact resume needs; progress: target tokens seen, wall seconds and the curve so far."""
    state = {"model": drafter.model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "gen": g.get_state(), "torch_rng": torch.get_rng_state(), "step": step, "config": asdict(cfg), **progress}
    tmp = out / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "checkpoint.pt")
    drafter.config.training = {**asdict(cfg), "step": step}
    save_drafter(drafter, out, torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)


def evaluate_engine(cfg: TrainConfig) -> dict:
    """Real acceptance: run the engine (greedy) on held-out corpus prompts with the trained drafter,
    and check the output equals plain decoding."""
    from hybrid.engine import Engine, GenerationConfig
    from hybrid.verifiers.hf import HFVerifier

    verifier = HFVerifier.from_pretrained(cfg.verifier, getattr(torch, cfg.dtype))
    held = json.loads((Path(cfg.out) / "holdout-prompts.json").read_text())
    prompts = held[-cfg.eval_prompts:]  # answers to prompts when there are any, else corpus text
    gen = GenerationConfig(max_new_tokens=cfg.eval_tokens, block_size=cfg.block_size, stop_on_eos=False)
    plain = Engine(verifier, None)
    ref = [plain.generate(p, gen).token_ids for p in prompts]
    from hybrid.drafters import load_drafter

    engine = Engine(verifier, load_drafter(cfg.out, verifier))
    results = [engine.generate(p, gen) for p in prompts]
    taus = [t for r in results for t in r.acceptance_lengths]
    return {"mean_acceptance_length": sum(taus) / len(taus), "rounds": len(taus),
            "identical": all(r.token_ids == t for r, t in zip(results, ref))}
