"""The `hybrid` command line."""
from __future__ import annotations

import json
import sys

import click

from hybrid.errors import UserError

DEFAULT_VERIFIER = "demo:1.5b"


def _dtype_option(f):
    return click.option(
        "--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
        help="Weights and KV dtype (auto: the checkpoint's; bfloat16 for half checkpoints on CPU).",
    )(f)


def _torch_dtype(name: str):
    import torch

    return name if name == "auto" else getattr(torch, name)


class AutoInt(click.ParamType):
    """An integer or the word auto."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither an integer nor auto", param, ctx)


AUTO_INT = AutoInt()


def _tree_option(f):
    return click.option(
        "--tree", type=AUTO_INT, default="auto", show_default=True,
        help="Verify draft trees of up to N tokens (the drafter's most probable paths through each position's top "
             "candidates), 0: chains; auto: 8 with --block-size auto (trimmed per round to what pays), chains with "
             "a fixed block size.",
    )(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """hybrid: lossless speculative decoding with a block-diffusion drafter."""


@cli.command()
@click.argument("prompt")
@click.option("--verifier", default=DEFAULT_VERIFIER, show_default=True, help="Hugging Face id, local folder, .gguf file or demo:NAME.")
@click.option("--drafter", default="auto", show_default=True,
              help="auto (the drafter shipped for this verifier, else ngram), none, ngram, a block-diffusion or parallel drafter folder, or a causal LM.")
@click.option("--block-size", type=AUTO_INT, default="auto", show_default=True,
              help="Draft tokens per round, or auto (the coordinator picks per round).")
@click.option("--steps", type=AUTO_INT, default="auto", show_default=True,
              help="Denoising steps per draft, or auto (picked with --block-size auto; else 1).")
@click.option("--trim/--no-trim", default=True, show_default=True,
              help="With --block-size auto: verify only as much of each draft as the drafter's confidence pays for.")
@click.option("--lookup", type=click.IntRange(min=0), default=2, show_default=True,
              help="Prompt lookup first: when the last N+ tokens occurred earlier, draft what followed them (0: off).")
@_tree_option
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 turns it off.")
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--chat/--no-chat", default=False, show_default=True, help="Apply the tokenizer's chat template.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of results.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--num-pages", type=int, default=None, help="KV page budget (default: one full context window).")
@click.option("--page-size", type=int, default=16, show_default=True)
@_dtype_option
def generate(prompt, verifier, drafter, block_size, steps, trim, lookup, tree, max_new_tokens, temperature, top_p, top_k, seed, stop,
             chat, as_json, device, num_pages, page_size, dtype):
    """Generate a continuation of PROMPT, streaming text as the verifier commits it."""
    from hybrid.engine import Engine, GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, block_size=block_size, steps=steps, temperature=temperature,
                           top_p=top_p, top_k=top_k, seed=seed, stop=stop, trim=trim, lookup=lookup,
                           tree=tree)  # checked now, before any model loads
    if not prompt.strip():
        raise UserError("empty prompt: give at least one token of text")
    _quiet_transformers()
    engine = Engine.load(verifier, drafter, _torch_dtype(dtype), device, num_pages=num_pages, page_size=page_size)

    def show(text):
        click.echo(text, nl=False)
        sys.stdout.flush()

    result = engine.generate(prompt, cfg, chat=chat, on_text=show)
    click.echo()
    if as_json:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        click.echo(
            f"[{result.new_tokens} tokens, {result.tokens_per_s:.2f} tok/s, mean acceptance length "
            f"{result.mean_acceptance_length:.2f} over {result.rounds} rounds, {result.finish_reason}]",
            err=True,
        )


@cli.command("train-drafter")
@click.option("--verifier", default=DEFAULT_VERIFIER, show_default=True, help="The verifier to distil from.")
@click.option("--corpus", multiple=True, help="Text files or folders (repeatable): the verifier's predictions on them.")
@click.option("--prompts", multiple=True, metavar="FILE",
              help="JSONL prompt files (as for bench; repeatable): the verifier's own greedy answers (self-distillation).")
@click.option("--gen-tokens", type=int, default=128, show_default=True, help="New tokens per answer to --prompts.")
@click.option("--gen-batch", type=int, default=32, show_default=True, help="Answers generated at once.")
@click.option("--gen-backend", type=click.Choice(["hf", "vllm", "pool"]), default="hf", show_default=True,
              help="Who answers --prompts: transformers' generate, or vLLM (answers ~4x faster on a CPU; the hidden "
                   "states then take one transformers pass per answer: ~2x overall); pool: nobody, a parallel drafter "
                   "trains on the prompts the answers pool has answered.")
@click.option("--answers", default=None, metavar="FILE",
              help="The pool of the verifier's answers to read and add to [default: data/answers/<verifier>-<gen-tokens>"
                   ".jsonl.gz, committed with the repository].")
@click.option("--answers-only", is_flag=True, help="Answer the --prompts the pool lacks, add them to it, and stop.")
@click.option("--max-prompts", type=int, default=None, help="Use at most N of the --prompts (shuffled with --seed).")
@click.option("--gen-batches", type=int, default=None,
              help="Answer at most N batches of prompts (a fixed order; cached answers of a longer run are reused).")
@click.option("--loss-vocab", type=int, default=32768, show_default=True,
              help="Tokens in the training softmax: the verifier's most frequent predictions plus each batch's targets (0: all).")
@click.option("--init", default=None, metavar="DRAFTER_DIR", help="Start from this drafter's weights (same architecture).")
@click.option("--init-from", default=None, metavar="MODEL",
              help="Adapt this pretrained causal LM of the verifier's family (e.g. demo:0.5b) into a parallel drafter "
                   "(PARD: a block of mask tokens in one pass; LoRA) instead of training a diffusion drafter.")
@click.option("--lora-rank", type=int, default=16, show_default=True, help="With --init-from: LoRA rank.")
@click.option("--lora-alpha", type=float, default=32.0, show_default=True, help="With --init-from: LoRA alpha.")
@click.option("--eval-every", type=int, default=50, show_default=True,
              help="Steps between points of the held-out learning curve (OUT/curve.jsonl): teacher-forced acceptance "
                   "length of blocks drafted at every 4th answer position of the held-out answers.")
@click.option("--init-layers-from-verifier", default=None, metavar="LAYER[,LAYER]",
              help="Start the drafter's layers from these decoder layers of the verifier (0-based, one per drafter "
                   "layer; sets --layers, --heads, --kv-heads, --head-dim and --intermediate-size to the verifier's). "
                   "fc passes the last target layer through; see hybrid/drafters/init_layers.py.")
@click.option("--soft-targets", type=int, default=0, show_default=True, metavar="K",
              help="Keep the verifier's top K next-token probabilities with the features and learn them: each row's "
                   "loss is the cross-entropy against them, renormalised (0: the verifier's greedy token only).")
@click.option("--soft-weight", type=float, default=1.0, show_default=True,
              help="With --soft-targets: the soft cross-entropy's share of each row's loss; the rest is the greedy token's.")
@click.option("--feature-cache", default=None, metavar="DIR",
              help="Folder of the verifier's features of the answers [default: OUT/generated]: runs that read the same "
                   "verifier layers share one, so each answer costs one verifier pass.")
@click.option("--features-only", is_flag=True, help="Featurise the answers (and corpus) into the caches and stop.")
@click.option("--out", required=True, help="Output drafter folder (checkpoints go there too).")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--block-size", type=int, default=16, show_default=True)
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--max-chunks", type=int, default=256, show_default=True, help="Corpus chunks of --seq-len tokens to use.")
@click.option("--anchors", type=int, default=32, show_default=True, help="Blocks per chunk per step.")
@click.option("--lr", type=float, default=6e-4, show_default=True)
@click.option("--gamma", type=float, default=7.0, show_default=True,
              help="Loss weight decay over block rows, exp(-(k-1)/gamma): lower puts the early rows first (DFlash: 7 for blocks of 16).")
@click.option("--layers", type=int, default=1, show_default=True)
@click.option("--intermediate-size", type=int, default=3584, show_default=True)
@click.option("--heads", type=int, default=12, show_default=True)
@click.option("--kv-heads", type=int, default=2, show_default=True)
@click.option("--head-dim", type=int, default=128, show_default=True)
@click.option("--checkpoint-every", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@click.option("--eval-prompts", type=int, default=4, show_default=True, help="Held-out prompts for the final engine run (0: skip).")
@_dtype_option
def train_drafter(verifier, corpus, prompts, gen_tokens, gen_batch, gen_backend, answers, answers_only, max_prompts, gen_batches, loss_vocab, init, init_from, lora_rank, lora_alpha, eval_every,
                  init_layers_from_verifier, soft_targets, soft_weight, feature_cache, features_only, out, steps, block_size, seq_len, max_chunks, anchors, lr, gamma, layers, intermediate_size,
                  heads, kv_heads, head_dim, checkpoint_every, seed, resume, eval_prompts, dtype):
    """Distil a block-diffusion drafter for VERIFIER from its own predictions on a corpus and/or its own
    answers to prompts."""
    from hybrid.drafters.answers import pool_path
    from hybrid.drafters.train import TrainConfig, build_features, evaluate_engine, fill_answers, train

    _quiet_transformers()
    try:
        init_layers = [int(x) for x in init_layers_from_verifier.split(",")] if init_layers_from_verifier else None
    except ValueError:
        raise click.BadParameter(f"{init_layers_from_verifier!r}: give layer numbers, e.g. 25 or 25,26",
                                 param_hint="--init-layers-from-verifier")
    cfg = TrainConfig(
        verifier=verifier, corpus=list(corpus), out=out, block_size=block_size, seq_len=seq_len, max_chunks=max_chunks,
        anchors=anchors, steps=steps, lr=lr, gamma=gamma, seed=seed, checkpoint_every=checkpoint_every, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=intermediate_size, dtype="bfloat16" if dtype == "auto" else dtype,
        eval_prompts=eval_prompts, prompts=list(prompts), gen_tokens=gen_tokens, gen_batch=gen_batch, gen_backend=gen_backend,
        max_prompts=max_prompts, gen_batches=gen_batches, loss_vocab=loss_vocab, init=init, extra={"resume": resume},
        answers=answers or str(pool_path(verifier, gen_tokens)), init_from=init_from, lora_rank=lora_rank,
        lora_alpha=lora_alpha, eval_every=eval_every, init_layers_from_verifier=init_layers, soft_targets=soft_targets,
        soft_weight=soft_weight, feature_cache=feature_cache,
    )
    if answers_only:
        n, added = fill_answers(cfg)
        click.echo(f"{cfg.answers}: {n} answers ({added} new)")
        return
    if features_only:
        r = build_features(cfg)
        click.echo(f"features of {r['answers']} answers/chunks ({r['positions']} positions) in {r['wall_s']:.0f} s")
        return
    report = train(cfg)
    tau = report["heldout"]["tau"]
    click.echo(f"held-out mean acceptance length (teacher forced, one pass, block {block_size}): {tau:.2f}")
    if eval_prompts:
        ev = evaluate_engine(cfg)
        click.echo(f"held-out mean acceptance length (engine, greedy, block {block_size}): {ev['mean_acceptance_length']:.2f} "
                   f"over {ev['rounds']} rounds; output identical to plain: {ev['identical']}")
    click.echo(f"drafter saved to {out}")


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{option} takes integers separated by commas, e.g. 1,4,16; got {text!r}") from None


@cli.command()
@click.option("--verifier", default=DEFAULT_VERIFIER, show_default=True, help="Hugging Face id, local folder, .gguf file or demo:NAME.")
@click.option("--drafter", default=None, metavar="PATH", help="Our drafter (block-diffusion or parallel) for the `hybrid` method (default: the one shipped for the verifier, if any).")
@click.option("--parallel-drafter", default=None, metavar="PATH",
              help="A parallel drafter (train-drafter --init-from) run as the `parallel` method beside the others.")
@click.option("--assistant", default="demo:0.5b", show_default=True, help="Assistant model of the hf-assisted method.")
@click.option("--backend", type=click.Choice(["transformers", "vllm", "llama.cpp"]), default="transformers",
              show_default=True,
              help="Run the verifier under transformers (our engine and transformers' peers), vLLM (needs vLLM installed) "
                   "or llama.cpp (its GGUF; needs bash setup.sh --llama-cpp).")
@click.option("--llama-cpp", "llama_cpp", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="With the transformers backend, also run llama.cpp's plain, hybrid, draft-model and ngram in the same "
                   "run (rows llama.cpp/...): auto, when llama.cpp is installed.")
@click.option("--methods", default=None,
              help="Comma list [default: all of the backend's]. transformers: plain, hybrid, ngram, hf-assisted, "
                   "hf-prompt-lookup, and parallel with --parallel-drafter. vllm and llama.cpp: plain, hybrid, ngram, draft-model.")
@click.option("--prompts", default=None, metavar="FILE", help="JSONL file, one {\"prompt\": ..., \"category\": ..., \"chat\": bool} a line (default: bench/prompts.jsonl).")
@click.option("--max-new-tokens", type=int, default=None, help="New tokens per prompt [default: 32, sized for a default run under 15 minutes on 2 CPU cores].")
@click.option("--block-size", type=AUTO_INT, default="auto", show_default=True,
              help="Draft tokens per round, or auto (the coordinator); also hf-prompt-lookup's prompt_lookup_num_tokens.")
@click.option("--block-sizes", default=None, metavar="LIST",
              help="Run our drafters once per block size, e.g. 2,4,8,16,auto (shown as hybrid@8 ...); auto-notrim: auto verifying "
                   "each chosen block whole; a -nolookup suffix (auto-nolookup, 4-nolookup): without prompt lookup.")
@click.option("--lookup", type=click.IntRange(min=0), default=2, show_default=True,
              help="Our engine's prompt lookup before the drafter: the last N+ tokens recurring -> copy what followed (0: off).")
@click.option("--steps", type=AUTO_INT, default="auto", show_default=True, help="Denoising steps per draft, or auto.")
@_tree_option
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy (outputs are then checked against plain).")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed of the first prompt (prompt i uses seed + i).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--limit", type=int, default=None, metavar="N", help="Only the first N prompts of each category.")
@click.option("--order", type=click.Choice(["interleaved", "method"]), default="interleaved", show_default=True,
              help="interleaved: each prompt through every method in turn (a drift in the machine's speed falls on all "
                   "alike); method: one method at a time. The vLLM backend runs one engine (method) at a time.")
@click.option("--concurrency", default=None, metavar="LIST",
              help="Many clients at once instead, e.g. 1,4,16: our batched engine against plain decoding batched the "
                   "same way, and vLLM serving the model (vllm-plain, vllm-hybrid) where vLLM is installed; total and "
                   "per-client tokens/s, TTFT and TPOT percentiles per level (methods: plain, hybrid, vllm-plain, "
                   "vllm-hybrid).")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=None,
              help="With --concurrency: prompt tokens prefilled per engine step in all [default: 256].")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of results.")
@click.option("--plot", "plot_file", default=None, metavar="FILE", help="Draw speedup and acceptance per position to FILE.png (needs matplotlib).")
@_dtype_option
def bench(verifier, drafter, parallel_drafter, assistant, backend, methods, prompts, max_new_tokens, block_size, block_sizes, lookup, steps, tree, temperature, top_p, seed,
          device, limit, order, concurrency, prefill_chunk, as_json, plot_file, dtype, llama_cpp):
    """Time plain decoding, our drafters and transformers' assisted decoding on the same prompts."""
    from hybrid import bench as b

    if concurrency is not None:
        from hybrid import bench_load as bl

        levels = _int_list(concurrency, "--concurrency")
        known = bl.LOAD_METHODS + bl.VLLM_LOAD_METHODS
        picked = tuple(m.strip() for m in methods.split(",")) if methods else known
        bad = [m for m in picked if m not in known]
        if bad:
            raise UserError(f"unknown method {bad[0]!r} for --concurrency: pick from {', '.join(known)}")
        cfg = b.BenchConfig(verifier=verifier, drafter=drafter, methods=picked, prompts=prompts,
                            max_new_tokens=b.DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
                            block_size=block_size, lookup=lookup, steps=steps, tree=tree, temperature=temperature,
                            top_p=top_p, seed=seed, dtype=_torch_dtype(dtype), device=device)
        _quiet_transformers()
        result = bl.run_load_bench(cfg, levels, echo=lambda s: click.echo(s, err=True), prefill_chunk=prefill_chunk)
        click.echo(bl.format_load_report(result))
        if as_json:
            click.echo(json.dumps(result.to_json(), ensure_ascii=False))
        return

    if parallel_drafter and methods is None and backend == "transformers":
        methods = ",".join(b.METHODS + b.ASKED_METHODS)  # the default run, and the parallel drafter asked for
    picked = b.parse_methods(methods, backend)
    cfg = b.BenchConfig(
        verifier=verifier, drafter=drafter, parallel_drafter=parallel_drafter, assistant=assistant, methods=picked,
        prompts=prompts,
        max_new_tokens=b.DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens, block_size=block_size,
        block_sizes=b.parse_block_sizes(block_sizes), lookup=lookup, steps=steps, tree=tree, temperature=temperature, top_p=top_p, seed=seed, dtype=_torch_dtype(dtype), device=device, limit=limit,
        order=order, llama_cpp=llama_cpp if backend == "transformers" else "off",
    )
    if plot_file:
        b.check_plot_available()
    _quiet_transformers()
    if backend == "vllm":
        from hybrid.bench_vllm import run_vllm_bench

        result = run_vllm_bench(cfg, echo=lambda s: click.echo(s, err=True))
    elif backend == "llama.cpp":
        from hybrid.bench_llamacpp import run_llamacpp_bench

        result = run_llamacpp_bench(cfg, echo=lambda s: click.echo(s, err=True))
    else:
        result = b.run_bench(cfg, echo=lambda s: click.echo(s, err=True))
    click.echo(b.format_report(result))
    if plot_file:
        b.plot(result, plot_file)
        click.echo(f"plot saved to {plot_file}")
    if as_json:
        click.echo(json.dumps(result.to_json(), ensure_ascii=False))


