"""`hybrid export-gguf`: our drafters as GGUF files in llama.cpp's layout, read back with the gguf package
(no llama.cpp needed)."""
import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny_bytes import BYTE_VOCAB, byte_tokenizer, save_byte_model, save_diffusion_drafter, save_parallel_drafter
from hybrid.cli import main
from hybrid.errors import UserError
from hybrid.gguf_export import GgufExport, export_gguf


def fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def check_tokenizer(kv, tok):
    """The GGUF holds the verifier's tokenizer: every id's text, its type, the merges, the special ids."""
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == BYTE_VOCAB and kv["tokenizer.ggml.model"] == "gpt2"
    by_id = {i: t for t, i in tok.get_vocab().items()}
    assert all(tokens[i] == by_id[i] for i in by_id)
    assert tokens[263:] == [f"[PAD{i}]" for i in range(263, BYTE_VOCAB)]  # the tokenizer's or rows it lacks
    types = kv["tokenizer.ggml.token_type"]
    special = tok.convert_tokens_to_ids("<|im_end|>")
    assert types[by_id_of(tok, "A")] == gguf.TokenType.NORMAL and types[special] == gguf.TokenType.CONTROL
    assert types[by_id_of(tok, "<tool_call>")] == gguf.TokenType.USER_DEFINED
    assert types[BYTE_VOCAB - 1] == gguf.TokenType.UNUSED
    assert kv["tokenizer.ggml.merges"] == ["h e", "l l"]
    assert kv["tokenizer.ggml.eos_token_id"] == special
    assert kv["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.chat_template"] == tok.chat_template


def by_id_of(tok, text):
    return tok.get_vocab()[text]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return save_byte_model(tmp_path_factory.mktemp("m") / "tiny-qwen2", "qwen2", pads=False)


