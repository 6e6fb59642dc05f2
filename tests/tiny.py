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


def write_tiny_gguf(path, seed=0):
    """A tiny Qwen2 model written as a real GGUF file (float32 tensors, a byte-level BPE tokenizer with a
    chat template); returns the transformers model it was made from."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = Qwen2Config(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    toks = list(bytes_to_unicode().values()) + ["he", "ll", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    toks += [f"<pad{i}>" for i in range(264 - len(toks))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(toks)
    w.add_token_types([1] * 258 + [3] * (len(toks) - 258))
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(260)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    sd = model.state_dict()
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    for i in range(2):
        for a, b in [("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
                     ("self_attn.q_proj.weight", "attn_q.weight"), ("self_attn.q_proj.bias", "attn_q.bias"),
                     ("self_attn.k_proj.weight", "attn_k.weight"), ("self_attn.k_proj.bias", "attn_k.bias"),
                     ("self_attn.v_proj.weight", "attn_v.weight"), ("self_attn.v_proj.bias", "attn_v.bias"),
                     ("self_attn.o_proj.weight", "attn_output.weight"), ("mlp.gate_proj.weight", "ffn_gate.weight"),
                     ("mlp.up_proj.weight", "ffn_up.weight"), ("mlp.down_proj.weight", "ffn_down.weight")]:
            names[f"model.layers.{i}.{a}"] = f"blk.{i}.{b}"
    for k, n in names.items():
        w.add_tensor(n, sd[k].float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model