@cli.command()
@click.option("--verifier", default=DEFAULT_VERIFIER, show_default=True)
@click.option("--drafter", default="auto", show_default=True,
              help="auto (the drafter shipped for this verifier, else ngram), none, ngram, a block-diffusion or parallel drafter folder, or a causal LM.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--model-name", default="hybrid", show_default=True, help="The model id clients ask for.")
@click.option("--block-size", type=AUTO_INT, default="auto", show_default=True)
@_tree_option
@click.option("--max-concurrent", type=int, default=8, show_default=True,
              help="Requests decoding at once (each engine step: one verifier pass over all of them).")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=256, show_default=True,  # engine.DEFAULT_PREFILL_CHUNK
              help="Prompt tokens prefilled per engine step in all, beside the running requests' rounds.")
@click.option("--max-queue", type=int, default=64, show_default=True, help="Waiting requests before 503.")
@click.option("--max-prompt-tokens", type=int, default=4096, show_default=True)
@click.option("--max-tokens", type=int, default=1024, show_default=True, help="Largest max_tokens a request may ask.")
@click.option("--max-body-bytes", type=int, default=4 << 20, show_default=True, help="Larger request bodies get 413.")
@click.option("--num-pages", type=int, default=None, help="KV page budget shared by all requests.")
@click.option("--page-size", type=int, default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@_dtype_option
def serve(verifier, drafter, host, port, model_name, block_size, tree, max_concurrent, prefill_chunk, max_queue,
          max_prompt_tokens, max_tokens, max_body_bytes, num_pages, page_size, device, dtype):
    """Serve the OpenAI API (chat and completions, streaming) on the embedded engine."""
    from hybrid.engine import Engine, GenerationConfig
    from hybrid.server import ServerConfig, serve as run_server

    GenerationConfig(block_size=block_size, tree=tree)  # checked before any model loads
    _quiet_transformers()
    engine = Engine.load(verifier, drafter, _torch_dtype(dtype), device, num_pages=num_pages, page_size=page_size)
    run_server(engine, host, port, ServerConfig(
        model_name=model_name, max_concurrent=max_concurrent, prefill_chunk=prefill_chunk, max_queue=max_queue,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens=max_tokens, block_size=block_size, tree=tree, max_body_bytes=max_body_bytes))


@cli.command("export-vllm")
@click.argument("drafter_dir")
@click.argument("out_dir")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto", show_default=True,
              help="Weights dtype (auto: as trained; vLLM casts to the target's dtype anyway).")
