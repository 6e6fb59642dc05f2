"""Vocabulary identity: a drafter only works with a verifier that shares its tokenizer."""
from __future__ import annotations

import hashlib
import json

from hybrid.errors import UserError


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's token -> id map (16 hex digits)."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_same_vocab(verifier, tokenizer=None, vocab_size: int | None = None, what: str = "drafter",
                     fingerprint: str | None = None) -> None:
    """Raise UserError unless the drafter's vocabulary matches the verifier's."""
    if vocab_size is not None and vocab_size != verifier.vocab_size:
        raise UserError(
            f"{what} and verifier have different vocabularies ({vocab_size} vs {verifier.vocab_size} tokens): "
            f"use a {what} made for this verifier"
        )
    theirs = fingerprint or (vocab_fingerprint(tokenizer) if tokenizer is not None else None)
    if theirs is not None and theirs != vocab_fingerprint(verifier.tokenizer):
        raise UserError(f"{what} and verifier have different tokenizers: use a {what} made for this verifier")
