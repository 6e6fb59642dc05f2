"""The block-diffusion drafter: a few Qwen3-style layers that fill a masked block in T denoising steps.

Architecture (chosen so that stock vLLM runs the same checkpoint as ``method="dflash"``):
- The verifier's hidden states after decoder layers ``target_layer_ids`` (the pre-final-norm residual
  stream, ascending order) are concatenated and projected: ``c = hidden_norm(fc(cat h_l))`` [n, H].
- Every drafter layer i turns c into context keys/values, with no input norm:
  ``K = rope(k_norm_i(k_proj_i(c)))``, ``V = v_proj_i(c)``, written once per committed position into
  the drafter's pages of the shared pool (same block table, same positions as the verifier).
- The block is ``[last committed token, mask x B]`` at positions ``n-1 .. n-1+B``, embedded with the
  verifier's embedding; each layer is standard pre-norm Qwen3 (q/k norms, rope, GQA, SwiGLU) whose
  queries attend to all context keys and to the whole block (bidirectional inside the block).
- ``norm`` then the verifier's output head on block rows 1..B give the B draft distributions.
- Denoising: with T steps, each step commits the most confident still-masked positions (LLaDA's
  low-confidence remasking) and the next step re-reads the block with those tokens filled in.
  T = 1 is exactly vLLM's one-pass DFlash drafter.

Saved as a folder: ``config.json`` (a Qwen3 config with ``architectures: ["DFlashDraftModel"]``,
``dflash_config`` and our ``hybrid_drafter`` section naming the verifier) + ``model.safetensors``
with vLLM's names (no ``model.`` prefix; no embedding or head: those are the verifier's).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from hybrid.acceptance import DRAFT, sample, warp
from hybrid.drafters.base import Context, Draft
from hybrid.errors import UserError
from hybrid.tree import tree_from_probs
from hybrid.vocab import check_same_vocab, vocab_fingerprint

MODEL_NAME = "drafter"


@dataclass
class DrafterConfig:
    hidden_size: int  # = the verifier's hidden size (shared embedding and head)
    vocab_size: int  # = the verifier's vocabulary
    target_layer_ids: list[int]  # verifier layers whose outputs condition the drafter (0-based)
    mask_token_id: int
    num_hidden_layers: int = 1
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    target_hidden_size: int | None = None  # verifier hidden size, if it differs from hidden_size
    block_size: int = 16  # largest block trained for (draft tokens; vLLM's K)
    max_steps: int = 4
    verifier: str = ""  # the verifier this drafter was made for
    vocab_fingerprint: str = ""
    draft_sampling: str = "argmax"  # "argmax" (q one-hot) or "sample" (q = drafter probabilities)
    attention_bias: bool = False  # q/k/v/o projections with biases (vLLM's DFlash layout with attention_bias),
    # for layers started from a verifier whose attention has biases (Qwen2)
    training: dict = field(default_factory=dict)

    def to_hf(self) -> dict:
        """config.json: a Qwen3 config that vLLM loads as DFlashDraftModel, plus our section."""
        return {
            "architectures": ["DFlashDraftModel"],
            "model_type": "qwen3",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "vocab_size": self.vocab_size,
            "target_hidden_size": self.target_hidden_size or self.hidden_size,
            "block_size": self.block_size + 1,
            "dflash_config": {
                "mask_token_id": self.mask_token_id,
                "target_layer_ids": sorted(self.target_layer_ids),
                "block_size": self.block_size + 1,
            },
            "hybrid_drafter": asdict(self),
        }

    @classmethod
    def from_hf(cls, d: dict) -> "DrafterConfig":
        return cls(**d["hybrid_drafter"])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding. x [T, h, d]; positions [T]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))  # [d/2]
    ang = positions.to(torch.float32)[:, None] * inv[None]  # [T, d/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None].to(x.dtype)  # [T, 1, d]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.c = c
        bias = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def kv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of x [T, H] at positions [T] -> k, v [T, h_kv, d]."""
        c = self.c
        k = self.k_norm(self.k_proj(x).view(-1, c.num_key_value_heads, c.head_dim))
        v = self.v_proj(x).view(-1, c.num_key_value_heads, c.head_dim)
        return rope(k, positions, c.rope_theta), v

    def forward(self, x, positions, ctx_k, ctx_v, attn_mask=None):
        """x [..., T, H] block rows; ctx_k/ctx_v [..., S, h_kv, d] context -> [..., T, H]. Bidirectional in the block."""
        c = self.c
        lead = x.shape[:-2]
        q = self.q_norm(self.q_proj(x).view(*x.shape[:-1], c.num_attention_heads, c.head_dim))
        q = rope(q.reshape(-1, *q.shape[-2:]), positions.reshape(-1), c.rope_theta).view(q.shape)
        k, v = self.kv(x.reshape(-1, x.shape[-1]), positions.reshape(-1))
        k, v = k.view(*lead, -1, *k.shape[-2:]), v.view(*lead, -1, *v.shape[-2:])
        K = torch.cat([ctx_k, k], dim=-3).transpose(-3, -2)  # [..., h_kv, S+T, d]
        V = torch.cat([ctx_v, v], dim=-3).transpose(-3, -2)
        out = F.scaled_dot_product_attention(q.transpose(-3, -2), K, V, attn_mask=attn_mask, enable_gqa=True)
        return self.o_proj(out.transpose(-3, -2).reshape(*x.shape[:-1], -1))


