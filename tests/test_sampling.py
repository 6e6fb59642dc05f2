"""Sampling end to end: every draft source commits what sampling from the verifier alone would.

On a 6-token verifier, with blocks of 4-8 draft tokens over several rounds:
- Deterministic drafts (argmax chains, trees, trimmed chains, prompt-lookup copies; top-p and top-k): the
  verifier's token at each position is sampled first with the request's counter-based noise and matched
  against the draft, so with the same seed the output is plain sampling's, token for token, whatever was
  drafted. Plain sampling's own law is checked once per warp (chi-square of the first three tokens against
  their exact joint, computed from the verifier alone).
- Sampled drafts (q the drafter's distribution: a causal drafter, the diffusion drafter with several
  denoising steps, a draft trimmed by confidence): the joint of the first three tokens against the exact one.
Each check has a deliberately biased variant that it must catch.
"""
import itertools
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import hybrid.loop as loop_mod
import hybrid.tree as tree_mod
from conftest import make_verifier
from hybrid.acceptance import DRAFT, RESIDUAL, Acceptance, SamplingParams, accept_sampling, sample, warp
from hybrid.coordinator import CostModel
from hybrid.drafters.base import Draft
from hybrid.drafters.causal import CausalDrafter
from hybrid.drafters.diffusion import DiffusionDrafter, unmask_schedule
from hybrid.drafters.parallel import ParallelConfig, ParallelDrafter
from hybrid.engine import Engine, GenerationConfig
from hybrid.loop import FixedSchedule
from hybrid.tree import TreeAcceptance, build_tree

V = 6
K = 3  # the first K tokens are tested jointly (V ** K cells)
PROMPT = [1, 3, 4]
REPEATING = [1, 3, 4, 5, 1, 3, 4, 5, 1, 3]  # prompt lookup finds copies to draft
T1 = dict(temperature=1.0)
TOP_P = dict(temperature=0.9, top_p=0.8)
TOP_K = dict(temperature=1.0, top_k=3)


def tiny(seed=0, perturb=0.0):
    v = make_verifier("qwen3", seed=seed, vocab=V, hidden=32, layers=2)
    if perturb:  # a drafter close to the verifier: long acceptances with rejections among them
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for p in v.model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * perturb)
    v.eos_token_ids = set()
    return v


@pytest.fixture(scope="module")
def verifier():
    return tiny(0)


def exact_joint(v, prompt, params: SamplingParams) -> np.ndarray:
    """p(t_1 .. t_K | prompt) from the verifier alone, warped -> [V] * K."""
    cond = {}
    for depth in range(K):
        rows = list(itertools.product(range(V), repeat=depth))
        with torch.no_grad():
            p = warp(v.model(torch.tensor([list(prompt) + list(r) for r in rows])).logits[:, -1], params)
        cond.update({r: q.double().numpy() for r, q in zip(rows, p)})
    joint = np.zeros((V,) * K)
    for cell in itertools.product(range(V), repeat=K):
        joint[cell] = np.prod([cond[cell[:d]][cell[d]] for d in range(K)])
    return joint


def pvalue(outputs, joint, groups=None) -> float:
    """Chi-square p-value of the first K tokens of `outputs` against `joint`; groups [V]: count tokens by group
    instead (a coarser table with more counts per cell, for biases among a few tokens)."""
    if groups is not None:
        g = np.asarray(groups)
        coarse = np.zeros((g.max() + 1,) * K)
        for cell in itertools.product(range(V), repeat=K):
            coarse[tuple(g[list(cell)])] += joint[cell]
        outputs, joint = [[int(g[t]) for t in ids[:K]] for ids in outputs], coarse
    counts = np.zeros(joint.shape)
    for ids in outputs:
        counts[tuple(ids[:K])] += 1
    exp = joint.ravel() / joint.sum() * counts.sum()
    obs = counts.ravel()
    big = exp >= 5  # pool the rare cells (a token with no mass at all lands there if a bias lets it through)
    rare_obs, rare_exp = obs[~big].sum(), exp[~big].sum()
    if rare_exp < 1e-9:  # only cells without mass are rare: any count there is impossible
        return 0.0 if rare_obs else chisquare(obs[big], exp[big]).pvalue
    return chisquare(np.append(obs[big], rare_obs), np.append(exp[big], rare_exp)).pvalue


