"""`hybrid export-gguf`: our drafters as GGUF files llama.cpp's speculative decoding loads.

Two forms, one per drafter kind:
- A parallel drafter (hybrid/drafters/parallel.py) becomes a whole causal LM of its base model's architecture
  (the LoRA factors merged into the weights). llama.cpp has no parallel (PARD, mask-token) drafting mode, so
  it runs there as an ordinary draft model, `--spec-type draft-simple`: one drafter pass per draft token.
- A block-diffusion drafter (hybrid/drafters/diffusion.py, the DFlash layout) becomes llama.cpp's `dflash`
  architecture, `--spec-type draft-dflash`: the drafter shares the target's embeddings and output head and
  reads the target's hidden states, which llama.cpp takes from layer *inputs* (hence target layer ids + 1).
  It needs a target whose llama.cpp graph exposes its layer inputs (`DFLASH_TARGET_ARCHS`).

Both carry the verifier's tokenizer (byte-level BPE, llama.cpp's "gpt2" model) read from the verifier's
folder, so llama.cpp finds the two vocabularies identical, as speculative decoding there requires. Weights are
written with the `gguf` package; `quantize=` hands the file to llama.cpp's own `llama-quantize` afterwards.
"""
from __future__ import annotations

import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrid.errors import UserError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp architectures whose graphs expose the layer inputs draft-dflash reads (src/models/*.cpp setting
# t_layer_inp in the llama.cpp that `setup.sh --llama-cpp` builds); qwen2 is not among them
DFLASH_TARGET_ARCHS = ("llama", "qwen3", "qwen3moe", "qwen35", "qwen35moe", "qwen3next", "gemma4", "lfm2", "openai-moe",
                       "deepseek4", "minimax-m2", "nemotron_h")
# Hugging Face model_type -> llama.cpp architecture of a whole causal LM
CAUSAL_ARCHS = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "mistral": "llama"}
# pre-tokenizer split regexes of tokenizer.json -> llama.cpp's pre-tokenizer names
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}
PAD_TOKEN = re.compile(r"^\[PAD\d+\]$")


@dataclass(kw_only=True, frozen=True)
class GgufExport:
    """What `export_gguf` writes and how."""

    drafter: Path  # a parallel drafter folder or a block-diffusion drafter folder
    out: Path  # the .gguf file
    verifier: str | None = None  # the folder whose tokenizer goes in (default: the verifier the drafter names)
    outtype: str = "f16"  # 2-D weights; norms and biases stay float32
    quantize: str | None = None  # a llama-quantize type (e.g. Q4_K_M): needs llama.cpp
    overwrite: bool = False

    def validate(self) -> None:
        if self.outtype not in OUTTYPES:
            raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {self.outtype}")
        if not self.drafter.is_dir():
            raise UserError(f"drafter folder not found: {self.drafter}")
        if self.out.suffix.lower() != ".gguf":
            raise UserError(f"the output file must end in .gguf: {self.out}")
        if self.out.exists() and not self.overwrite:
            raise UserError(f"{self.out} exists (use --overwrite)")


def drafter_kind(path: Path) -> str:
    """'parallel' or 'dflash', from what the folder holds; a UserError for anything else."""
    from hybrid.drafters.parallel import CONFIG_FILE

    if (path / CONFIG_FILE).is_file():
        return "parallel"
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        cfg = None
    if isinstance(cfg, dict) and "dflash_config" in cfg:
        return "dflash"
    raise UserError(f"not a drafter folder: {path} (want a parallel drafter, {CONFIG_FILE}, or a block-diffusion "
                    "drafter, config.json with dflash_config)")


# -- tokenizer ---------------------------------------------------------------------------------
def load_tokenizer(verifier: str):
    """The verifier's tokenizer from its folder (a demo:NAME spec is resolved to the converted folder)."""
    from transformers import AutoTokenizer

    from hybrid.demo import resolve_model

    folder = resolve_model(verifier)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the verifier's tokenizer from {folder!r}: pass --verifier FOLDER ({e})") from e


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the tokenizer's split regex ("default" when it is none we know)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Split" and isinstance(node.get("pattern"), dict):
                found.append(node["pattern"].get("Regex"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec.get("pre_tokenizer"))
    return next((PRE_TOKENIZERS[r] for r in found if r in PRE_TOKENIZERS), "default")


def add_vocab(w, tokenizer, vocab_size: int, ids: dict[str, int | None]) -> dict:
    """Write the tokenizer as llama.cpp's byte-level BPE vocabulary of vocab_size tokens (the model's rows:
    ids the tokenizer lacks become unused [PADi] tokens). -> a summary."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "backend_tokenizer", None) else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError("export-gguf writes byte-level BPE tokenizers (Qwen, Llama 3 and the like); this verifier's "
                        f"tokenizer is {model.get('type') or type(tokenizer).__name__}")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None or PAD_TOKEN.match(t):
            tokens.append(t or f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = pre_tokenizer_name(spec)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if ids.get("bos") is not None:
        w.add_bos_token_id(ids["bos"])
    if ids.get("eos") is not None:
        w.add_eos_token_id(ids["eos"])
    if ids.get("pad") is not None:
        w.add_pad_token_id(ids["pad"])
    bos = ids.get("bos")
    w.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
    return {"tokens": len(tokens), "merges": len(merges), "pre_tokenizer": pre}


def special_ids(tokenizer, config: dict) -> dict[str, int | None]:
    """bos / eos / pad ids: the verifier's config.json first (its eos is what generation stops on), else the
    tokenizer's."""
    def first(x):
        return x[0] if isinstance(x, list) and x else x if isinstance(x, int) else None

    return {"bos": first(config.get("bos_token_id")) if config.get("bos_token_id") is not None else tokenizer.bos_token_id,
            "eos": first(config.get("eos_token_id")) if config.get("eos_token_id") is not None else tokenizer.eos_token_id,
            "pad": first(config.get("pad_token_id")) if config.get("pad_token_id") is not None else tokenizer.pad_token_id}


def verifier_config(verifier: str) -> dict:
    from hybrid.demo import resolve_model

    try:
        return json.loads((Path(resolve_model(verifier)) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# -- tensors -----------------------------------------------------------------------------------
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_* of each outtype


def add_weight(w, name: str, t, outtype: str) -> str:
    """One tensor: 1-D ones (norms, biases) as float32, 2-D ones as outtype. -> the type written."""
    import gguf
    import torch

    x = t.detach().to(torch.float32).cpu().numpy()
    if x.ndim == 1 or outtype == "f32":
        w.add_tensor(name, x)
        return "f32"
    if outtype == "f16":
        w.add_tensor(name, x.astype(np.float16))
        return "f16"
    qtype = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if outtype == "q8_0" and x.shape[-1] % 32:
        w.add_tensor(name, x.astype(np.float16))  # Q8_0 packs rows in blocks of 32
        return "f16"
    w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    return outtype


def unrotate(w, heads: int):
    """Hugging Face's llama q/k rows (rotate-half rope) -> llama.cpp's llama layout (interleaved rope pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise UserError(f"export-gguf does not write rope scaling ({params.get('rope_type')})")
    return float(params.get("rope_theta") or getattr(cfg, "rope_theta", 10000.0))


def add_decoder_hparams(w, cfg) -> None:
    """The hyperparameters every decoder llama.cpp loads reads (under the writer's architecture)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)


def write_causal_lm(model, tokenizer, ids: dict, out: Path, outtype: str, extra: dict | None = None) -> dict:
    """A transformers causal LM (qwen2, qwen3, llama, mistral) as a llama.cpp GGUF of its architecture."""
    import gguf

    cfg = model.config
    arch = CAUSAL_ARCHS.get(cfg.model_type)
    if arch is None:
        raise UserError(f"export-gguf writes {', '.join(CAUSAL_ARCHS)} models, not {cfg.model_type}")
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        raise UserError("export-gguf does not write sliding-window attention")
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(Path(str(getattr(cfg, "_name_or_path", "")) or out.stem).name or out.stem)
    add_decoder_hparams(w, cfg)
    w.add_file_type(FILE_TYPES[outtype])
    for k, v in (extra or {}).items():
        w.add_key_value(k, v, gguf.GGUFValueType.STRING if isinstance(v, str) else gguf.GGUFValueType.UINT32)
    vocab = add_vocab(w, tokenizer, model.get_input_embeddings().weight.shape[0], ids)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    state = model.state_dict()
    tied = getattr(cfg, "tie_word_embeddings", False)
    types = {}
    for key, t in state.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"export-gguf has no llama.cpp name for tensor {key}")
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in key else cfg.num_key_value_heads
            assert t.shape[0] == heads * head_dim
            t = unrotate(t, heads)
        types[name] = add_weight(w, name, t, outtype)
    _finish(w)
    return {"architecture": arch, "tensors": len(types), **vocab}


def write_dflash(cfg: dict, state: dict, tokenizer, ids: dict, out: Path, outtype: str) -> dict:
    """A block-diffusion drafter (our DFlash layout) as llama.cpp's `dflash` architecture."""
    import gguf
    from transformers import Qwen3Config

    dc = cfg["dflash_config"]
    hidden = cfg["hidden_size"]
    if (cfg.get("target_hidden_size") or hidden) != hidden:
        raise UserError("llama.cpp's dflash drafter needs the target's hidden size: target_hidden_size "
                        f"{cfg['target_hidden_size']} != hidden_size {hidden}")
    body = Qwen3Config(**{k: v for k, v in cfg.items() if k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
        "rms_norm_eps", "max_position_embeddings", "rope_parameters", "rope_theta", "vocab_size")})
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, body.num_hidden_layers)
    w = gguf.GGUFWriter(str(out), "dflash")
    w.add_name(out.stem)
    add_decoder_hparams(w, body)
    w.add_file_type(FILE_TYPES[outtype])
    w.add_uint32("dflash.block_size", int(dc.get("block_size", cfg.get("block_size", 16))))
    # llama.cpp extracts each layer's input: the output of target layer i is the input of layer i + 1
    w.add_array("dflash.target_layers", [int(i) + 1 for i in dc["target_layer_ids"]])
    causal = cfg.get("is_causal", dc.get("causal"))
    if causal is not None:
        w.add_causal_attention(bool(causal))
    w.add_mask_token_id(int(dc["mask_token_id"]))
    vocab = add_vocab(w, tokenizer, int(cfg["vocab_size"]), ids)
    fixed = {"fc.weight": "fc.weight", "hidden_norm.weight": "enc.output_norm.weight", "norm.weight": "output_norm.weight"}
    count = 0
    for key, t in sorted(state.items()):
        name = fixed.get(key) or names.get_name("model." + key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"export-gguf has no llama.cpp dflash name for tensor {key}")
        add_weight(w, name, t, outtype)
        count += 1
    _finish(w)
    return {"architecture": "dflash", "tensors": count, **vocab}


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- the export ------------------------------------------------------------------------------
def export_gguf(job: GgufExport) -> dict:
    """Write job.drafter as a GGUF llama.cpp runs as a draft model. -> a summary dict."""
    import torch

    job.validate()
    kind = drafter_kind(job.drafter)
    job.out.parent.mkdir(parents=True, exist_ok=True)
    quantized = job.quantize
    if quantized:
        from hybrid.llamacpp import find_tool

        find_tool("llama-quantize")  # fail before the work when llama.cpp is missing
    tmp = job.out.with_name(job.out.name + ".tmp") if quantized else job.out
    if kind == "parallel":
        from hybrid.drafters.parallel import ParallelDrafter

        drafter = ParallelDrafter.load(job.drafter, None, torch.float32)
        verifier = job.verifier or drafter.config.verifier
        if not verifier:
            raise UserError(f"the drafter {job.drafter} names no verifier: pass --verifier FOLDER")
        tokenizer = load_tokenizer(verifier)
        ids = special_ids(tokenizer, verifier_config(verifier))
        extra = {"hybrid.drafter": "parallel", "hybrid.block_size": drafter.max_block_size,
                 "hybrid.mask_token_id": drafter.mask}
        info = write_causal_lm(drafter.lm.model, tokenizer, ids, tmp, job.outtype, extra)
        form = "draft-simple"
        info["note"] = ("llama.cpp has no parallel (mask-token) drafting: this runs as an ordinary draft model "
                        "(--spec-type draft-simple), one drafter pass per draft token")
    else:
        from safetensors.torch import load_file

        cfg = json.loads((job.drafter / "config.json").read_text())
        verifier = job.verifier or cfg.get("hybrid_drafter", {}).get("verifier")
        if not verifier:
            raise UserError(f"the drafter {job.drafter} names no verifier: pass --verifier FOLDER")
        tokenizer = load_tokenizer(verifier)
        ids = special_ids(tokenizer, verifier_config(verifier))
        state = load_file(str(job.drafter / "model.safetensors"))
        info = write_dflash(cfg, state, tokenizer, ids, tmp, job.outtype)
        form = "draft-dflash"
        info["note"] = (f"runs with --spec-type draft-dflash beside a target of architecture "
                        f"{', '.join(DFLASH_TARGET_ARCHS)}; the drafter shares the target's embeddings and head"
                        + (" (its draft vocabulary is not used)" if (job.drafter / "draft_vocab.safetensors").is_file() else ""))
    if quantized:
        quantize_gguf(tmp, job.out, quantized)
        tmp.unlink()
    return {"out": str(job.out), "kind": kind, "spec_type": form, "outtype": quantized or job.outtype,
            "verifier": verifier, **info}


def quantize_gguf(src: Path, out: Path, qtype: str) -> None:
    """llama.cpp's llama-quantize SRC OUT TYPE (e.g. Q4_K_M); a UserError with its last lines on failure."""
    from hybrid.llamacpp import find_tool

    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        rc = subprocess.run([str(find_tool("llama-quantize")), str(src), str(out), qtype], stdout=log,
                            stderr=subprocess.STDOUT).returncode
        if rc != 0:
            log.seek(0)
            tail = " | ".join(log.read().strip().splitlines()[-3:])
            raise UserError(f"llama-quantize {qtype} failed (exit {rc}): {tail}")