class MLP(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, positions, ctx_k, ctx_v, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, ctx_k, ctx_v, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashModel(nn.Module):
    """The drafter's own weights (names as vLLM's DFlash loader expects them)."""

    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.c = c
        n_in = (c.target_hidden_size or c.hidden_size) * len(c.target_layer_ids)
        self.fc = nn.Linear(n_in, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def context(self, hidden: torch.Tensor) -> torch.Tensor:
        """Verifier hidden states [n, L*Ht] -> context features [n, H]."""
        return self.hidden_norm(self.fc(hidden))

    def context_kv(self, feats: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Context features [n, H] -> per layer (k, v) [n, h_kv, d]."""
        return [layer.self_attn.kv(feats, positions) for layer in self.layers]

    def forward(self, x, positions, ctx_kv, attn_mask=None):
        """Block embeddings x [..., T, H] at positions [..., T]; ctx_kv per layer -> normed states [..., T, H]."""
        for layer, (k, v) in zip(self.layers, ctx_kv):
            x = layer(x, positions, k, v, attn_mask)
        return self.norm(x)


def unmask_schedule(block_size: int, steps: int) -> list[int]:
    """How many masked positions each denoising step commits (sums to block_size)."""
    steps = max(1, min(steps, block_size))
    base, extra = divmod(block_size, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


DRAFT_VOCAB_FILE = "draft_vocab.safetensors"  # optional: the token ids the drafter proposes from


class DiffusionDrafter:
    """The block-diffusion drafter bound to a verifier (its embedding, head and page pool)."""

    name = "diffusion"

    def __init__(self, config: DrafterConfig, model: DFlashModel | None = None):
        self.config = config
        self.model = model or DFlashModel(config)
        self.model.eval()
        self.max_block_size = config.block_size
        self.max_steps = config.max_steps
        self.capture_layers = sorted(config.target_layer_ids)
        self.embed = None
        self.head = None
        # Draft vocabulary: sorted token ids [V'] the drafter proposes from (None: all V). Its rows of the
        # verifier's head are copied at bind(): a V' x H matmul per row instead of V x H (the head is most
        # of a one-layer drafter's cost on a CPU). Lossless either way: greedy drafts are checked by the
        # verifier, sampled drafts carry q (zero outside the vocabulary) into the rejection sampler.
        self.draft_vocab: torch.Tensor | None = None
        self._head_weight = self._head_bias = None

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_hf(), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        vocab_file = path / DRAFT_VOCAB_FILE
        if self.draft_vocab is not None:
            save_file({"ids": self.draft_vocab.to(torch.int32).cpu().contiguous()}, str(vocab_file))
        elif vocab_file.exists():
            vocab_file.unlink()

    @classmethod
    def load(cls, path: str | Path, verifier=None) -> "DiffusionDrafter":
        path = Path(path)
        try:
            config = DrafterConfig.from_hf(json.loads((path / "config.json").read_text()))
            state = load_file(str(path / "model.safetensors"))
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise UserError(f"not a block-diffusion drafter folder: {path} ({e})") from e
        model = DFlashModel(config)
        model.load_state_dict(state)
        drafter = cls(config, model)
        if (path / DRAFT_VOCAB_FILE).is_file():
            ids = load_file(str(path / DRAFT_VOCAB_FILE))["ids"].long()
            if ids.ndim != 1 or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size:
                raise UserError(f"{path / DRAFT_VOCAB_FILE}: not a list of token ids below {config.vocab_size}")
            drafter.draft_vocab = ids.unique()
        if verifier is not None:
            drafter.bind(verifier)
        return drafter

    @classmethod
    def for_verifier(cls, verifier, **kw) -> "DiffusionDrafter":
        """A fresh (untrained) drafter shaped for this verifier."""
        vc = verifier.config
        L = verifier.num_layers
        layer_ids = kw.pop("target_layer_ids", None) or sorted({max(0, min(L - 2, round(f * (L - 1)))) for f in (0.1, 0.5, 0.9)})
        tok = verifier.tokenizer
        mask_id = kw.pop("mask_token_id", None)
        if mask_id is None:
            vocab = tok.get_vocab()
            mask_id = vocab.get("<|fim_pad|>", tok.mask_token_id if tok.mask_token_id is not None else verifier.vocab_size - 1)
        config = DrafterConfig(
            hidden_size=verifier.hidden_size,
            vocab_size=verifier.vocab_size,
            target_layer_ids=layer_ids,
            mask_token_id=int(mask_id),
            rms_norm_eps=float(getattr(vc, "rms_norm_eps", 1e-6)),
            rope_theta=float((getattr(vc, "rope_parameters", None) or {}).get("rope_theta", getattr(vc, "rope_theta", 1e6))),
            max_position_embeddings=verifier.max_context,
            verifier=verifier.name_or_path,
            vocab_fingerprint=vocab_fingerprint(tok),
            **kw,
        )
        drafter = cls(config)
        drafter.model.to(verifier.dtype)
        drafter.bind(verifier)
        return drafter

    def bind(self, verifier) -> None:
        """Borrow the verifier's embedding and output head; refuse another vocabulary."""
        check_same_vocab(verifier, vocab_size=self.config.vocab_size, fingerprint=self.config.vocab_fingerprint or None)
        if verifier.hidden_size != self.config.hidden_size:
            raise UserError(
                f"drafter hidden size {self.config.hidden_size} != verifier's {verifier.hidden_size}: "
                "use a drafter made for this verifier"
            )
        self.embed = verifier.model.get_input_embeddings()
        self.head = verifier.head
        self.model.to(device=verifier.device, dtype=verifier.dtype)
        self.set_draft_vocab(self.draft_vocab)

    def set_draft_vocab(self, ids: torch.Tensor | None) -> None:
        """Propose only from these token ids (None: the whole vocabulary)."""
        self.draft_vocab = None if ids is None else ids.detach().long().unique().cpu()  # sorted
        self._head_weight = self._head_bias = None
        if self.draft_vocab is not None and self.head is not None:
            rows = self.draft_vocab.to(self.head.weight.device)
            self._head_weight = self.head.weight.detach()[rows].contiguous()  # [V', H]
            if self.head.bias is not None:
                self._head_bias = self.head.bias.detach()[rows]

    def draft_logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B, H] -> [B, V'] logits over the draft vocabulary (V' = V without one)."""
        if self._head_weight is None:
            return self.head(h).float()
        return F.linear(h, self._head_weight, self._head_bias).float()

    # -- Drafter protocol -----------------------------------------------------------------
    def attach(self, pool, verifier) -> None:
        if self.embed is None:
            self.bind(verifier)
        c = self.config
        pool.register(MODEL_NAME, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, verifier.dtype)

    @torch.inference_mode()
    def observe(self, ctx: Context, hidden: torch.Tensor | None, start: int) -> None:
        """Project the verifier's hidden states [m, L*Ht] of positions [start, start+m) into context K/V pages."""
        if hidden is None or hidden.shape[0] == 0:
            return
        m = hidden.shape[0]
        positions = torch.arange(start, start + m, device=hidden.device)
        feats = self.model.context(hidden.to(self.model.fc.weight.dtype))  # [m, H]
        view = ctx.seq.pool.view(ctx.seq, MODEL_NAME)
        view.extend(start + m)
        for i, (k, v) in enumerate(self.model.context_kv(feats, positions)):
            view.write(i, start, k, v)

    def _block(self, ctx: Context, block_size: int):
        """The masked block after the last committed token -> (ids [B+1], positions [B+1], context K/V per layer)."""
        c, seq = self.config, ctx.seq
        n = len(ctx.tokens)
        view = seq.pool.view(seq, MODEL_NAME)  # context positions with K/V: [0, length), length == n - 1
        ctx_kv = [view.fetch(i, view.length) for i in range(c.num_hidden_layers)]
        device = self.model.fc.weight.device
        ids = torch.full((block_size + 1,), c.mask_token_id, dtype=torch.long, device=device)  # [B+1]
        ids[0] = ctx.tokens[-1]
        positions = torch.arange(n - 1, n + block_size, device=device)  # [B+1]
        return ids, positions, ctx_kv

    @torch.inference_mode()
    def propose(self, ctx: Context, block_size: int, steps: int, sampler) -> Draft:
        """Fill the block in `steps` denoising steps.

        Argmax drafts (the default, and always at temperature 0) commit each step's most confident masked
        positions (LLaDA's low-confidence remasking): the draft is a function of the context, so any order is
        lossless. Sampled drafts (draft_sampling "sample") commit masked positions left to right instead, so
        each token's q is its law given the tokens before it; an order by confidence would make a token depend
        on tokens to its right, which its q does not account for. Their confidence, from which the coordinator
        decides how much of the draft to verify, is the first pass's (the context's alone): the probability of
        the sampled token would make whether position i is verified depend on x_i.
        """
        params, noise = sampler
        c = self.config
        ids, positions, ctx_kv = self._block(ctx, block_size)
        device = ids.device
        n = len(ctx.tokens)  # draft position j (0-based) is sequence position n + j
        masked = torch.ones(block_size, dtype=torch.bool, device=device)  # [B]
        sampled = not params.greedy and c.draft_sampling == "sample"
        q = torch.zeros(block_size, self.head.weight.shape[0], device=device) if sampled else None  # [B, V]
        vocab = None if self.draft_vocab is None else self.draft_vocab.to(device)  # [V']
        confidence = torch.zeros(block_size, device=device)  # [B]
        for step, k in enumerate(unmask_schedule(block_size, steps)):
            h = self.model(self.embed(ids), positions, ctx_kv)  # [B+1, H]
            logits = self.draft_logits(h[1:])  # [B, V'] (V' = V without a draft vocabulary)
            if not sampled:
                conf, tok = torch.softmax(logits, -1).max(-1)  # [B]
                pick = conf.masked_fill(~masked, -1.0).topk(k).indices  # the k most confident masked positions
                confidence[pick] = conf[pick]
            else:
                probs = warp(logits, params)  # [B, V']
                if step == 0:
                    confidence = probs.max(-1).values  # [B] from the context alone
                pick = masked.nonzero()[:k, 0]  # the k leftmost masked positions
                tok = torch.zeros(block_size, dtype=torch.long, device=device)
                tok[pick] = sample(probs[pick], noise.uniforms((n + pick).tolist(), DRAFT))
                if vocab is None:
                    q[pick] = probs[pick]
                else:
                    q[pick[:, None], vocab[None]] = probs[pick]  # zero outside the draft vocabulary
            ids[1 + pick] = tok[pick] if vocab is None else vocab[tok[pick]]
            masked[pick] = False
        return Draft(ids[1:].clone(), q, confidence.float().cpu())

    @torch.inference_mode()
    def propose_tree(self, ctx: Context, block_size: int, budget: int, sampler=None) -> Draft:
        """A draft tree (hybrid.tree) of at most `budget` tokens and depth block_size from one pass over the block:
        the most probable paths through each position's top candidates."""
        ids, positions, ctx_kv = self._block(ctx, block_size)
        h = self.model(self.embed(ids), positions, ctx_kv)  # [B+1, H]
        tree = tree_from_probs(torch.softmax(self.draft_logits(h[1:]), -1), budget, self.draft_vocab)  # [B, V']
        return Draft(tree.tokens, None, tree.prob, tree.parents)
