"""Adapt a pretrained causal LM into a parallel drafter (`hybrid train-drafter --init-from MODEL`; PARD's recipe,
arXiv 2504.18583, with LoRA).

Data: the verifier's own greedy answers to the --prompts, from the answers pool (hybrid.drafters.answers;
prompts it lacks are answered first). A sequence is prompt + answer, cut to its last `seq_len` tokens.

One training step, one sequence s of L tokens whose answer starts after index `start`:
- the ordinary next-token loss at every answer position i (target s[i+1]): draft position 1, which is the
  model's own next-token prediction and must stay as good as it is;
- `anchors` blocks appended after s: for an anchor a, mask tokens at positions a+1 .. a+B-1, each seeing the
  real tokens up to a and the block's earlier masks (causal, as at inference), mask j learning s[a+1+j],
  weighted exp(-j/gamma) (DFlash's decay over the block).
Every row's target is the verifier's token, so the drafter learns what this verifier says next.

Progress is a learning curve: every `eval_every` steps, the held-out acceptance length with teacher forcing
(a block drafted at every answer position of held-out answers, accepted while it matches the verifier's
answer) next to the target tokens trained on so far; written to OUT/curve.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from hybrid.errors import UserError

ADAPTER_KEY = ".lora_"  # peft's names: <module>.lora_A.default.weight


def block_layout(L: int, start: int, anchors: list[int], B: int):
    """The input layout of a sequence of L real tokens with a mask block after each anchor.

    -> (positions [T], attention [T, T] bool (True: attend), rows [T] index of the real token each row's target
    follows, offsets [T] draft position - 1 of each row's target (0: the ordinary next token; -1: no target)).
    T = L + len(anchors) * (B - 1). Real row i (i >= start) predicts s[i+1] (offset 0); mask j of anchor a
    sits at position a + j and predicts s[a + 1 + j] (offset j).
    """
    n_mask = len(anchors) * (B - 1)
    T = L + n_mask
    positions = torch.cat([torch.arange(L)] + [torch.arange(a + 1, a + B) for a in anchors]).long()
    attn = torch.zeros(T, T, dtype=torch.bool)
    attn[:L, :L] = torch.ones(L, L, dtype=torch.bool).tril()
    rows = torch.full((T,), -1, dtype=torch.long)
    offsets = torch.full((T,), -1, dtype=torch.long)
    rows[start : L - 1] = torch.arange(start, L - 1)
    offsets[start : L - 1] = 0
    for b, a in enumerate(anchors):
        lo = L + b * (B - 1)
        attn[lo : lo + B - 1, : a + 1] = True  # the real tokens up to the anchor
        attn[lo : lo + B - 1, lo : lo + B - 1] = torch.ones(B - 1, B - 1, dtype=torch.bool).tril()
        j = torch.arange(1, B)
        ok = a + 1 + j < L  # a target inside the sequence
        rows[lo : lo + B - 1] = torch.where(ok, torch.full_like(j, a), -1)
        offsets[lo : lo + B - 1] = torch.where(ok, j, -1)
    return positions, attn, rows, offsets


def forward_rows(model, seq: torch.Tensor, positions, attn, mask_id: int, want: torch.Tensor) -> torch.Tensor:
    """Logits [len(want), V] at rows `want` of one pass over seq followed by mask tokens (layout: block_layout)."""
    T = positions.numel()
    ids = torch.cat([seq, torch.full((T - seq.numel(),), mask_id, dtype=torch.long)])
    hidden = model.model(input_ids=ids[None], position_ids=positions[None],
                         attention_mask=attn[None, None]).last_hidden_state[0]  # [T, H]
    return model.lm_head(hidden[want]).float()  # [N, V]


def targets_of(seq: torch.Tensor, rows, offsets) -> torch.Tensor:
    """The token each row learns: s[row + 1 + offset] -> [T] (-1: none)."""
    idx = (rows + 1 + offsets).clamp(0, seq.numel() - 1)
    return torch.where(rows >= 0, seq[idx], -1)


def step_loss(model, seq, start: int, anchors: list[int], B: int, mask_id: int, gamma: float):
    """Weighted cross-entropy of one sequence's rows (block_layout) -> (loss, target tokens)."""
    positions, attn, rows, offsets = block_layout(seq.numel(), start, anchors, B)
    tgt = targets_of(seq, rows, offsets)
    want = (tgt >= 0).nonzero()[:, 0]
    logits = forward_rows(model, seq, positions, attn, mask_id, want)
    w = torch.exp(-offsets[want].float() / gamma)  # [N] draft position k weighs exp(-(k-1)/gamma)
    ce = F.cross_entropy(logits, tgt[want], reduction="none")
    return (w * ce).sum() / w.sum(), int(want.numel())


@torch.no_grad()
def heldout_acceptance(model, seqs, B: int, mask_id: int, stride: int = 4) -> dict:
    """Teacher-forced acceptance: at every `stride`-th answer position a block is drafted in one pass and accepted
    while it matches the verifier's answer -> {"tau": mean accepted + 1, "per_position": acceptance rate at k}."""
    oks = []
    for seq, start in seqs:
        L = seq.numel()
        anchors = list(range(start, L - B - 1, stride))
        if not anchors:
            continue
        positions, attn, rows, offsets = block_layout(L, start, anchors, B)
        want_rows = torch.cat([torch.tensor(anchors), L + torch.arange(len(anchors) * (B - 1))])
        logits = forward_rows(model, seq, positions, attn, mask_id, want_rows)
        first = logits[: len(anchors)].argmax(-1)[:, None]  # [A, 1] draft position 1
        rest = logits[len(anchors) :].argmax(-1).view(len(anchors), B - 1)  # [A, B-1]
        draft = torch.cat([first, rest], 1)  # [A, B]
        truth = torch.stack([seq[a + 1 : a + 1 + B] for a in anchors])  # [A, B]
        oks.append(draft == truth)
    return block_acceptance(oks, B)


def block_acceptance(oks: list[torch.Tensor], B: int) -> dict:
    """The held-out measure shared by every drafter kind: per block, whether each draft position matches the
    verifier ([A, B] bool, any number of blocks per answer); a block is accepted through its first miss ->
    {"tau": mean accepted + 1, "per_position": acceptance rate at each draft position, "blocks"}."""
    accepted, reach = [], torch.zeros(B)
    for ok in oks:
        ok = ok.int().cumprod(1)  # [A, B] accepted prefix
        accepted += ok.sum(1).tolist()
        reach += ok.sum(0).float()
    n = max(len(accepted), 1)
    return {"tau": 1 + sum(accepted) / n, "per_position": (reach / n).tolist(), "blocks": len(accepted)}


def sequences(cfg, tokenizer, progress: bool = True) -> list[tuple[torch.Tensor, int]]:
    """(prompt + answer ids [L], index of the prompt's last token) per prompt, from the answers pool."""
    from hybrid.drafters.answers import read_answers
    from hybrid.drafters.train import answers_file, fill_answers, prompt_tokens

    prompts = prompt_tokens(cfg, tokenizer)
    fill_answers(cfg, progress, prompts)  # answers the prompts the pool lacks
    pool = read_answers(answers_file(cfg))
    out = []
    for p in prompts:
        answer = pool.get(tuple(p))
        if answer is None:  # unanswered (--gen-backend pool)
            continue
        full = p + answer
        cut = max(0, len(full) - cfg.seq_len)
        if len(answer) > cfg.block_size + 1:
            out.append((torch.tensor(full[cut:]), max(0, len(p) - 1 - cut)))
    return out


def load_init(cfg, tokenizer) -> dict:
    """A parallel drafter run to continue (--init): its adapter, held-out prompts and target tokens trained on."""
    from safetensors.torch import load_file

    from hybrid.drafters.parallel import ADAPTER_FILE, CONFIG_FILE, ParallelConfig, mask_token

    path = Path(cfg.init)
    try:
        init = ParallelConfig(**json.loads((path / CONFIG_FILE).read_text()))
        holdout = json.loads((path / "holdout-prompts.json").read_text())
        adapter = load_file(str(path / ADAPTER_FILE))
    except (OSError, TypeError, ValueError) as e:
        raise UserError(f"--init {path} is not a parallel drafter run of train-drafter --init-from ({e})") from e
    ours = (cfg.init_from, cfg.lora_rank, float(cfg.lora_alpha), mask_token(tokenizer))
    theirs = (init.base, init.lora_rank, init.lora_alpha, init.mask_token_id)
    if ours != theirs:
        raise UserError(f"--init {path} adapts {theirs[0]} with LoRA rank {theirs[1]}, alpha {theirs[2]:g}, mask "
                        f"{theirs[3]}; this run asks {ours[0]}, {ours[1]}, {ours[2]:g}, {ours[3]}: ask the same")
    seen = ((init.training or {}).get("report") or {}).get("target_tokens", 0)
    return {"adapter": adapter, "holdout": holdout, "target_tokens": seen}


def lora_factors(model) -> dict[str, torch.Tensor]:
    """The peft model's LoRA factor weights under the base model's names: `<module>.lora_A` / `.lora_B` (the
    adapter file's keys, merged at load by hybrid.drafters.parallel.merge_lora)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            for part in ("lora_A", "lora_B"):
                out[f"{name}.{part}"] = getattr(module, part)["default"].weight
    return out


def prompt_key(seq: torch.Tensor, start: int) -> tuple[int, ...]:
    """A training sequence's prompt part (its ids up to the prompt's last token): how held-out prompts are named."""
    return tuple(seq[: start + 1].tolist())


@torch.no_grad()
def set_adapter(model, adapter: dict[str, torch.Tensor]) -> None:
    """Copy saved `<name>.lora_A` / `.lora_B` factors into the peft model's LoRA layers."""
    factors = lora_factors(model)
    if factors.keys() != adapter.keys():
        raise UserError(f"--init's adapter has {len(adapter)} factors, this model's LoRA {len(factors)} others")
    for key, weight in factors.items():
        weight.copy_(adapter[key])


