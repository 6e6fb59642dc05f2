"""A transformers causal LM as the verifier, its keys/values in the shared page pool.

transformers runs the model math for every family it supports (Llama, Qwen2, Qwen3, Mistral,
...); the keys/values go through ``PagedCache``, a transformers ``Cache`` whose layers write
into and gather from our pages instead of growing tensors of their own.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, CacheLayerMixin

from hybrid.errors import UserError
from hybrid.pages import PagePool, Sequence
from hybrid.tree import depths, tree_mask
from hybrid.verifiers.base import VerifyOutput

MODEL_NAME = "verifier"


class PagedLayer(CacheLayerMixin):
    """One decoder layer's keys/values, stored in pages of the sequence's pool."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "PagedCache", layer: int):
        super().__init__()
        self.cache, self.layer = cache, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # pages are allocated by the pool
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states [1, H, T, D] -> all keys/values of the sequence [1, H, start + T, D]
        c = self.cache
        T = key_states.shape[2]
        pool = c.seq.pool
        pool.write(c.model, self.layer, c.seq, c.start, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        k, v = pool.gather(c.model, self.layer, c.seq, c.start + T)  # [S, H, D]
        return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.start + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.start

    def get_max_length(self) -> int:
        return -1


class PagedCache(Cache):
    """A transformers Cache over one sequence's pages for one forward pass that writes from position `start`."""

    def __init__(self, seq: Sequence, model: str, num_layers: int, start: int):
        self.seq, self.model, self.start = seq, model, start
        super().__init__(layers=[PagedLayer(self, i) for i in range(num_layers)])


def _is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def load_causal_lm(spec: str, dtype: torch.dtype | str = "auto", device: str = "cpu"):
    """Load (model, tokenizer) from a Hugging Face id, a local folder, or a local .gguf file."""
    from hybrid.demo import resolve_model

    spec = resolve_model(spec)
    kwargs: dict = {}
    src = spec
    if _is_gguf(spec):
        if not os.path.isfile(spec):
            raise UserError(f"model not found: {spec} (no such GGUF file)")
        src, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    elif os.path.exists(spec) or spec.startswith((".", "/", "~")):
        p = Path(spec).expanduser()
        if not (p / "config.json").is_file():
            raise UserError(f"model not found: {spec} (a local model folder needs a config.json)")
        src = str(p)
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
        if dtype == "auto":
            dtype = _auto_dtype(config, device)
        if kwargs.get("gguf_file"):
            from hybrid.demo import load_gguf

            model, tokenizer = load_gguf(Path(spec), dtype)
            model.config._name_or_path = spec
        else:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="sdpa", **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load model {spec!r}: {first} (give a Hugging Face id, a local folder or a .gguf file)"
        ) from e
    model.to(device).eval()
    return model, tokenizer