def generate(engine, seeds, cfg: GenerationConfig, prompt=PROMPT, schedule=None, batch=1):
    """Token ids of one run per seed (and the runs' results); `batch` > 1: that many seeds' requests decoded
    together (one verifier pass per step for all, with the engine's own schedules)."""
    if batch > 1:
        seeds = list(seeds)
        runs = [r for i in range(0, len(seeds), batch)
                for r in engine.generate_many([list(prompt)] * len(seeds[i : i + batch]),
                                              [replace(cfg, seed=s) for s in seeds[i : i + batch]])]
        return [r.token_ids for r in runs], runs
    runs = [engine.generate(list(prompt), replace(cfg, seed=s), schedule=schedule() if schedule else None)
            for s in seeds]
    return [r.token_ids for r in runs], runs


# -- drafters -------------------------------------------------------------------------------------
class VerifierTreeDrafter:
    """Drafts trees from a copy of the verifier: along its greedy path, each position's top 3 tokens (the best
    paths of them, best first, as the diffusion drafter builds its trees). Deterministic, and deep at T = 1."""

    name, max_block_size, max_steps, capture_layers = "verifier-tree", 8, 1, []

    def __init__(self, v):
        self.model = v.model

    def attach(self, pool, verifier):
        pass

    def observe(self, ctx, hidden, start):
        pass

    @torch.no_grad()
    def _candidates(self, ctx, block_size):
        """Each position's top 3 along the greedy path -> probabilities, ids [B, 3]."""
        text, top_p, top_i = list(ctx.tokens), [], []
        for _ in range(block_size):
            values, ids = torch.softmax(self.model(torch.tensor([text])).logits[0, -1], -1).topk(3)
            top_p.append(values)
            top_i.append(ids)
            text.append(int(ids[0]))
        return torch.stack(top_p), torch.stack(top_i)

    def propose(self, ctx, block_size, steps, sampler):
        p, ids = self._candidates(ctx, block_size)
        return Draft(ids[:, 0], None, p[:, 0])

    def propose_tree(self, ctx, block_size, budget, sampler):
        tree = build_tree(*self._candidates(ctx, block_size), budget)
        return Draft(tree.tokens, None, tree.prob, tree.parents)


def small_diffusion(v, draft_sampling="argmax"):
    torch.manual_seed(2)
    return DiffusionDrafter.for_verifier(v, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8, intermediate_size=32, draft_sampling=draft_sampling)


@dataclass
class ThresholdTrim(FixedSchedule):
    """Verifies a draft up to its first token whose confidence is below `level` (at least one token): how much
    is verified depends strongly on the confidence, as the coordinator's trimming does."""

    level: float = 0.5

    def trim(self, conf, parents=None):
        return max(1, next((i for i, c in enumerate(conf) if c < self.level), len(conf)))


# -- plain sampling: the reference --------------------------------------------------------------
PLAIN_SEEDS = range(800)
SEEDS = range(120)  # identity with plain sampling: every seed must agree
NEW = 10  # new tokens per identity run: several rounds of blocks of 4-8


@pytest.fixture(scope="module")
def plain(verifier):
    """Plain sampling's token ids per (warp, prompt): what every deterministic draft must reproduce."""
    engine, cache = Engine(verifier, None, num_pages=8, page_size=4), {}

    def get(params: dict, prompt=PROMPT):
        key = (tuple(sorted(params.items())), tuple(prompt))
        if key not in cache:
            cache[key] = generate(engine, SEEDS, GenerationConfig(max_new_tokens=NEW, **params), prompt)[0]
        return cache[key]

    return get


@pytest.mark.parametrize("params", [T1, TOP_P, TOP_K], ids=["t1", "top-p", "top-k"])
def test_plain_sampling_matches_the_verifier_distribution(verifier, params):
    engine = Engine(verifier, None, num_pages=8, page_size=4)
    ids, _ = generate(engine, PLAIN_SEEDS, GenerationConfig(max_new_tokens=K, **params))
    assert pvalue(ids, exact_joint(verifier, PROMPT, SamplingParams(**params))) > 1e-3


