import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny, tiny_model, tiny_tokenizer  # noqa: E402

from hybrid.verifiers.hf import HFVerifier  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


def make_verifier(family="qwen3", seed=0, **kw) -> HFVerifier:
    return HFVerifier(tiny_model(family, seed, **kw), tiny_tokenizer())


def greedy_reference(verifier: HFVerifier, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding with transformers' own generate (its own cache, no pages)."""
    out = verifier.model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Qwen3 verifier saved as a real model folder."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen3", "qwen3")
