"""Drafters: the block-diffusion drafter, a causal LM drafter, the n-gram baseline, or none."""
from __future__ import annotations

import json
from pathlib import Path

from hybrid.errors import UserError


ASSETS = Path(__file__).resolve().parent.parent / "assets" / "drafters"


def shipped_drafter(verifier) -> Path | None:
    """The drafter shipped with hybrid for this verifier (a verifier or its spec), if any: a folder under
    hybrid/assets/drafters named after the verifier, holding a block-diffusion drafter (config.json) or a
    parallel drafter (parallel_drafter.json, an adapter over a model the setup builds)."""
    from hybrid.demo import resolve_model
    from hybrid.drafters.parallel import CONFIG_FILE

    spec = verifier if isinstance(verifier, str) else verifier.name_or_path
    name = Path(str(resolve_model(spec)).rstrip("/")).name if spec else ""
    path = ASSETS / name.lower()
    found = name and any((path / f).is_file() for f in ("config.json", CONFIG_FILE))
    return path if found else None


def load_drafter(spec: str | None, verifier, dtype="auto", device: str = "cpu"):
    """`auto` -> the shipped drafter for this verifier, else `ngram`; `none` -> None (plain decoding); `ngram`;
    a block-diffusion drafter folder; a parallel drafter folder; a causal LM (id, folder, .gguf)."""
    if spec == "auto":
        shipped = shipped_drafter(verifier)
        spec = str(shipped) if shipped else "ngram"
    if spec is None or spec == "none":
        return None
    if spec == "ngram":
        from hybrid.drafters.ngram import NgramDrafter

        return NgramDrafter()
    from hybrid.demo import resolve_model

    path = Path(resolve_model(spec)).expanduser()
    from hybrid.drafters.parallel import CONFIG_FILE, ParallelDrafter

    if (path / CONFIG_FILE).is_file():
        return ParallelDrafter.load(path, verifier, dtype, device)
    cfg_file = path / "config.json"
    if cfg_file.is_file() and "hybrid_drafter" in json.loads(cfg_file.read_text()):
        from hybrid.drafters.diffusion import DiffusionDrafter

        return DiffusionDrafter.load(path, verifier)
    if not cfg_file.is_file() and (spec.startswith((".", "/", "~")) or path.exists()) and not spec.endswith(".gguf"):
        raise UserError(f"drafter not found: {spec} (use none, ngram, a drafter folder, or a causal LM)")
    from hybrid.drafters.causal import CausalDrafter

    return CausalDrafter.from_pretrained(str(path) if path.exists() else spec, dtype, device)
