"""The pool of the verifier's own answers: what self-distillation trains on, kept in the repository.

One gzip JSONL file per verifier and answer length, ``data/answers/<verifier>-<new tokens>.jsonl.gz``, one
``{"prompt": [ids], "answer": [ids]}`` line per prompt (greedy; the answer ends with the first EOS when there
is one). A run answers only the prompts the pool lacks and appends them as a new gzip member, so every run
adds to one pool, and a later session (or machine) trains on all of it without answering again. A line cut
short by an interrupted run is skipped.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

POOL_DIR = Path("data") / "answers"  # relative to the working directory: the checkout training runs from


def pool_path(verifier: str, new_tokens: int, folder: Path = POOL_DIR) -> Path:
    """The pool file of a verifier (a spec such as demo:1.5b, a folder or an id) for answers of new_tokens."""
    from hybrid.demo import resolve_model

    name = Path(str(resolve_model(verifier)).rstrip("/")).name.lower() or "verifier"
    return folder / f"{name}-{new_tokens}.jsonl.gz"


def _open(path: Path, mode: str):
    return gzip.open(path, mode + "t") if path.suffix == ".gz" else open(path, mode)


def read_answers(path: Path) -> dict[tuple[int, ...], list[int]]:
    """prompt ids -> answer ids of a pool file (plain or gzip JSONL; absent: empty)."""
    out = {}
    if not path.exists():
        return out
    with _open(path, "r") as f:
        try:
            for line in f:
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue
                out[tuple(d["prompt"])] = list(d["answer"])
        except EOFError:  # a gzip member cut short by an interrupted run: keep what was complete
            pass
    return out


def append_answers(path: Path, pairs: list[tuple[list[int], list[int]]]) -> None:
    """Add (prompt ids, answer ids) pairs to a pool file (one gzip member per call for .gz)."""
    if not pairs:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open(path, "a") as f:
        f.write("".join(json.dumps({"prompt": list(p), "answer": list(a)}) + "\n" for p, a in pairs))
