"""A parallel drafter (PARD, arXiv 2504.18583): a small causal LM of the verifier's family that drafts a
whole block in one forward pass by filling mask tokens.

A round's input is the committed tokens the drafter has not read yet (last round's accepted tokens and
bonus token), then B - 1 copies of the mask token at the next positions, attended causally. The logits
at the last real token give draft token 1 (the model's ordinary next-token prediction), those at mask k
give draft token k + 1. The committed tokens' keys/values stay in the shared pool (the drafter's own
model name, the sequence's block table); the mask rows are overwritten next round. The same layout is
vLLM's `method: "draft_model"` with `parallel_drafting: true`, which reads the mask id from config.json's
`pard_token`.

A drafter folder holds `parallel_drafter.json` (the base model it adapts, the mask token, the largest
block it was trained for) and either a whole model (config.json + safetensors) or `adapter.safetensors`:
LoRA factors over the base model's linear layers (hybrid train-drafter --init-from), merged into the
base's weights at load (W + scale * B @ A), so drafting costs what the base model costs.

Drafts are each position's most probable token (deterministic, with its probability as the confidence
the coordinator trims by), or with draft_sampling "sample" a sample of each position's law: the rows are
drafted from the context alone, so each row's q is its token's law given the tokens before it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hybrid.acceptance import DRAFT, sample, warp
from hybrid.drafters.base import Ask, Context, Draft
from hybrid.errors import UserError
from hybrid.tree import tree_from_probs
from hybrid.verifiers.base import Rows
from hybrid.verifiers.hf import HFVerifier, load_causal_lm
from hybrid.vocab import check_same_vocab

CONFIG_FILE = "parallel_drafter.json"
ADAPTER_FILE = "adapter.safetensors"


@dataclass
class ParallelConfig:
    base: str  # the causal LM adapted (a spec: demo:0.5b, a folder, an id); "" when the folder holds the model
    mask_token_id: int
    block_size: int = 8  # largest block trained for
    lora_rank: int = 0  # 0: the folder holds a whole model
    lora_alpha: float = 0.0
    draft_sampling: str = "argmax"  # "argmax" or "sample"
    verifier: str = ""  # the verifier whose answers it learnt
    training: dict | None = None


def save_config(config: ParallelConfig, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2))


def mask_token(tokenizer) -> int:
    """The token that fills a block's masked positions: Qwen's <|fim_pad|> (as our diffusion drafter and vLLM's
    DFlash drafters use), else the tokenizer's mask token."""
    vocab = tokenizer.get_vocab()
    if "<|fim_pad|>" in vocab:
        return int(vocab["<|fim_pad|>"])
    if tokenizer.mask_token_id is None:
        raise UserError("the verifier's tokenizer has no mask token (<|fim_pad|> or mask_token) for parallel drafting")
    return int(tokenizer.mask_token_id)


def lora_targets(model) -> list[str]:
    """Names of the linear layers of the decoder that LoRA adapts (attention and MLP projections)."""
    keys = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in keys]


@torch.no_grad()
def merge_lora(model, adapter: dict[str, torch.Tensor], scale: float) -> None:
    """W += scale * B @ A for every `<name>.lora_A` / `<name>.lora_B` pair of the adapter."""
    modules = dict(model.named_modules())
    for key, a in adapter.items():
        if not key.endswith(".lora_A"):
            continue
        name = key[: -len(".lora_A")]
        if name not in modules or f"{name}.lora_B" not in adapter:
            raise UserError(f"adapter does not fit the base model: no layer {name}")
        w = modules[name].weight
        w += (scale * adapter[f"{name}.lora_B"].float() @ a.float()).to(w.dtype)


