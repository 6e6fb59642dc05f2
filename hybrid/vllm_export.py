"""`hybrid export-vllm`: our drafters as checkpoints stock vLLM runs: a block-diffusion drafter with
`method="dflash"`, a parallel drafter with `method="draft_model"` and `parallel_drafting: true`.

A parallel drafter (hybrid/drafters/parallel.py) exports as a whole causal LM folder: its LoRA factors merged
into the base model's weights, saved with its tokenizer, and `pard_token` (the mask id vLLM fills a block
with) in config.json.

Our drafter folder is already laid out as vLLM's DFlash drafter (see hybrid/drafters/diffusion.py). Export
checks that it is one, writes a config.json with only what vLLM reads plus our own section (vLLM ignores
unknown keys; `hybrid generate --drafter OUT_DIR` still loads the export), and writes the weights under
vLLM's names, optionally cast. It never writes `n_predict` or `num_speculative_tokens`: the number of
draft tokens (vLLM's K, our block size) is chosen at serving time in `--speculative-config`.

`steps > 1` (several denoising steps per draft) is beyond stock vLLM, which runs one pass: the export then
names the architecture `DFlashHybridDraftModel`, which hybrid's `vllm.general_plugins` entry point
registers (hybrid/vllm_plugin.py); vLLM without hybrid installed refuses it by name.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from hybrid.errors import UserError

STOCK_ARCH = "DFlashDraftModel"
PLUGIN_ARCH = "DFlashHybridDraftModel"
WEIGHTS = "model.safetensors"
DTYPES = ("auto", "bfloat16", "float16", "float32")


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that vLLM's DFlashQwen3ForCausalLM loads, from a DFlash config.json."""
    H, d = cfg["hidden_size"], cfg["head_dim"]
    nh, nkv, inter = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    n_in = (cfg.get("target_hidden_size") or H) * len(cfg["dflash_config"]["target_layer_ids"])
    shapes = {"fc.weight": (H, n_in), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (nh * d, H),
            p + "self_attn.k_proj.weight": (nkv * d, H),
            p + "self_attn.v_proj.weight": (nkv * d, H),
            p + "self_attn.o_proj.weight": (H, nh * d),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (inter, H),
            p + "mlp.up_proj.weight": (inter, H),
            p + "mlp.down_proj.weight": (H, inter),
        })
        if cfg.get("attention_bias"):  # vLLM's DFlash layer then has biases on q/k/v and o_proj
            shapes.update({p + "self_attn.q_proj.bias": (nh * d,), p + "self_attn.k_proj.bias": (nkv * d,),
                           p + "self_attn.v_proj.bias": (nkv * d,), p + "self_attn.o_proj.bias": (H,)})
    return shapes


