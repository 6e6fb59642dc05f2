"""Tiny models and a tiny tokenizer built in memory (no downloads), saved as real model folders."""
from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

SPECIALS = ["<unk>", "<s>", "</s>", "<mask>"]
VOCAB = 128  # model vocabulary (the tokenizer uses the first ~100 ids)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer(vocab_extra: str = "") -> PreTrainedTokenizerFast:
    chars = list(dict.fromkeys(string.printable[:95] + vocab_extra))  # printable ASCII, space included
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", mask_token="<mask>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


FAMILIES = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
}


def tiny_config(family: str = "qwen3", layers: int = 4, hidden: int = 64, vocab: int = VOCAB, **kw):
    cls = FAMILIES[family]
    args = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if family == "qwen3":
        args["head_dim"] = hidden // 4
    args.update(kw)
    return cls(**args)


def tiny_model(family: str = "qwen3", seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=torch.float32)
    # larger weights than the default init: peaked, varied next-token distributions
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


def save_tiny(path: Path, family: str = "qwen3", seed: int = 0, **kw) -> Path:
    model = tiny_model(family, seed, **kw)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