@click.option("--steps", type=int, default=1, show_default=True,
              help="Denoising steps per draft. 1: stock vLLM (DFlashDraftModel). >1: needs hybrid installed beside vLLM "
                   "(its vllm.general_plugins entry point registers DFlashHybridDraftModel).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line.")
def export_vllm_cmd(drafter_dir, out_dir, dtype, steps, overwrite, as_json):
    """Write a drafter as a checkpoint vLLM runs: a block-diffusion drafter with --speculative-config method dflash,
    a parallel drafter with method draft_model and parallel_drafting."""
    from hybrid.vllm_export import export_vllm

    info = export_vllm(drafter_dir, out_dir, dtype=dtype, steps=steps, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(info))
        return
    spec = json.dumps(info["speculative_config"])
    click.echo(f"wrote {info['out']} ({info['architecture']}, {info['dtype']}, {info['parameters']:,} parameters, "
               f"{info['denoising_steps']} denoising step(s), trained block size {info['block_size']})")
    if info["draft_vocabulary_dropped"]:
        click.echo("note: vLLM drafts from the target's whole vocabulary; the drafter's draft vocabulary "
                   "(draft_vocab.safetensors) is not used there")
    verifier = info["verifier"] if info["verifier"] and not info["verifier"].startswith("demo:") else "TARGET_MODEL_FOLDER"
    click.echo(f"serve it: vllm serve {verifier} --speculative-config '{spec}'")