def _auto_dtype(config, device: str) -> torch.dtype:
    """float32 for float32 checkpoints, else the checkpoint's half type (bfloat16 on CPU)."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if d in (torch.float32, "float32") or d is None:
        return torch.float32
    if str(device).startswith("cuda") and d in (torch.float16, "float16"):
        return torch.float16
    return torch.bfloat16


class HFVerifier:
    """Verifier over a transformers causal LM. Keys/values live in the shared page pool."""

    def __init__(self, model, tokenizer, name_or_path: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path or getattr(model.config, "_name_or_path", "")
        self.name = MODEL_NAME
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.config = cfg
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.hidden_size = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and cfg.model_type == "mistral":
            self.max_context = min(self.max_context, int(cfg.sliding_window))
        self.device = model.device
        self.dtype = model.dtype
        self.body = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.eos_token_ids = _eos_ids(model, tokenizer)

    @classmethod
    def from_pretrained(cls, spec: str, dtype="auto", device: str = "cpu") -> "HFVerifier":
        model, tokenizer = load_causal_lm(spec, dtype, device)
        return cls(model, tokenizer, spec)

    # -- pages ----------------------------------------------------------------------------
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, KV heads, head dim) of this model's cache."""
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads), head_dim

    def attach(self, pool: PagePool) -> None:
        """Register this model's cache with a pool. The verifier keeps no state of its own between calls: each
        forward pass reads and writes the pages of the sequence it is given, in that sequence's pool."""
        L, H, D = self.kv_shape()
        pool.register(self.name, L, H, D, self.dtype)

    # -- forward --------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, seq: Sequence, tokens: torch.Tensor, parents: torch.Tensor | None = None,
                 capture: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run tokens [T] at the sequence's next T slots -> (last hidden [T, H], captured [T, n*H] or None).

        parents [T-1] (a draft tree, see hybrid.tree): row i sits at position start + depth(i) and attends
        to the context, its ancestors and itself; None: a chain at positions start .. start + T - 1.
        capture: decoder layers (0-based) whose outputs are returned, concatenated (the drafter's inputs).
        """
        pool = seq.pool
        start = seq.lengths[self.name]
        T = tokens.shape[0]
        pool.reserve(seq, start + T)
        mask = None
        if parents is None:
            positions = torch.arange(start, start + T, device=self.device).unsqueeze(0)  # [1, T]
        else:
            positions = (start + torch.cat([torch.zeros(1, dtype=torch.long), depths(parents)])).to(self.device)[None]
            mask = torch.ones(1, 1, T, start + T, dtype=torch.bool, device=self.device)  # [1, 1, T, S+T] True: attend
            mask[0, 0, :, start:] = tree_mask(parents).to(self.device)
        captured: dict[int, torch.Tensor] = {}
        hooks = []
        for i in capture:
            if not 0 <= i < self.num_layers:
                raise UserError(f"drafter wants verifier layer {i}, the verifier has {self.num_layers} layers")
            hook = lambda _m, _a, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)  # noqa: E731
            hooks.append(self.body.layers[i].register_forward_hook(hook))
        try:
            out = self.body(
                input_ids=tokens.to(self.device).unsqueeze(0), position_ids=positions, use_cache=True,
                past_key_values=PagedCache(seq, self.name, self.num_layers, start), attention_mask=mask,
            )
        finally:
            for h in hooks:
                h.remove()
        pool.advance(self.name, seq, start + T)
        hidden = out.last_hidden_state[0]  # [T, H]
        return hidden, torch.cat([captured[i][0] for i in capture], dim=-1) if capture else None  # [T, n*H]

    def prefill(self, seq: Sequence, tokens: torch.Tensor, capture: list[int] = ()) -> torch.Tensor | None:
        if tokens.numel() == 0:
            return None
        _, captured = self._forward(seq, tokens, capture=capture)
        return captured

    def score(self, seq: Sequence, tokens: torch.Tensor, parents: torch.Tensor | None = None,
              capture: list[int] = ()) -> VerifyOutput:
        hidden, captured = self._forward(seq, tokens, parents, capture)
        with torch.inference_mode():
            logits = self.head(hidden).float()  # [B+1, V]
        return VerifyOutput(logits=logits, hidden=captured)

    def rollback(self, seq: Sequence, n: int) -> int:
        return seq.pool.rollback(seq, n)

    # -- tokenizer helpers ----------------------------------------------------------------
    def encode(self, text: str, chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, text, chat)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation in the tokenizer's chat template, ready for the assistant's turn."""
        return encode_messages(self.tokenizer, messages)


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt: as the user's turn in the chat template, or raw text (completion)."""
    if chat:
        return encode_messages(tokenizer, [{"role": "user", "content": text}])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("chat needs a tokenizer with a chat template; this verifier has none (use --no-chat)")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # the template rejects the conversation (e.g. roles out of order)
        raise UserError(f"the chat template rejects these messages: {e}") from e
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None)
        if e is None:
            continue
        ids.update([e] if isinstance(e, int) else list(e))
    return ids