def test_plain_sampling_check_catches_a_warp_that_ignores_top_k(verifier, monkeypatch):
    monkeypatch.setattr(tree_mod, "warp", lambda logits, params: warp(logits, replace(params, top_k=0)))
    engine = Engine(verifier, None, num_pages=8, page_size=4)
    ids, _ = generate(engine, range(1000), GenerationConfig(max_new_tokens=K, **TOP_K))
    assert pvalue(ids, exact_joint(verifier, PROMPT, SamplingParams(**TOP_K))) < 1e-6


# -- deterministic drafts: plain sampling's tokens, seed for seed --------------------------------
def chain_engine(v):
    return Engine(v, CausalDrafter(tiny(0), draft_sampling="argmax"), num_pages=16, page_size=4)


def tree_engine(v):
    return Engine(v, VerifierTreeDrafter(tiny(0)), num_pages=16, page_size=4)


DETERMINISTIC = {  # name: (engine, config, prompt, schedule)
    "chain": (chain_engine, dict(block_size=6, lookup=0, **T1), PROMPT, None),
    "tree": (tree_engine, dict(block_size=4, tree=8, lookup=0, **T1), PROMPT, None),
    "trim": (chain_engine, dict(block_size=8, lookup=0, **T1), PROMPT, lambda: ThresholdTrim(8, 1, level=0.6)),
    "lookup": (lambda v: Engine(v, small_diffusion(v), num_pages=16, page_size=4),
               dict(block_size=6, lookup=2, **T1), REPEATING, None),
    "top-p": (chain_engine, dict(block_size=6, lookup=0, **TOP_P), PROMPT, None),
    "top-k": (tree_engine, dict(block_size=4, tree=8, lookup=0, **TOP_K), PROMPT, None),
}


def run_deterministic(verifier, name):
    make, kw, prompt, schedule = DETERMINISTIC[name]
    params = {k: kw[k] for k in ("temperature", "top_p", "top_k") if k in kw}
    return (*generate(make(verifier), SEEDS, GenerationConfig(max_new_tokens=NEW, stop_on_eos=False, **kw), prompt,
                      schedule), params, prompt)


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_deterministic_drafts_commit_exactly_what_plain_sampling_does(verifier, plain, name):
    ids, runs, params, prompt = run_deterministic(verifier, name)
    assert ids == plain(params, prompt)
    accepted = [a - 1 for r in runs for a in r.acceptance_lengths]
    assert max(accepted) >= 3 and sum(a == 0 for a in accepted) > 20  # deep acceptances and rejections
    if name == "tree":
        assert sum(r.tree_sizes.get(8, 0) for r in runs) > 100
    if name == "trim":
        assert len({r.block_sizes and max(r.block_sizes) for r in runs}) > 1  # verified lengths vary
    if name == "lookup":
        assert sum(r.lookup_rounds for r in runs) > len(runs)


def biased_walk(tokens, parents, logits, params, noise, start=0):
    """A plausible bug: a walk that trusts the first draft token (or child of the root) whatever the verifier
    samples there."""
    walk = accept_tree_real(tokens, parents, logits, params, noise, start)
    if tokens.numel() and (not walk.path or walk.path[0] != 1):
        return TreeAcceptance([1], walk.bonus)
    return walk


accept_tree_real = loop_mod.accept_tree


@pytest.mark.parametrize("name", ["chain", "tree", "lookup", "top-k"])
def test_deterministic_check_catches_a_walk_that_trusts_the_draft(verifier, plain, name, monkeypatch):
    monkeypatch.setattr(loop_mod, "accept_tree", biased_walk)
    ids, _, params, prompt = run_deterministic(verifier, name)
    assert sum(a != b for a, b in zip(ids, plain(params, prompt))) > len(ids) / 4


