"""`hybrid generate`: streaming, --json, and one-line errors with a non-zero exit for bad input."""
import json

import pytest

from conftest import save_tiny
from hybrid.cli import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def run_ok(capsys, *args):
    try:
        main(list(args))
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr()
    return capsys.readouterr()


def test_generate_json_last_line(model_dir, capsys):
    out, err = run_ok(capsys, "generate", "hello", "--verifier", str(model_dir), "--drafter", "ngram",
                      "--max-new-tokens", "12", "--json", "--no-chat")
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("text", "token_ids", "new_tokens", "rounds", "mean_acceptance_length", "acceptance_lengths",
                "tokens_per_s", "wall_s", "block_sizes", "lookup_rounds"):
        assert key in result
    assert result["new_tokens"] == len(result["token_ids"]) <= 12
    assert out.startswith(result["text"])  # the text was streamed before the JSON line


def test_chat_template_is_applied(model_dir, capsys):
    out, _ = run_ok(capsys, "generate", "hi", "--verifier", str(model_dir), "--drafter", "none", "--chat",
                    "--max-new-tokens", "4", "--json")
    assert json.loads(out.strip().splitlines()[-1])["prompt_tokens"] == len("<s>user: hi\n<s>assistant: ") - 2 * 2


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("other") / "llama-130", "llama", vocab=130)


@pytest.mark.parametrize(
    "args, message",
    [
        (["", "--drafter", "none"], "empty prompt"),
        (["hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["hi", "--block-size", "0"], "block size must be auto or an integer >= 1"),
        (["hi", "--top-p", "0"], "top_p"),
        (["hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["x" * 600], "does not fit the verifier's context window"),
        (["hi", "--tree", "65"], "tree must be auto or an integer from 0"),
    ],
)
def test_bad_input_is_one_line_error(model_dir, capsys, args, message):
    code, out, err = run(capsys, "generate", *args[:1], "--verifier", str(model_dir), *args[1:])
    assert code != 0 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_serve_refuses_a_bad_tree_before_loading_models(capsys, tmp_path):
    code, out, err = run(capsys, "serve", "--verifier", str(tmp_path / "missing"), "--tree", "-2")
    assert code == 2 and "tree must be auto or an integer from 0" in err and len(err.strip().splitlines()) == 1


def test_unknown_model_path(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "hi", "--verifier", str(tmp_path / "nope"))
    assert code != 0 and err.startswith("error: model not found") and len(err.strip().splitlines()) == 1


def test_drafter_with_other_vocabulary_is_refused(model_dir, other_vocab_dir, capsys):
    code, _, err = run(capsys, "generate", "hi", "--verifier", str(model_dir), "--drafter", str(other_vocab_dir))
    assert code != 0 and "different vocabularies" in err


def test_block_size_above_drafter_maximum(model_dir, capsys, tmp_path):
    from conftest import make_verifier
    from hybrid.drafters.diffusion import DiffusionDrafter
    from hybrid.verifiers.hf import HFVerifier

    v = HFVerifier.from_pretrained(str(model_dir))
    DiffusionDrafter.for_verifier(v, num_hidden_layers=1, head_dim=16, intermediate_size=32, block_size=8).save(tmp_path / "d")
    code, _, err = run(capsys, "generate", "hi", "--verifier", str(model_dir), "--drafter", str(tmp_path / "d"),
                       "--block-size", "9")
    assert code != 0 and "above the drafter's maximum of 8" in err
    run_ok(capsys, "generate", "hi", "--verifier", str(model_dir), "--drafter", str(tmp_path / "d"), "--block-size", "8",
           "--steps", "2", "--max-new-tokens", "5")