def test_parallel_drafter_is_a_whole_model_of_its_base_architecture(qwen2_dir, tmp_path):
    from hybrid.drafters.parallel import ParallelDrafter

    d = save_parallel_drafter(tmp_path / "drafter", qwen2_dir)
    info = export_gguf(GgufExport(drafter=d, out=tmp_path / "d.gguf", outtype="f32"))
    assert info["kind"] == "parallel" and info["spec_type"] == "draft-simple" and info["architecture"] == "qwen2"
    r, kv = fields(tmp_path / "d.gguf")
    assert kv["general.architecture"] == "qwen2" and kv["qwen2.block_count"] == 2
    assert kv["qwen2.embedding_length"] == 64 and kv["qwen2.attention.head_count_kv"] == 2
    assert kv["hybrid.drafter"] == "parallel" and kv["hybrid.block_size"] == 4
    check_tokenizer(kv, byte_tokenizer(pads=False))
    # the weights are the base's with the LoRA factors merged in, under llama.cpp's names, dims reversed
    merged = ParallelDrafter.load(d, None, torch.float32).lm.model.state_dict()
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == len(merged)
    q = tensors["blk.1.attn_q.weight"]
    assert list(q.shape) == [64, 64] and q.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_allclose(np.asarray(q.data).reshape(64, 64), merged["model.layers.1.self_attn.q_proj.weight"].numpy())
    assert not torch.equal(merged["model.layers.1.self_attn.q_proj.weight"],
                           load_file(str(qwen2_dir / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"])
    assert list(tensors["token_embd.weight"].shape) == [64, BYTE_VOCAB] and "output.weight" in tensors
    assert tensors["blk.0.attn_k.bias"].tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("outtype,qtype", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_outtypes_quantize_matrices_and_keep_norms_in_float32(qwen2_dir, tmp_path, outtype, qtype):
    d = save_parallel_drafter(tmp_path / "drafter", qwen2_dir, lora=False)
    export_gguf(GgufExport(drafter=d, out=tmp_path / "d.gguf", outtype=outtype))
    r, kv = fields(tmp_path / "d.gguf")
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.ffn_up.weight"] == qtype and types["blk.0.attn_norm.weight"] == "F32"
    assert kv["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[outtype]


def test_llama_q_and_k_rows_are_reordered_for_llama_cpps_rope(tmp_path):
    base = save_byte_model(tmp_path / "tiny-llama", "llama")
    d = save_parallel_drafter(tmp_path / "drafter", base, lora=False)
    export_gguf(GgufExport(drafter=d, out=tmp_path / "d.gguf", outtype="f32"))
    r, kv = fields(tmp_path / "d.gguf")
    assert kv["general.architecture"] == "llama"
    hf = load_file(str(base / "model.safetensors"))["model.layers.0.self_attn.k_proj.weight"]  # [2 heads x 16, 64]
    got = np.asarray(next(t for t in r.tensors if t.name == "blk.0.attn_k.weight").data).reshape(32, 64)
    # per head, rows (0..7 | 8..15) interleave as 0, 8, 1, 9, ...: rope pairs adjacent
    np.testing.assert_array_equal(got[:4], hf[[0, 8, 1, 9]].numpy())
    np.testing.assert_array_equal(got[16:18], hf[[16, 24]].numpy())


def test_diffusion_drafter_is_llama_cpps_dflash_architecture(tmp_path):
    target = save_byte_model(tmp_path / "tiny-qwen3", "qwen3", layers=4)
    d = save_diffusion_drafter(tmp_path / "drafter", target)
    cfg = json.loads((d / "config.json").read_text())
    info = export_gguf(GgufExport(drafter=d, out=tmp_path / "d.gguf", outtype="f32"))
    assert info["spec_type"] == "draft-dflash" and "qwen3" in info["note"]
    r, kv = fields(tmp_path / "d.gguf")
    assert kv["general.architecture"] == "dflash"
    assert kv["dflash.target_layers"] == [i + 1 for i in cfg["dflash_config"]["target_layer_ids"]]
    assert kv["dflash.block_size"] == cfg["dflash_config"]["block_size"]
    assert kv["tokenizer.ggml.mask_token_id"] == byte_tokenizer().convert_tokens_to_ids("<|fim_pad|>")
    assert kv["dflash.attention.key_length"] == 16 and kv["dflash.block_count"] == 1
    check_tokenizer(kv, byte_tokenizer())
    names = {t.name: list(t.shape) for t in r.tensors}
    n_in = 64 * len(cfg["dflash_config"]["target_layer_ids"])
    assert names["fc.weight"] == [n_in, 64] and names["enc.output_norm.weight"] == [64]
    assert names["output_norm.weight"] == [64] and names["blk.0.attn_q_norm.weight"] == [16]
    assert "token_embd.weight" not in names and "output.weight" not in names  # shared with the target


def test_bad_input_is_one_line_and_exit_2(qwen2_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="not a drafter folder"):
        export_gguf(GgufExport(drafter=qwen2_dir, out=tmp_path / "x.gguf"))
    d = save_parallel_drafter(tmp_path / "drafter", qwen2_dir, lora=False)
    with pytest.raises(UserError, match="outtype"):
        export_gguf(GgufExport(drafter=d, out=tmp_path / "x.gguf", outtype="q4"))
    with pytest.raises(UserError, match=r"\.gguf"):
        export_gguf(GgufExport(drafter=d, out=tmp_path / "x.bin"))
    (tmp_path / "x.gguf").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["export-gguf", str(d), str(tmp_path / "x.gguf")])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_cli_prints_what_it_wrote(qwen2_dir, tmp_path, capsys):
    d = save_parallel_drafter(tmp_path / "drafter", qwen2_dir, lora=False)
    main(["export-gguf", str(d), str(tmp_path / "d.gguf"), "--outtype", "f16"])
    out = capsys.readouterr().out
    assert "qwen2" in out and "draft-simple" in out and "llama-server" in out
    main(["export-gguf", str(d), str(tmp_path / "d.gguf"), "--overwrite", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["architecture"] == "qwen2"