@pytest.mark.parametrize("name", ["chain", "tree", "lookup"])
def test_deterministic_drafts_in_a_batch_commit_exactly_what_plain_sampling_does(verifier, plain, name):
    """Several sequences in each verifier pass (six seeds' requests decoded together): each one's tokens are
    still plain sampling's for its seed."""
    make, kw, prompt, _ = DETERMINISTIC[name]
    params = {k: kw[k] for k in ("temperature", "top_p", "top_k") if k in kw}
    ids, runs = generate(make(verifier), SEEDS, GenerationConfig(max_new_tokens=NEW, stop_on_eos=False, **kw), prompt,
                         batch=6)
    assert ids == plain(params, prompt)
    assert sum(a > 1 for r in runs for a in r.acceptance_lengths) > 20  # draft tokens were accepted


# -- sampled drafts: the joint law of the first tokens ------------------------------------------
def old_confidence_order_propose(self, ctx, block_size, steps, sampler):
    """The diffusion drafter's sampled drafts as they were: positions committed by the probability of their
    sampled token, so a token may depend on tokens to its right while q holds each position's law before that."""
    params, noise = sampler
    ids, positions, ctx_kv = self._block(ctx, block_size)
    n, masked = len(ctx.tokens), torch.ones(block_size, dtype=torch.bool)
    q = torch.zeros(block_size, self.head.weight.shape[0])
    for k in unmask_schedule(block_size, steps):
        probs = warp(self.draft_logits(self.model(self.embed(ids), positions, ctx_kv)[1:]), params)
        tok = sample(probs, noise.uniforms(range(n, n + block_size), DRAFT))
        conf = probs.gather(-1, tok[:, None])[:, 0].masked_fill(~masked, -1.0)
        pick = conf.topk(k).indices
        ids[1 + pick], q[pick], masked[pick] = tok[pick], probs[pick], False
    return Draft(ids[1:].clone(), q, None)


real_propose = DiffusionDrafter.propose


def sampled_token_confidence_propose(self, ctx, block_size, steps, sampler):
    """Trimming by the sampled tokens' own probability: whether x_i is verified then depends on x_i."""
    d = real_propose(self, ctx, block_size, steps, sampler)
    return Draft(d.tokens, d.q, d.q[torch.arange(d.size), d.tokens])


def biased_residual(draft, q, p, noise, start):
    """On rejection, resample from p instead of norm(max(0, p - q))."""
    a = accept_sampling(draft, q, p, noise, start)
    if a.accepted < draft.numel():
        return Acceptance(a.accepted, int(sample(p[a.accepted : a.accepted + 1], [noise.uniform(start + a.accepted, RESIDUAL)])[0]))
    return a


class CraftedLaws(torch.nn.Module):
    """The diffusion drafter's layers replaced by a table of laws over the verifier's four likeliest tokens: a
    block row whose rows to the right are all masked has law base[j] (weights of those four tokens); otherwise
    it copies the nearest token to its right with probability `copy`. Row 1 is flat, so an order by confidence
    commits it last, after and copying the tokens to its right: a dependence a sampled draft's q must not miss.
    Context features stay the real ones."""

    def __init__(self, drafter, base, tokens, copy=0.95):
        super().__init__()
        self.real, self.fc, self.base, self.tokens, self.copy = drafter.model, drafter.model.fc, base, tokens, copy
        self.mask = drafter.config.mask_token_id
        drafter.embed = lambda ids: ids[:, None].float()  # the block's ids go through as they are
        drafter.draft_logits = self.laws
        drafter.model = self

    def context(self, hidden):
        return self.real.context(hidden)

    def context_kv(self, feats, positions):
        return self.real.context_kv(feats, positions)

    def forward(self, x, positions, ctx_kv, attn_mask=None):
        return x

    def laws(self, h):  # h [B, 1]: the block rows' ids -> logits [B, V]
        ids = h[:, 0].long().tolist()
        probs = torch.zeros(len(ids), V)
        for j in range(len(ids)):
            right = [t for t in ids[j + 1 :] if t != self.mask and t in self.tokens]
            if right:
                weights = [self.copy if t == right[0] else (1 - self.copy) / 3 for t in self.tokens]
            else:
                weights = self.base[j]
            probs[j, list(self.tokens)] = torch.tensor(weights, dtype=torch.float32)
        return (probs / probs.sum(-1, keepdim=True)).log()


