"""hybrid's `vllm.general_plugins` entry point: what stock vLLM's DFlash path cannot express, added without a fork.

vLLM loads every `vllm.general_plugins` entry point in each of its processes before it builds a model
(pyproject.toml: ``hybrid = "hybrid.vllm_plugin:register"``). `register` adds one architecture:

- ``DFlashHybridDraftModel`` -> `hybrid.vllm_drafter.HybridDFlashForCausalLM`: vLLM's own DFlash drafter
  (`DFlashQwen3ForCausalLM`, subclassed) doing ``dflash_config.denoising_steps`` denoising steps per draft,
  as our engine does with ``steps=T``. `hybrid export-vllm --steps T` (T > 1) writes that architecture.
  The name starts with "DFlash", so vLLM's speculative config keeps it as is, and the proposer runs it
  as a DFlash drafter (same context K/V caching, same query block).

What stays out of reach (see README, "vLLM"): a block size chosen per request. vLLM fixes the number of
draft tokens K for the engine (`num_speculative_tokens`; at most per batch size), and a `custom_class`
proposer, the only per-request hook, is handed token ids but no hidden states, so it cannot run this
drafter at all.

Importing this module imports nothing from vLLM; `register` imports vLLM's registry only.
"""
from __future__ import annotations

PLUGIN_ARCH = "DFlashHybridDraftModel"
MODEL_CLASS = "hybrid.vllm_drafter:HybridDFlashForCausalLM"


def register() -> None:
    """Add hybrid's drafter architecture to vLLM's model registry (safe to call more than once)."""
    from vllm import ModelRegistry

    if PLUGIN_ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(PLUGIN_ARCH, MODEL_CLASS)