@cli.command("export-gguf")
@click.argument("drafter_dir")
@click.argument("out_file")
@click.option("--verifier", default=None, metavar="FOLDER",
              help="The model folder whose tokenizer goes in [default: the verifier the drafter was trained for].")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="Weight matrices' type (norms and biases stay float32).")
@click.option("--quantize", default=None, metavar="TYPE",
              help="Then quantize with llama.cpp's llama-quantize (e.g. Q4_K_M; needs bash setup.sh --llama-cpp).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_FILE if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line.")
def export_gguf_cmd(drafter_dir, out_file, verifier, outtype, quantize, overwrite, as_json):
    """Write a drafter as a GGUF file llama.cpp's speculative decoding loads: a parallel drafter as an ordinary
    draft model (--spec-type draft-simple), a block-diffusion drafter as a DFlash drafter (draft-dflash)."""
    from pathlib import Path

    from hybrid.gguf_export import GgufExport, export_gguf

    _quiet_transformers()
    info = export_gguf(GgufExport(drafter=Path(drafter_dir).expanduser(), out=Path(out_file).expanduser(),
                                  verifier=verifier, outtype=outtype, quantize=quantize, overwrite=overwrite))
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"wrote {info['out']} ({info['architecture']}, {info['outtype']}, {info['tensors']} tensors, "
               f"tokenizer of {info['verifier']}: {info['tokens']} tokens)")
    click.echo(f"note: {info['note']}")
    click.echo(f"serve it: llama-server -m VERIFIER.gguf --spec-type {info['spec_type']} --spec-draft-model {info['out']}")


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv=None) -> None:
    try:
        cli.main(args=argv, prog_name="hybrid", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