def top_tokens(v, k=4, prompt=PROMPT) -> list[int]:
    """The verifier's k most probable tokens after the prompt: drafts of them are often accepted."""
    with torch.no_grad():
        return v.model(torch.tensor([prompt])).logits[0, -1].topk(k).indices.tolist()


def crafted_engine(v, base):
    d = small_diffusion(v, "sample")
    CraftedLaws(d, base, top_tokens(v))
    return Engine(v, d, num_pages=16, page_size=4)


FLAT, LEANING, EVEN = [0.25] * 4, [0.7, 0.3, 0, 0], [0.6, 0.4, 0, 0]

SAMPLED = {  # name: (engine, config, schedule, biased variant (object, attribute, replacement), samples)
    "causal": (lambda v: Engine(v, CausalDrafter(tiny(0, perturb=0.2)), num_pages=16, page_size=4),
               dict(block_size=4), None, (loop_mod, "accept_sampling", biased_residual), 600),
    "diffusion-steps": (lambda v: crafted_engine(v, [FLAT] + [LEANING] * 3), dict(block_size=4, steps=4), None,
                        (DiffusionDrafter, "propose", old_confidence_order_propose), 1200),
    "diffusion-trim": (lambda v: crafted_engine(v, [EVEN] * 6), dict(block_size=6), lambda: ThresholdTrim(6, 1, level=0.5),
                       (DiffusionDrafter, "propose", sampled_token_confidence_propose), 1200),
    "diffusion-model": (lambda v: Engine(v, small_diffusion(v, "sample"), num_pages=16, page_size=4),
                        dict(block_size=4, steps=3), None, None, 600),  # the real layers: no crafted bias to catch
    "parallel": (lambda v: Engine(v, ParallelDrafter(tiny(0, perturb=0.2), ParallelConfig(
                     base="", mask_token_id=v.tokenizer.mask_token_id, block_size=4, draft_sampling="sample")),
                     num_pages=16, page_size=4), dict(block_size=4), None, None, 600),
}


def sampled_pvalue(verifier, name, samples, batch=1) -> float:
    make, kw, schedule, _, _ = SAMPLED[name]
    cfg = GenerationConfig(max_new_tokens=kw["block_size"] + 1, lookup=0, tree=0, **T1, **kw)
    ids, runs = generate(make(verifier), range(samples), cfg, PROMPT, schedule, batch)
    assert sum(a >= 3 for r in runs for a in r.acceptance_lengths) > samples / 10  # later block positions reached
    a, b = top_tokens(verifier, 2)
    groups = [2] * V
    groups[a], groups[b] = 0, 1  # the verifier's two likeliest tokens, and the rest
    return pvalue(ids, exact_joint(verifier, PROMPT, SamplingParams(**T1)), groups if name.startswith("diffusion") else None)


@pytest.mark.parametrize("name", list(SAMPLED))
def test_sampled_drafts_match_the_verifier_distribution(verifier, name):
    assert sampled_pvalue(verifier, name, SAMPLED[name][4]) > 1e-3


@pytest.mark.parametrize("name", ["causal", "parallel"])
def test_sampled_drafts_in_a_batch_match_the_verifier_distribution(verifier, name):
    """Eight requests decoded together per batch (the parallel drafter drafts them in one pass)."""
    assert sampled_pvalue(verifier, name, SAMPLED[name][4], batch=8) > 1e-3


def test_sampled_check_in_a_batch_catches_a_biased_residual(verifier, monkeypatch):
    monkeypatch.setattr(loop_mod, "accept_sampling", biased_residual)
    assert sampled_pvalue(verifier, "causal", SAMPLED["causal"][4], batch=8) < 1e-6


