"""Tiny models with a byte-level BPE tokenizer (the kind llama.cpp's "gpt2" vocabulary is), built in memory and
saved as model folders: verifiers, an assistant and our drafters for the GGUF export and llama.cpp tests."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tiny import tiny_model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_pad|>"]
EXTRA = ["<tool_call>"]  # an added token that is not special: llama.cpp's user-defined type
BYTE_VOCAB = 272  # model rows: 256 bytes + 5 added tokens + 11 rows the tokenizer lacks
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(pads: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the 256 byte symbols, two merges, Qwen-style special tokens; with `pads`, [PADi] tokens
    for the model's remaining rows, as a tokenizer converted from a GGUF has (the demo models')."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab["he"] = len(vocab)
    vocab["ll"] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=[("h", "e"), ("l", "l")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:])
    fast.add_tokens(EXTRA)
    if pads:
        fast.add_tokens([f"[PAD{i}]" for i in range(len(fast), BYTE_VOCAB)])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_byte_model(path: Path, family: str = "qwen2", seed: int = 0, pads: bool = True, **kw) -> Path:
    """A tiny causal LM of `family` with the byte tokenizer, saved as a model folder."""
    tok = byte_tokenizer(pads)
    kw.setdefault("layers", 2)
    model = tiny_model(family, seed, vocab=BYTE_VOCAB, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       **kw)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_parallel_drafter(path: Path, base: Path, block_size: int = 4, lora: bool = True) -> Path:
    """A parallel drafter over the causal LM folder `base`: LoRA factors (random, so the merge shows), or without
    them the base model itself in the folder."""
    import shutil

    from safetensors.torch import save_file

    from hybrid.drafters.parallel import ADAPTER_FILE, ParallelConfig, lora_targets, save_config
    from hybrid.verifiers.hf import load_causal_lm

    mask = byte_tokenizer().convert_tokens_to_ids("<|fim_pad|>")
    rank = 2 if lora else 0
    if not lora:
        shutil.copytree(base, path)
    save_config(ParallelConfig(base=str(base) if lora else "", mask_token_id=mask, block_size=block_size,
                               lora_rank=rank, lora_alpha=2.0 * rank, verifier=str(base)), path)
    if lora:
        model, _ = load_causal_lm(str(base), torch.float32)
        g = torch.Generator().manual_seed(1)
        adapter = {}
        for name in lora_targets(model):
            w = dict(model.named_modules())[name].weight
            adapter[f"{name}.lora_A"] = torch.randn(rank, w.shape[1], generator=g) * 0.05
            adapter[f"{name}.lora_B"] = torch.randn(w.shape[0], rank, generator=g) * 0.05
        save_file(adapter, str(path / ADAPTER_FILE))
    return path


def save_diffusion_drafter(path: Path, verifier_dir: Path) -> Path:
    """An untrained block-diffusion drafter (DFlash layout) for the verifier folder."""
    from hybrid.drafters.diffusion import DiffusionDrafter
    from hybrid.verifiers.hf import HFVerifier

    torch.manual_seed(0)
    v = HFVerifier.from_pretrained(str(verifier_dir), torch.float32)
    d = DiffusionDrafter.for_verifier(v, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, intermediate_size=64, block_size=4)
    d.config.verifier = str(verifier_dir)
    d.save(path)
    return path
