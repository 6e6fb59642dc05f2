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
from hybrid.pages import KVView, PackedKV, PagePool, Sequence
from hybrid.verifiers.base import Rows, VerifyOutput

MODEL_NAME = "verifier"


class PackedLayer(CacheLayerMixin):
    """One decoder layer's keys/values for a packed pass: each sequence's rows are written to its own pages,
    and attention reads every sequence's keys/values, concatenated (the pass's mask keeps them apart)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "PackedCache", layer: int):
        super().__init__()
        self.cache, self.layer = cache, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # pages are allocated by the pool
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states [1, H, sum T, D] -> every sequence's keys/values [1, H, sum (start + T), D]
        self.cache.kv.write(self.layer, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        k, v = self.cache.kv.fetch(self.layer)  # [sum (start + T), H, D]
        return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.keys, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class PackedCache(Cache):
    """A transformers Cache for one forward pass over the rows of several sequences, packed one after another:
    parts [(view, start, T)] say where each sequence's rows go (positions [start, start + T) of its view)."""

    def __init__(self, parts: list[tuple[KVView, int, int]], num_layers: int):
        self.kv = PackedKV(parts)
        self.keys = sum(start + T for _, start, T in parts)
        super().__init__(layers=[PackedLayer(self, i) for i in range(num_layers)])


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
    def view(self, seq: Sequence) -> KVView:
        """This model's keys/values of `seq` (in seq's pool)."""
        return seq.pool.view(seq, self.name)

    @torch.inference_mode()
    def forward(self, batch: list[Rows], capture: list[int] = ()) -> list[VerifyOutput]:
        """One forward pass over the rows of every sequence in `batch`, packed one after another -> per sequence
        its logits [T, V] float32 (of its last `Rows.logits` rows; None where none are wanted) and the outputs of decoder layers `capture` (0-based),
        concatenated [T, n*H] (None without). Each sequence's rows attend to its own keys/values only (its
        context, and its rows as `Rows.mask` says); its keys/values go to its pages at the next T positions."""
        for i in capture:
            if not 0 <= i < self.num_layers:
                raise UserError(f"drafter wants verifier layer {i}, the verifier has {self.num_layers} layers")
        parts = []
        for rows in batch:
            start = rows.view.length
            rows.view.extend(start + rows.tokens.numel())
            parts.append((rows.view, start, rows.tokens.numel()))
        total_rows = sum(T for _, _, T in parts)
        cache = PackedCache(parts, self.num_layers)
        mask = torch.zeros(total_rows, cache.keys, dtype=torch.bool)  # [sum T, sum (start + T)] True: attend
        row = key = 0
        for rows, (_, start, T) in zip(batch, parts):
            mask[row : row + T, key : key + start] = True  # the sequence's context
            mask[row : row + T, key + start : key + start + T] = rows.mask()
            row, key = row + T, key + start + T
        positions = torch.cat([rows.positions(start) for rows, (_, start, _) in zip(batch, parts)])  # [sum T]
        captured: dict[int, torch.Tensor] = {}
        hooks = [self.body.layers[i].register_forward_hook(
            lambda _m, _a, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
            for i in capture]
        try:
            out = self.body(
                input_ids=torch.cat([rows.tokens for rows in batch]).to(self.device)[None],
                position_ids=positions.to(self.device)[None], use_cache=True, past_key_values=cache,
                attention_mask=mask.to(self.device)[None, None],
            )
        finally:
            for h in hooks:
                h.remove()
        hidden = out.last_hidden_state[0]  # [sum T, H]
        feats = torch.cat([captured[i][0] for i in capture], dim=-1) if capture else None  # [sum T, n*H]
        # the head once over every sequence's wanted rows (it is the largest matrix: a call per sequence would
        # read it once per sequence)
        wanted, picks, row = [], [], 0
        for rows, (_, _, T) in zip(batch, parts):
            wanted.append(T if rows.logits is None else min(rows.logits, T))
            picks.append(torch.arange(row + T - wanted[-1], row + T))
            row += T
        picks = torch.cat(picks).to(hidden.device)
        logits = self.head(hidden[picks]).float().split(wanted) if picks.numel() else [None] * len(batch)  # [w, V]
        outputs, row = [], 0
        for (_, _, T), w, lg in zip(parts, wanted, logits):
            outputs.append(VerifyOutput(lg if w else None, None if feats is None else feats[row : row + T]))
            row += T
        return outputs

    def prefill(self, seq: Sequence, tokens: torch.Tensor, capture: list[int] = ()) -> torch.Tensor | None:
        if tokens.numel() == 0:
            return None
        return self.forward([Rows(self.view(seq), tokens, logits=0)], capture)[0].hidden

    def score(self, seq: Sequence, tokens: torch.Tensor, parents: torch.Tensor | None = None,
              capture: list[int] = ()) -> VerifyOutput:
        return self.forward([Rows(self.view(seq), tokens, parents)], capture)[0]

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
