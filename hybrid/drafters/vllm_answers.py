"""Self-distillation answers from vLLM: the verifier answers prompts greedily, batched by vLLM's scheduler.

On this 2-core CPU vLLM answers ~50 new tokens/s for Qwen2.5-Coder-1.5B (64 prompts at once), transformers'
batched `generate` ~13; the target layers' hidden states then come from one transformers prefill per
answer (`train.featurise`, ~100 tokens/s), so the whole pass is about twice as fast.

Runs in a child process (vLLM holds its engine and threads for the life of a process):

    python -m hybrid.drafters.vllm_answers JOB.json ANSWERS.jsonl

JOB: {"model": path, "dtype": "bfloat16", "new_tokens": N, "prompts": [[ids...], ...], "chunk": 256}.
ANSWERS (the answers pool, hybrid.drafters.answers: .jsonl or .jsonl.gz) gets one {"prompt": [ids], "answer":
[ids]} line per prompt, appended chunk by chunk, so an interrupted run keeps what it answered.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from hybrid.drafters.answers import append_answers, read_answers
from hybrid.errors import UserError


def main(job_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(open(job_path).read())
    prompts = job["prompts"]
    gpu = torch.cuda.is_available()
    # KV cache: on a CPU a fixed 2 GiB (plenty for answers of a few hundred tokens, 48 at a time), not a share of
    # the node's memory, which the training process (verifier, features) may already hold and vLLM then refuses
    kv = os.environ.get("HYBRID_VLLM_KV_BYTES", None if gpu else str(2 << 30))
    memory = {"kv_cache_memory_bytes": int(kv)} if kv else {}
    llm = LLM(job["model"], dtype=job.get("dtype", "bfloat16"), enforce_eager=not gpu, seed=0,
              max_model_len=max(len(p) for p in prompts) + job["new_tokens"], **memory)
    params = SamplingParams(temperature=0, max_tokens=job["new_tokens"])
    chunk = int(job.get("chunk", 256))
    for i in range(0, len(prompts), chunk):
        part = prompts[i: i + chunk]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in part], params, use_tqdm=False)
        append_answers(Path(out_path), [(p, list(o.outputs[0].token_ids)) for p, o in zip(part, outs)])
        print(f"answered {min(i + chunk, len(prompts))}/{len(prompts)}", flush=True)


def answer_with_vllm(model: str, prompts: list[list[int]], new_tokens: int, dtype: str,
                     path: Path) -> dict[tuple[int, ...], list[int]]:
    """Greedy answers to `prompts` (token ids) from vLLM in a child process, added to the pool `path`: prompts
    answered there before are not answered again."""
    have = read_answers(path)
    todo = list({tuple(p): list(p) for p in prompts if tuple(p) not in have}.values())
    if todo:
        if importlib.util.find_spec("vllm") is None:
            raise UserError("--gen-backend vllm needs vLLM: bash setup.sh --vllm (or use --gen-backend hf)")
        path.parent.mkdir(parents=True, exist_ok=True)
        job = path.with_name(path.name.removesuffix(".gz").removesuffix(".jsonl") + ".job.json")
        job.write_text(json.dumps({"model": model, "dtype": dtype, "new_tokens": new_tokens, "prompts": todo}))
        rc = subprocess.run([sys.executable, "-m", "hybrid.drafters.vllm_answers", str(job), str(path)]).returncode
        if rc != 0:
            raise UserError(f"vLLM stopped with exit code {rc} while answering prompts (its log is above): if it "
                            "lacked memory, set HYBRID_VLLM_KV_BYTES (its KV cache in bytes, 2 GiB on a CPU by "
                            "default); --gen-backend hf answers with transformers instead")
        have = read_answers(path)
    return have


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
