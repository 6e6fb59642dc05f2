"""`hybrid export-vllm`: the checkpoint vLLM's DFlash loader expects, and one-line errors (no vLLM needed)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_verifier
from hybrid.cli import main
from hybrid.drafters.diffusion import DiffusionDrafter
from hybrid.errors import UserError
from hybrid.vllm_export import PLUGIN_ARCH, STOCK_ARCH, expected_shapes, export_vllm


@pytest.fixture
def drafter_dir(tmp_path):
    torch.manual_seed(0)
    v = make_verifier("qwen3")
    d = DiffusionDrafter.for_verifier(v, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, intermediate_size=64, block_size=8)
    d.save(tmp_path / "drafter")
    return tmp_path / "drafter"


def test_export_is_a_stock_dflash_checkpoint(drafter_dir, tmp_path):
    info = export_vllm(drafter_dir, tmp_path / "out", dtype="bfloat16")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == [STOCK_ARCH] and cfg["model_type"] == "qwen3"
    assert set(cfg["dflash_config"]) >= {"mask_token_id", "target_layer_ids"}
    assert "n_predict" not in cfg and "num_speculative_tokens" not in cfg and "denoising_steps" not in cfg["dflash_config"]
    assert cfg["torch_dtype"] == "bfloat16" and cfg["head_dim"] == 16 and cfg["hidden_act"] == "silu"
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(cfg)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert not any(k.startswith("model.") or "embed_tokens" in k or "lm_head" in k for k in state)
    assert info["speculative_config"]["method"] == "dflash" and info["speculative_config"]["num_speculative_tokens"] == 8
    # our engine still loads the export (it keeps the hybrid_drafter section)
    d = DiffusionDrafter.load(tmp_path / "out", make_verifier("qwen3"))
    assert d.max_block_size == 8


def test_multi_step_export_names_the_plugin_architecture(drafter_dir, tmp_path):
    info = export_vllm(drafter_dir, tmp_path / "out", steps=3)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == [PLUGIN_ARCH] and cfg["dflash_config"]["denoising_steps"] == 3
    assert info["dtype"] == "float32"


def test_bad_input_is_one_line(drafter_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="not a block-diffusion drafter"):
        export_vllm(tmp_path, tmp_path / "out")  # a folder without config.json
    with pytest.raises(UserError, match="steps"):
        export_vllm(drafter_dir, tmp_path / "out", steps=9)
    # a weight missing: vLLM would leave it uninitialised silently, export refuses
    state = load_file(str(drafter_dir / "model.safetensors"))
    del state["layers.1.mlp.up_proj.weight"]
    save_file(state, str(drafter_dir / "model.safetensors"))
    with pytest.raises(UserError, match="lacks 1 weight"):
        export_vllm(drafter_dir, tmp_path / "out")

    with pytest.raises(SystemExit) as e:
        main(["export-vllm", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: drafter folder not found") and err.count("\n") == 1


def test_cli_export_prints_the_serve_command(drafter_dir, tmp_path, capsys):
    main(["export-vllm", str(drafter_dir), str(tmp_path / "out"), "--json"])
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["architecture"] == STOCK_ARCH
    with pytest.raises(SystemExit) as e:  # not empty: refuses without --overwrite
        main(["export-vllm", str(drafter_dir), str(tmp_path / "out")])
    assert e.value.code == 2
    main(["export-vllm", str(drafter_dir), str(tmp_path / "out"), "--overwrite"])
    out = capsys.readouterr().out
    assert "vllm serve" in out and '"method": "dflash"' in out