def read_drafter(path: Path) -> tuple[dict, dict]:
    """(config.json, weights) of one of our drafter folders, or a one-line UserError."""
    from safetensors.torch import load_file

    cfg_file = path / "config.json"
    if not path.is_dir():
        raise UserError(f"drafter folder not found: {path}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"not a block-diffusion drafter folder: {path} (no readable config.json: {e})") from e
    if not isinstance(cfg, dict) or "hybrid_drafter" not in cfg or "dflash_config" not in cfg:
        raise UserError(f"not a block-diffusion drafter folder: {path} (config.json has no hybrid_drafter section; "
                        "make one with `hybrid train-drafter`)")
    if not (path / WEIGHTS).is_file():
        raise UserError(f"not a block-diffusion drafter folder: {path} (no {WEIGHTS})")
    try:
        state = load_file(str(path / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types
        raise UserError(f"unreadable weights {path / WEIGHTS}: {e}") from e
    return cfg, state


def validate(cfg: dict, state: dict, path: Path) -> None:
    """The checks vLLM does not do (it leaves a missing tensor uninitialised) and the config rules it relies on."""
    try:
        want = expected_shapes(cfg)
        dc = cfg["dflash_config"]
        mask_id, layer_ids = int(dc["mask_token_id"]), list(dc["target_layer_ids"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"drafter config in {path} lacks {e} (not a DFlash drafter config)") from e
    missing = sorted(set(want) - set(state))
    if missing:
        raise UserError(f"drafter {path} lacks {len(missing)} weight(s) vLLM needs, e.g. {missing[0]}")
    extra = sorted(set(state) - set(want))
    if extra:
        raise UserError(f"drafter {path} has weight(s) vLLM's DFlash loader rejects, e.g. {extra[0]}")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise UserError(f"weight {name} in {path} has shape {tuple(state[name].shape)}, config says {shape}")
    if layer_ids != sorted(set(layer_ids)) or not layer_ids or min(layer_ids) < 0:
        raise UserError(f"dflash_config.target_layer_ids must be sorted, unique and >= 0, got {layer_ids}")
    if not 0 <= mask_id < cfg["vocab_size"]:
        raise UserError(f"mask_token_id {mask_id} is outside the vocabulary of {cfg['vocab_size']}")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise UserError("num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act must be silu for vLLM's DFlash drafter, got {cfg.get('hidden_act')}")
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        raise UserError("layer_types must all be full_attention (a sliding layer is causal in vLLM's DFlash)")


def vllm_config(cfg: dict, dtype: str, steps: int) -> dict:
    """config.json for vLLM: our config minus keys vLLM would misread, plus the weights' dtype."""
    out = {k: v for k, v in cfg.items() if k not in ("n_predict", "num_speculative_tokens", "is_causal", "causal")}
    out["dflash_config"] = {k: v for k, v in cfg["dflash_config"].items() if k not in ("causal", "denoising_steps")}
    out["torch_dtype"] = dtype
    out["architectures"] = [STOCK_ARCH] if steps == 1 else [PLUGIN_ARCH]
    if steps > 1:
        out["dflash_config"]["denoising_steps"] = steps
    out["use_sliding_window"] = False
    out.pop("layer_types", None)
    return out


def prepare_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise UserError("OUT_DIR must differ from DRAFTER_DIR")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} exists and is not empty (use --overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def export_parallel(src: Path, out: Path, dtype: str, overwrite: bool) -> dict:
    """A parallel drafter as a whole model folder vLLM drafts with in parallel (method draft_model)."""
    import torch

    from hybrid.drafters.parallel import ParallelDrafter

    drafter = ParallelDrafter.load(src, None, "auto" if dtype == "auto" else getattr(torch, dtype))
    prepare_out(src, out, overwrite)
    model = drafter.lm.model
    model.config.pard_token = drafter.mask  # vLLM's parallel drafting fills the block with this token
    model.save_pretrained(out)
    drafter.lm.tokenizer.save_pretrained(out)
    K = drafter.max_block_size
    return {
        "out": str(out), "architecture": model.config.architectures[0], "dtype": str(model.dtype).removeprefix("torch."),
        "denoising_steps": 1, "block_size": K, "tensors": len(model.state_dict()),
        "parameters": sum(p.numel() for p in model.parameters()), "verifier": drafter.config.verifier,
        "speculative_config": {"method": "draft_model", "model": str(out.resolve()), "num_speculative_tokens": K,
                               "parallel_drafting": True},
        "draft_vocabulary_dropped": False,
    }


def export_vllm(drafter_dir: str | Path, out_dir: str | Path, dtype: str = "auto", steps: int = 1,
                overwrite: bool = False) -> dict:
    """Write DRAFTER_DIR as a vLLM checkpoint in OUT_DIR. Returns a summary dict."""
    import torch
    from safetensors.torch import save_file

    from hybrid.drafters.parallel import CONFIG_FILE

    src, out = Path(drafter_dir).expanduser(), Path(out_dir).expanduser()
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be an integer >= 1, got {steps}")
    if (src / CONFIG_FILE).is_file():
        if steps != 1:
            raise UserError("a parallel drafter drafts in one pass: --steps must be 1")
        return export_parallel(src, out, dtype, overwrite)
    cfg, state = read_drafter(src)
    validate(cfg, state, src)
    max_block = int(cfg["hybrid_drafter"].get("block_size", cfg.get("block_size", 2) - 1))
    if steps > max_block:
        raise UserError(f"steps {steps} is above the drafter's block size {max_block}")
    prepare_out(src, out, overwrite)
    if dtype == "auto":
        dtypes = {str(t.dtype).removeprefix("torch.") for t in state.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    tdtype = getattr(torch, dtype)
    state = {k: v.to(tdtype).contiguous() for k, v in sorted(state.items())}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    conf = vllm_config(cfg, dtype, steps)
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    return {
        "out": str(out),
        "architecture": conf["architectures"][0],
        "dtype": dtype,
        "denoising_steps": steps,
        "block_size": max_block,
        "tensors": len(state),
        "parameters": sum(t.numel() for t in state.values()),
        "verifier": cfg["hybrid_drafter"].get("verifier", ""),
        "speculative_config": {"method": "dflash", "model": str(out.resolve()), "num_speculative_tokens": max_block},
        # vLLM's DFlash proposer takes the argmax over the target's whole head: a draft vocabulary of ours
        # (draft_vocab.safetensors) is not carried over, so drafts there may differ slightly from our engine's
        "draft_vocabulary_dropped": (src / "draft_vocab.safetensors").is_file(),
    }
