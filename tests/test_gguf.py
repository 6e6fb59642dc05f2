"""A local .gguf file loads as verifier (transformers' GGUF reader, dequantized) and decodes exactly."""
import torch

from conftest import greedy_reference
from tiny import write_tiny_gguf
from hybrid.engine import Engine, GenerationConfig
from hybrid.verifiers.hf import HFVerifier


def test_gguf_verifier_loads_and_speculates_losslessly(tmp_path):
    path = tmp_path / "tiny-qwen2.gguf"
    reference_model = write_tiny_gguf(path)
    v = HFVerifier.from_pretrained(str(path), torch.float32)
    assert v.tokenizer.chat_template and v.vocab_size == 264
    ids = v.encode("hello hello")
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(v.model(x).logits, reference_model(x).logits, atol=1e-4, rtol=1e-4)
    ref = greedy_reference(v, ids, 16)
    r = Engine(v, None, num_pages=8).generate(ids, GenerationConfig(max_new_tokens=16, stop_on_eos=False))
    assert r.token_ids == ref
