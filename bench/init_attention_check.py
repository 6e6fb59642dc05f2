"""How much of a verifier layer's attention a drafter layer started from it keeps (hybrid/drafters/init_layers.py):
the mean cosine between the layer's attention output (after o_proj) as the verifier computes it and as the drafter's
Qwen3 layout does (q/k RMS norms at their calibrated scale; with or without the q/k/v biases), on the verifier's own
hidden states over pooled answers, causal attention as in the verifier.

    python bench/init_attention_check.py --layer 25
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from hybrid.drafters.diffusion import rope
from hybrid.drafters.init_layers import qk_scales

PROMPTS = [f"data/train-prompts{s}.jsonl" for s in ("", "-2", "-3", "-4")]


def pooled_sequences(verifier_spec: str, n: int, skip: int) -> list[torch.Tensor]:
    """prompt + answer ids of pooled answers n after the first `skip` prompts (train-drafter's order)."""
    from hybrid.drafters.answers import pool_path, read_answers
    from hybrid.drafters.train import TrainConfig, prompt_tokens, verifier_tokenizer

    cfg = TrainConfig(verifier=verifier_spec, corpus=[], out="", prompts=PROMPTS)
    pool = read_answers(Path(pool_path(verifier_spec, 128)))
    seqs = [p + pool[tuple(p)] for p in prompt_tokens(cfg, verifier_tokenizer(verifier_spec)) if tuple(p) in pool]
    return [torch.tensor(s) for s in seqs[skip: skip + n]]


def layer_inputs(verifier, layer, seqs) -> list[torch.Tensor]:
    """The layer's normed input [T, H] on each sequence (one verifier pass each)."""
    seen = []
    hook = layer.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw.get("hidden_states", args[0] if args else None)[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            for s in seqs:
                verifier.body(input_ids=s[None], use_cache=False)
    finally:
        hook.remove()
    return [layer.input_layernorm(h) for h in seen]


def attention(attn, x, bias: bool, qk_norm, theta: float) -> torch.Tensor:
    """o_proj(causal attention) of normed input x [T, H]; qk_norm (q_scale, k_scale): RMS-normalised heads at that
    scale (the drafter's layout), None: the verifier's raw q/k."""
    T, d = x.shape[0], attn.head_dim
    proj = lambda p: F.linear(x, p.weight, p.bias if bias else None).float().view(T, -1, d)  # noqa: E731
    q, k, v = proj(attn.q_proj), proj(attn.k_proj), proj(attn.v_proj)
    if qk_norm is not None:
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * qk_norm[0]
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * qk_norm[1]
    pos = torch.arange(T)
    q, k = rope(q, pos, theta), rope(k, pos, theta)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                       enable_gqa=True)
    return F.linear(o.transpose(0, 1).reshape(T, -1).to(x.dtype), attn.o_proj.weight).float()


def main() -> None:
    from hybrid.verifiers.hf import HFVerifier

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verifier", default="demo:1.5b")
    ap.add_argument("--layer", type=int, default=25)
    ap.add_argument("--sequences", type=int, default=4)
    args = ap.parse_args()
    v = HFVerifier.from_pretrained(args.verifier, torch.bfloat16)
    layer = v.body.layers[args.layer]
    theta = float((getattr(v.config, "rope_parameters", None) or {}).get("rope_theta", getattr(v.config, "rope_theta", 1e6)))
    calib, test = pooled_sequences(args.verifier, args.sequences, 8), pooled_sequences(args.verifier, args.sequences, 8 + args.sequences)
    xs = layer_inputs(v, layer, test)
    with torch.no_grad():
        for bias in (True, False):
            scales = qk_scales(v, [args.layer], calib, bias)[0]
            for name, norm in (("q/k norms at the calibrated scale", scales), ("q/k norms of 1", (1.0, 1.0)), ("no q/k norms", None)):
                cos = [F.cosine_similarity(attention(layer.self_attn, x, True, None, theta),
                                           attention(layer.self_attn, x, bias, norm, theta), dim=-1).mean().item() for x in xs]
                print(f"layer {args.layer}, {'with' if bias else 'without'} biases, {name}: mean cosine {sum(cos) / len(cos):.3f}")


if __name__ == "__main__":
    main()