def train_parallel(cfg, progress: bool = True) -> dict:
    """Train a parallel drafter from cfg.init_from on the verifier's answers; saves it to cfg.out."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from tqdm import tqdm

    from hybrid.drafters.parallel import ADAPTER_FILE, ParallelConfig, lora_targets, mask_token, save_config
    from hybrid.drafters.train import verifier_tokenizer
    from hybrid.verifiers.hf import load_causal_lm
    from hybrid.vocab import vocab_fingerprint

    if not cfg.prompts:
        raise UserError("a parallel drafter learns the verifier's answers: give --prompts FILE.jsonl")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.dtype)
    model, tokenizer = load_causal_lm(cfg.init_from, dtype)
    verifier_tok = verifier_tokenizer(cfg.verifier)
    if vocab_fingerprint(tokenizer) != vocab_fingerprint(verifier_tok):
        raise UserError(f"--init-from {cfg.init_from} has another tokenizer than the verifier: start from a model of "
                        "the verifier's family (e.g. demo:0.5b for demo:1.5b)")
    mask_id = mask_token(verifier_tok)
    data = sequences(cfg, verifier_tok, progress)
    hold = max(1, min(cfg.holdout_chunks, len(data) // 5))
    if len(data) <= hold:
        raise UserError(f"--prompts gave only {len(data)} usable answers: add prompts or raise --gen-tokens")
    init = load_init(cfg, verifier_tok) if cfg.init else None
    if init is not None:  # the same held-out prompts as the run it continues, so its curve goes on measuring the same
        keep = {tuple(x) for x in init["holdout"]}
        holdout = [d for d in data if prompt_key(*d) in keep]
        train_set = [d for d in data if prompt_key(*d) not in keep]
        if len(holdout) != len(keep):
            raise UserError(f"--init {cfg.init}: {len(keep) - len(holdout)} of its held-out prompts are not among "
                            f"--prompts' answers with --seq-len {cfg.seq_len}: give the prompts and --seq-len it used")
    else:
        holdout, train_set = data[:hold], data[hold:]

    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                             target_modules=sorted({n.split(".")[-1] for n in lora_targets(model)})))
    if init is not None:
        set_adapter(model.base_model.model, init["adapter"])
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA factors in float32 (the base stays in its dtype)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    base = model.base_model.model
    rng = random.Random(cfg.seed)
    step, seen, curve = 0, (init["target_tokens"] if init else 0), []  # target tokens: since the base model
    ckpt = out / "checkpoint.pt"
    if cfg.extra.get("resume") and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["adapter"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.setstate(state["rng"])
        step, seen, curve = state["step"], state["seen"], state["curve"]

    def evaluate():
        model.eval()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            r = heldout_acceptance(base, holdout, cfg.block_size, mask_id)
        model.train()
        point = {"step": step, "target_tokens": seen, "wall_s": round(time.perf_counter() - t0, 1), **r}
        curve.append(point)
        with open(out / "curve.jsonl", "a") as f:
            f.write(json.dumps(point) + "\n")
        return point

    t0 = time.perf_counter()
    if step == 0:
        first = evaluate()  # the base model before any training: where the curve starts
        if progress:
            print(f"step 0: held-out tau {first['tau']:.2f} {[round(x, 2) for x in first['per_position']]}", flush=True)
    model.train()
    bar = tqdm(range(step, cfg.steps), desc="train parallel drafter", unit="step", disable=not progress,
               initial=step, total=cfg.steps)
    for step_i in bar:
        seq, start = train_set[rng.randrange(len(train_set))]
        hi = seq.numel() - 2
        anchors = sorted(rng.sample(range(start, hi), min(cfg.anchors, hi - start))) if hi > start else []
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss, n = step_loss(base, seq, start, anchors, cfg.block_size, mask_id, cfg.gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step, seen = step_i + 1, seen + n
        bar.set_postfix(loss=f"{loss.item():.3f}", tok=seen)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            point = evaluate()
            if progress:
                tqdm.write(f"step {step}: {seen} target tokens, held-out tau {point['tau']:.2f} "
                           f"{[round(x, 2) for x in point['per_position']]}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            adapter = {k: v for k, v in model.state_dict().items() if ADAPTER_KEY in k}
            state = {"adapter": adapter, "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": rng.getstate(),
                     "step": step, "seen": seen, "curve": curve}
            torch.save(state, out / "checkpoint.pt.tmp")
            os.replace(out / "checkpoint.pt.tmp", ckpt)
        if step == cfg.extra.get("stop_after"):  # an interrupted run (tests)
            return {"stopped_at": step}

    # the adapter as <module>.lora_A / .lora_B over the base model's names, merged at load
    adapter = {k: w.detach().to(dtype).contiguous() for k, w in lora_factors(base).items()}
    save_file(adapter, str(out / ADAPTER_FILE))
    report = {"steps": step, "target_tokens": seen, "heldout": curve[-1], "train_sequences": len(train_set),
              "holdout_sequences": len(holdout)}
    config = ParallelConfig(base=cfg.init_from, mask_token_id=mask_id, block_size=cfg.block_size,
                            lora_rank=cfg.lora_rank, lora_alpha=float(cfg.lora_alpha), verifier=cfg.verifier,
                            training={**{k: v for k, v in asdict(cfg).items() if k != "extra"}, "report": report})
    save_config(config, out)
    (out / "holdout-prompts.json").write_text(json.dumps([list(prompt_key(*d)) for d in holdout]))
    return report