class ParallelDrafter:
    """Drafts B tokens in one pass of a causal LM over [unread committed tokens, mask x (B - 1)]."""

    name = "parallel"
    capture_layers: list[int] = []
    max_steps = 1

    def __init__(self, lm: HFVerifier, config: ParallelConfig):
        self.lm, self.config = lm, config
        self.lm.name = "parallel-drafter"  # its cache's name in the pool, apart from other drafters' (the bench shares one)
        self.max_block_size = config.block_size
        self.mask = config.mask_token_id

    @classmethod
    def load(cls, path: str | Path, verifier=None, dtype="auto", device: str = "cpu") -> "ParallelDrafter":
        from safetensors.torch import load_file

        path = Path(path)
        try:
            config = ParallelConfig(**json.loads((path / CONFIG_FILE).read_text()))
        except (OSError, TypeError, json.JSONDecodeError) as e:
            raise UserError(f"not a parallel drafter folder: {path} ({e})") from e
        if dtype == "auto" and verifier is not None:
            dtype = verifier.dtype
        if config.lora_rank:
            model, tokenizer = load_causal_lm(config.base, dtype, device)
            merge_lora(model, load_file(str(path / ADAPTER_FILE)), config.lora_alpha / config.lora_rank)
        else:
            model, tokenizer = load_causal_lm(str(path), dtype, device)
        drafter = cls(HFVerifier(model, tokenizer, str(path)), config)
        if verifier is not None:
            check_same_vocab(verifier, tokenizer, drafter.lm.vocab_size, "drafter")
        return drafter

    # -- Drafter protocol -----------------------------------------------------------------
    def attach(self, pool, verifier) -> None:
        check_same_vocab(verifier, self.lm.tokenizer, self.lm.vocab_size, "drafter")
        self.lm.attach(pool)

    def observe(self, ctx: Context, hidden, start: int) -> None:
        pass  # reads the committed tokens it lacks at the next propose

    @torch.inference_mode()
    def block_logits(self, ctxs: list[Context], block_sizes: list[int], upto: list[int | None] | None = None
                     ) -> list[torch.Tensor | None]:
        """One pass over every sequence's [unread committed tokens, mask x (B - 1)] (packed) -> logits [B, V] of
        draft positions 1..B each (None where B is 0: its unread tokens, up to `upto`, are only read).
        Afterwards the drafter's pages hold the committed tokens only."""
        upto = upto or [None] * len(ctxs)
        batch = []
        for ctx, b, end in zip(ctxs, block_sizes, upto):
            view = self.lm.view(ctx.seq)
            read = ctx.tokens[view.length : len(ctx.tokens) if end is None else end]
            batch.append(Rows(view, torch.tensor(read + [self.mask] * max(0, b - 1), dtype=torch.long), logits=b))
        batch_out = self.lm.forward([rows for rows in batch if rows.tokens.numel()])
        out = iter(batch_out)
        logits = []
        for ctx, b, rows in zip(ctxs, block_sizes, batch):
            result = next(out) if rows.tokens.numel() else None
            if b:
                rows.view.trim(len(ctx.tokens))  # the mask rows are overwritten next round
            logits.append(result.logits if b else None)  # [B, V]
        return logits

    def propose(self, ctx: Context, block_size: int, steps: int, sampler) -> Draft:
        return self.propose_many([Ask(ctx, block_size, steps, 0, sampler)])[0]

    def propose_many(self, asks: list[Ask]) -> list[Draft | None]:
        """Every ask's draft (a chain, or a tree where asked) from one packed pass."""
        all_logits = self.block_logits([a.ctx for a in asks], [a.block_size for a in asks], [a.upto for a in asks])
        return [None if logits is None else self._draft(a, logits) for a, logits in zip(asks, all_logits)]

    def _draft(self, ask: Ask, logits: torch.Tensor) -> Draft:
        """One sequence's draft from its block's logits [B, V]."""
        if ask.tree:
            tree = tree_from_probs(torch.softmax(logits.float(), -1), ask.tree)  # [B, V]
            return Draft(tree.tokens, None, tree.prob, tree.parents)
        params, noise = ask.sampler
        if params.greedy or self.config.draft_sampling != "sample":
            conf, tok = torch.softmax(logits.float(), -1).max(-1)  # [B]
            return Draft(tok.cpu(), None, conf.cpu())
        q = warp(logits, params)  # [B, V] each row's law, from the context alone
        n = len(ask.ctx.tokens)
        tok = sample(q, noise.uniforms(range(n, n + ask.block_size), DRAFT))
        return Draft(tok.cpu(), q, q.max(-1).values.cpu())

    def propose_tree(self, ctx: Context, block_size: int, budget: int, sampler=None) -> Draft:
        """The most probable paths through each block position's top candidates (hybrid.tree), one pass."""
        return self.propose_many([Ask(ctx, block_size, 1, budget, sampler)])[0]
