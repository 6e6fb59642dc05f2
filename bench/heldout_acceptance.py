"""Held-out teacher-forced acceptance of any drafter on the answers train-drafter holds out, with the metric its
learning curves use: one block of B drafted in one pass at every 4th answer position, accepted while it matches the
verifier's answer.

    python bench/heldout_acceptance.py --drafter hybrid/assets/drafters/qwen2.5-coder-1.5b-instruct \\
        --drafter demo:0.5b --drafter runs/diffusion-a --feature-cache runs/features [--prompts ... --seq-len 320]

A drafter is a parallel drafter folder (parallel_drafter.json), a causal LM (demo:0.5b: its own next token, then
mask tokens, untrained) or a block-diffusion drafter folder (config.json with hybrid_drafter; its held-out features
come from --feature-cache, which must hold the verifier layers it reads). Held out: the first --holdout usable
answers in prompt order (hybrid.drafters.parallel_train.sequences), the same for every kind. Prints one JSON line
per drafter.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PROMPTS = [f"data/train-prompts{s}.jsonl" for s in ("", "-2", "-3", "-4")]


def train_config(args):
    from hybrid.drafters.answers import pool_path
    from hybrid.drafters.train import TrainConfig

    return TrainConfig(verifier=args.verifier, corpus=[], out="/tmp/heldout-acceptance", prompts=args.prompts,
                       block_size=args.block_size, seq_len=args.seq_len, holdout_chunks=args.holdout,
                       gen_backend="pool", answers=str(pool_path(args.verifier, 128)), max_prompts=args.max_prompts,
                       feature_cache=args.feature_cache)


def parallel_heldout(cfg):
    from hybrid.drafters.parallel_train import sequences
    from hybrid.drafters.train import verifier_tokenizer

    return sequences(cfg, verifier_tokenizer(cfg.verifier), progress=False)[: cfg.holdout_chunks]


@torch.no_grad()
def causal_point(spec: str, held, cfg) -> dict:
    """A parallel drafter folder or a plain causal LM of the verifier's family."""
    from hybrid.drafters.parallel import CONFIG_FILE, ParallelDrafter, mask_token
    from hybrid.drafters.parallel_train import heldout_acceptance
    from hybrid.verifiers.hf import load_causal_lm

    if (Path(spec) / CONFIG_FILE).is_file():
        model = ParallelDrafter.load(spec, dtype=getattr(torch, cfg.dtype)).lm.model
    else:
        model, _ = load_causal_lm(spec, getattr(torch, cfg.dtype))
    from hybrid.drafters.train import verifier_tokenizer

    mask = mask_token(verifier_tokenizer(cfg.verifier))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return heldout_acceptance(model.eval(), held, cfg.block_size, mask)


@torch.no_grad()
def diffusion_point(path: str, held, cfg) -> dict:
    """A block-diffusion drafter on the same answers' features (one verifier pass each, cached)."""
    from dataclasses import replace

    from hybrid.drafters.diffusion import DiffusionDrafter
    from hybrid.drafters.parallel_train import prompt_key
    from hybrid.drafters.train import heldout_acceptance, load_or_generate_features, prompt_tokens, split_holdout
    from hybrid.verifiers.hf import HFVerifier

    verifier = HFVerifier.from_pretrained(cfg.verifier, getattr(torch, cfg.dtype))
    drafter = DiffusionDrafter.load(path, verifier)
    prompts = prompt_tokens(cfg, verifier)
    keys = [prompt_key(*h) for h in held]
    wanted = [p for p in prompts if tuple(p) in set(keys)]
    run = replace(cfg, soft_targets=0)
    feats = load_or_generate_features(run, verifier, drafter.capture_layers, wanted, progress=False)
    feats, _ = split_holdout(feats, prompts, cfg.holdout_chunks)
    assert [tuple(f["tokens"][: f["start"] + 1].tolist()) for f in feats] == keys, "not the parallel drafters' answers"
    drafter.model.float().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return heldout_acceptance(drafter, verifier.model.get_input_embeddings(), feats, cfg.block_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", action="append", required=True)
    ap.add_argument("--verifier", default="demo:1.5b")
    ap.add_argument("--prompts", action="append", default=None)
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=320)
    ap.add_argument("--holdout", type=int, default=8)
    ap.add_argument("--feature-cache", default=None, help="features of the held-out answers, for diffusion drafters")
    args = ap.parse_args()
    args.prompts = args.prompts or PROMPTS
    cfg = train_config(args)
    held = parallel_heldout(cfg)
    for spec in args.drafter:
        is_diffusion = (Path(spec) / "config.json").is_file() and "hybrid_drafter" in (Path(spec) / "config.json").read_text()
        point = diffusion_point(spec, held, cfg) if is_diffusion else causal_point(spec, held, cfg)
        print(json.dumps({"drafter": spec, **point}), flush=True)


if __name__ == "__main__":
    main()
