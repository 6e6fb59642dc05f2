"""Drafters: the block-diffusion drafter, a causal LM drafter, the n-gram baseline, or none."""
from __future__ import annotations

import json
from pathlib import Path

from hybrid.errors import UserError


def load_drafter(spec: str | None, verifier, dtype="auto", device: str = "cpu"):
    """`none` -> None (plain decoding); `ngram`; a block-diffusion drafter folder; a causal LM (id, folder, .gguf)."""
    if spec is None or spec == "none":
        return None
    if spec == "ngram":
        from hybrid.drafters.ngram import NgramDrafter

        return NgramDrafter()
    from hybrid.demo import resolve_model

    path = Path(resolve_model(spec)).expanduser()
    cfg_file = path / "config.json"
    if cfg_file.is_file() and "hybrid_drafter" in json.loads(cfg_file.read_text()):
        from hybrid.drafters.diffusion import DiffusionDrafter

        return DiffusionDrafter.load(path, verifier)
    if not cfg_file.is_file() and (spec.startswith((".", "/", "~")) or path.exists()) and not spec.endswith(".gguf"):
        raise UserError(f"drafter not found: {spec} (use none, ngram, a drafter folder, or a causal LM)")
    from hybrid.drafters.causal import CausalDrafter

    return CausalDrafter.from_pretrained(str(path) if path.exists() else spec, dtype, device)