@pytest.mark.parametrize("name", [name for name, case in SAMPLED.items() if case[3]])
def test_sampled_check_catches_its_biased_variant(verifier, name, monkeypatch):
    obj, attr, biased = SAMPLED[name][3]
    monkeypatch.setattr(obj, attr, biased)
    assert sampled_pvalue(verifier, name, SAMPLED[name][4]) < 1e-6


# -- seeds and devices ---------------------------------------------------------------------------
def test_a_seed_gives_plain_sampling_output_whatever_block_sizes_auto_picks():
    """Block size auto (trees, lookup, trimming: the defaults) chooses from measured time; timings scaled into three
    regimes (drafting nearly free, as measured, very dear) and jittered make the runs choose differently, and each
    run of a seed still commits plain sampling's tokens."""
    import random

    v = make_verifier("qwen3")
    v.eos_token_ids = set()
    from test_speculative import PROMPT as TEXT, small_diffusion as drafter

    plain = Engine(v, None, num_pages=32, page_size=8)
    engine = Engine(v, drafter(v), num_pages=32, page_size=8)
    jitter = random.Random()  # unseeded: other timings on every run

    def regime(scale: float) -> CostModel:
        """Fresh costs whose drafted rounds measure `scale` times what they took (nearly free, as measured, very
        dear), each timing jittered: regimes far enough apart that a seed's runs cannot all choose the same."""
        costs = CostModel()
        observe = costs.observe
        costs.observe = lambda b, t, d, vs, drafted=None: observe(
            b, t, d * scale * jitter.uniform(0.5, 2), vs * (scale if b else 1) * jitter.uniform(0.5, 2), drafted)
        return costs

    chosen = set()
    for seed in range(4):
        cfg = GenerationConfig(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=seed)
        want = plain.generate(TEXT, cfg).token_ids
        runs = []
        for scale in (0.01, 1.0, 100.0):
            engine.costs = regime(scale)
            runs.append(engine.generate(TEXT, cfg))
        assert [r.token_ids for r in runs] == [want] * 3
        chosen |= {tuple(sorted(r.block_sizes.items())) for r in runs}
    assert len(chosen) > 1  # the runs chose different blocks


RANDOM_OPS = {torch.multinomial, torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint,
              torch.bernoulli, torch.normal, torch.randperm, torch.Tensor.uniform_, torch.Tensor.random_,
              torch.Tensor.exponential_, torch.Tensor.bernoulli_, torch.Tensor.normal_, torch.Tensor.geometric_}


class RandomOps(torch.overrides.TorchFunctionMode):
    """Records torch's random number calls (any op given a generator, and the sampling ops)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RANDOM_OPS or kwargs.get("generator") is not None:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def test_sampling_draws_no_torch_random_numbers_so_no_generator_meets_a_device(verifier):
    """All randomness is the request's counter-based noise (Python floats): no torch generator is created or
    passed, so a CUDA verifier samples with the same code as a CPU one (a CPU generator there fails)."""
    engines = [Engine(verifier, None, num_pages=16, page_size=4), chain_engine(verifier), tree_engine(verifier),
               Engine(verifier, CausalDrafter(tiny(0, perturb=0.2)), num_pages=16, page_size=4),
               Engine(verifier, small_diffusion(verifier, "sample"), num_pages=16, page_size=4)]
    with RandomOps() as ops:
        for engine in engines:
            for block, tree in ((4, 0), ("auto", "auto")):
                engine.generate(REPEATING, GenerationConfig(max_new_tokens=12, block_size=block, tree=tree, steps=1,
                                                            temperature=1.0, top_k=4, seed=1))
    assert ops.calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_on_cuda_commits_plain_sampling_tokens():
    v = make_verifier("qwen3")
    v.model.to("cuda")
    v.device = v.model.device
    from test_speculative import PROMPT as TEXT, small_diffusion as drafter

    plain, engine = Engine(v, None, num_pages=32, page_size=8), Engine(v, drafter(v), num_pages=32, page_size=8)
    for seed in range(3):
        cfg = GenerationConfig(max_new_tokens=24, block_size=4, temperature=1.0, seed=seed, stop_on_eos=False)
        assert engine.generate(TEXT, cfg).token_ids == plain.generate(TEXT, cfg).token_ids
