"""Start a block-diffusion drafter from its verifier's own decoder layers (`train-drafter --init-layers-from-verifier`).

The drafter (hybrid.drafters.diffusion) is a stack of pre-norm Qwen3 layers: the verifier's hidden size, heads, KV heads
and head dimension, and here the verifier's MLP width too. Drafter layer i takes verifier layer ``ids[i]``'s weights:
input and post-attention norms, q/k/v/o projections, and the SwiGLU MLP, unchanged. Around them:

- ``fc`` passes the last captured target layer through (identity on its block of the concatenated hidden states,
  zero on the others, so the other layers' blocks start silent and are learnt) and ``hidden_norm`` takes verifier
  layer ``ids[0]``'s input norm. With ``ids[0]`` = the last captured layer + 1 (the layer that reads that hidden
  state in the verifier), the context keys/values of drafter layer 0 are what that verifier layer computes for the
  context, up to the two differences below.
- ``norm`` takes the verifier's final norm: the drafter's output goes through the verifier's head as the verifier's
  last hidden state does.
- Attention biases: a verifier whose attention has biases (Qwen2: q, k and v) gives a drafter with
  ``attention_bias`` (vLLM's DFlash layer with attention_bias: biases on q/k/v and o_proj); its q/k/v biases are
  copied and o_proj's starts at zero (Qwen2's o_proj has none). They matter: in demo:1.5b's layer 25 the q bias's
  RMS exceeds that of the projected input, and without the biases the layer's attention output has a mean cosine
  of 0.41 to the verifier's, against 0.80 with them (bench/init_attention_check.py; the rest is the q/k norms).
- q/k norms: the drafter normalises each head's query and key (Qwen3). A Qwen3 verifier's q_norm/k_norm are copied.
  For a verifier without them, each is set to a constant: the mean RMS of the verifier layer's head queries (keys),
  bias included, over a sample of training text. Normalising and scaling back by it gives the verifier's attention
  logits at their typical magnitude, which weights of 1 would shrink to at most sqrt(head_dim).
"""
from __future__ import annotations

import torch

from hybrid.errors import UserError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def verifier_layer_shape(verifier) -> dict:
    """The drafter config fields that make its layers the shape of the verifier's decoder layers."""
    c = verifier.config
    heads = c.num_attention_heads
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", None) or heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
        "intermediate_size": c.intermediate_size,
        "attention_bias": verifier.body.layers[0].self_attn.q_proj.bias is not None,
    }


def check_layer_ids(verifier, layer_ids: list[int]) -> None:
    bad = [i for i in layer_ids if not 0 <= i < verifier.num_layers]
    if bad or not layer_ids:
        raise UserError(f"--init-layers-from-verifier {layer_ids}: the verifier has decoder layers 0..{verifier.num_layers - 1}")


@torch.no_grad()
def qk_scales(verifier, layer_ids: list[int], samples: list[torch.Tensor], bias: bool = True) -> list[tuple[float, float]]:
    """Per layer: the mean RMS of its head queries and of its head keys (bias included or not), over one verifier
    pass per token sample -> [(q_scale, k_scale)]."""
    c = verifier_layer_shape(verifier)
    d = c["head_dim"]
    sums = {(i, name): [] for i in layer_ids for name in ("q_proj", "k_proj")}

    def hook(key):
        def record(module, args, out):
            x = out if module.bias is None or bias else out - module.bias
            sums[key].append(x.float().reshape(-1, d).pow(2).mean(-1).sqrt())  # [tokens * heads]
        return record

    handles = [getattr(verifier.body.layers[i].self_attn, name).register_forward_hook(hook((i, name)))
               for (i, name) in sums]
    try:
        for tokens in samples:
            verifier.body(input_ids=tokens[None].to(verifier.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [(torch.cat(sums[(i, "q_proj")]).mean().item(), torch.cat(sums[(i, "k_proj")]).mean().item())
            for i in layer_ids]


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise UserError(f"{what}: the drafter's is {tuple(dst.shape)}, the verifier's {tuple(src.shape)}: give the drafter "
                        "the verifier's layer shape (hybrid.drafters.init_layers.verifier_layer_shape)")
    dst.copy_(src.to(dst.dtype))


@torch.no_grad()
def copy_verifier_layers(model, verifier, layer_ids: list[int], samples: list[torch.Tensor] = ()) -> None:
    """Drafter layer i <- verifier decoder layer layer_ids[i]; fc passes the last captured layer through; hidden_norm
    and norm from the verifier (module docstring). samples: token sequences to calibrate q/k norms on, for a verifier
    without them."""
    check_layer_ids(verifier, layer_ids)
    if len(layer_ids) != len(model.layers):
        raise UserError(f"--init-layers-from-verifier names {len(layer_ids)} layers for a drafter of {len(model.layers)}")
    src_layers = [verifier.body.layers[i] for i in layer_ids]
    has_qk_norm = hasattr(src_layers[0].self_attn, "q_norm")
    with_bias = model.layers[0].self_attn.q_proj.bias is not None
    scales = None if has_qk_norm else qk_scales(verifier, layer_ids, list(samples), with_bias)
    for j, (dst, src) in enumerate(zip(model.layers, src_layers)):
        for name in NORMS:
            _copy(getattr(dst, name).weight, getattr(src, name).weight, f"layer {layer_ids[j]} {name}")
        for name in ATTENTION:
            _copy(getattr(dst.self_attn, name).weight, getattr(src.self_attn, name).weight, f"layer {layer_ids[j]} {name}")
            copy_bias(getattr(dst.self_attn, name), getattr(src.self_attn, name), f"layer {layer_ids[j]} {name}")
        for name in MLP:
            _copy(getattr(dst.mlp, name).weight, getattr(src.mlp, name).weight, f"layer {layer_ids[j]} {name}")
        if has_qk_norm:
            _copy(dst.self_attn.q_norm.weight, src.self_attn.q_norm.weight, f"layer {layer_ids[j]} q_norm")
            _copy(dst.self_attn.k_norm.weight, src.self_attn.k_norm.weight, f"layer {layer_ids[j]} k_norm")
        else:
            dst.self_attn.q_norm.weight.fill_(scales[j][0])
            dst.self_attn.k_norm.weight.fill_(scales[j][1])
    pass_last_target_layer(model.fc.weight)
    _copy(model.hidden_norm.weight, src_layers[0].input_layernorm.weight, "hidden_norm")
    _copy(model.norm.weight, verifier.body.norm.weight, "norm")


def copy_bias(dst: torch.nn.Linear, src: torch.nn.Linear, what: str) -> None:
    """dst's bias := src's, or zero where src has none; a drafter without biases drops src's."""
    if dst.bias is None:
        return
    if src.bias is None:
        dst.bias.zero_()
    else:
        _copy(dst.bias, src.bias, f"{what} bias")


def pass_last_target_layer(fc: torch.Tensor) -> None:
    """fc [H, n*H] := [0 ... 0 I]: the context features are the last captured layer's hidden state."""
    H = fc.shape[0]
    fc.zero_()
    fc[:, -H:] = torch.eye(H, dtype=fc.dtype, device=fc.device)
