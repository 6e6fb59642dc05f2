"""Acceptance: exact outcomes on crafted logits; the sampling rule reproduces p, a biased one does not."""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare, kstest

from hybrid.acceptance import DRAFT, RESIDUAL, TOKEN, Acceptance, Noise, SamplingParams, accept_sampling, sample, warp
from hybrid.errors import UserError
from hybrid.tree import accept_tree, chain_parents


def one_hot_logits(targets, V=6):
    logits = torch.full((len(targets), V), -5.0)
    logits[torch.arange(len(targets)), torch.tensor(targets)] = 5.0
    return logits


def greedy_walk(draft, logits) -> Acceptance:
    """Temperature 0: a chain walked along the verifier's argmax (hybrid.tree, as the loop does)."""
    walk = accept_tree(draft, chain_parents(draft.numel()), logits, SamplingParams(0.0), None)
    return Acceptance(len(walk.path), walk.bonus)


@pytest.mark.parametrize(
    "draft, targets, expected",
    [
        ([1, 2, 3], [1, 2, 3, 4], Acceptance(3, 4)),  # all accepted, bonus = next token
        ([1, 2, 3], [1, 0, 3, 4], Acceptance(1, 0)),  # first mismatch at 1: recovered token 0
        ([1, 2, 3], [5, 2, 3, 4], Acceptance(0, 5)),  # later matches after a mismatch do not count
        ([], [2], Acceptance(0, 2)),  # empty draft: plain decoding
    ],
)
def test_greedy_acceptance_on_crafted_logits(draft, targets, expected):
    assert greedy_walk(torch.tensor(draft, dtype=torch.long), one_hot_logits(targets)) == expected


def test_warp_top_k_and_top_p_exact():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    torch.testing.assert_close(warp(logits, SamplingParams(1.0, top_k=1)), torch.tensor([[1.0, 0, 0, 0]]))
    # top_p 0.6: 0.5 alone does not cover it, 0.5 + 0.2 does -> keep the first two (ties broken by sort)
    p = warp(logits, SamplingParams(1.0, top_p=0.6))
    assert (p > 0).sum() == 2 and p[0, 0] == pytest.approx(0.5 / 0.7)
    torch.testing.assert_close(warp(logits, SamplingParams(0.5)), torch.softmax(logits / 0.5, -1))


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_bad_sampling_params_are_user_errors(kw):
    with pytest.raises(UserError):
        SamplingParams(**kw)


P = torch.tensor([[0.05, 0.40, 0.30, 0.15, 0.10], [0.2, 0.2, 0.2, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1, 0.6]])
Q = torch.tensor([[0.60, 0.05, 0.05, 0.20, 0.10], [0.5, 0.1, 0.1, 0.1, 0.2]])  # a deliberately poor drafter
T1 = SamplingParams(temperature=1.0)


def sampled_rule(draft, noise):
    return accept_sampling(draft, Q, P, noise, 0)


def deterministic_rule(draft, noise):
    """A one-hot q: the verifier's token sampled first, then matched (the walk of hybrid.tree over a chain)."""
    walk = accept_tree(draft, chain_parents(draft.numel()), P.log(), T1, noise, 0)
    return Acceptance(len(walk.path), walk.bonus)


def first_token_counts(rule, n=20000, deterministic=False):
    """Draft from Q (or take its argmax), accept with `rule`; count the first committed token over n seeds."""
    counts = np.zeros(P.shape[1])
    for seed in range(n):
        noise = Noise(seed)
        draft = Q.argmax(-1) if deterministic else sample(Q, noise.uniforms([0, 1], DRAFT))
        a = rule(draft, noise)
        counts[int(draft[0]) if a.accepted > 0 else a.bonus] += 1
    return counts


def expected(counts):
    p0 = P[0].double().numpy()
    return p0 / p0.sum() * counts.sum()


@pytest.mark.parametrize("rule, deterministic", [(sampled_rule, False), (deterministic_rule, True)])
def test_acceptance_reproduces_the_verifier_distribution(rule, deterministic):
    counts = first_token_counts(rule, deterministic=deterministic)
    assert chisquare(counts, expected(counts)).pvalue > 1e-3


def biased_accept(draft, noise):
    """A plausible bug: on rejection resample from p instead of norm(max(0, p - q))."""
    a = accept_sampling(draft, Q, P, noise, 0)
    if a.accepted < draft.numel():
        return Acceptance(a.accepted, int(sample(P[a.accepted : a.accepted + 1], [noise.uniform(0, RESIDUAL)])[0]))
    return a


def test_a_biased_acceptance_rule_fails_the_same_test():
    counts = first_token_counts(biased_accept)
    assert chisquare(counts, expected(counts)).pvalue < 1e-6


def test_identical_draft_and_target_accepts_everything():
    for seed in range(200):
        noise = Noise(seed)
        draft = sample(P[:2], noise.uniforms([0, 1], DRAFT))
        assert accept_sampling(draft, P[:2], P, noise, 0).accepted == 2


def test_inverse_cdf_sampling_is_exact_and_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3], [0.0, 0.0, 1.0, 0.0]])
    for u, expect in [(0.0, [0, 2]), (0.1, [0, 2]), (0.25, [2, 2]), (0.65, [2, 2]), (0.75, [3, 2]),
                      (1 - 2**-53, [3, 2])]:
        assert sample(probs, [u, u]).tolist() == expect, u
    grid = [(i + 0.5) / 1000 for i in range(1000)]  # evenly spread uniforms give each token its share
    counts = torch.bincount(sample(probs[:1].expand(1000, 4), grid), minlength=4)
    assert counts.tolist() == [200, 0, 500, 300]


def test_noise_is_a_function_of_seed_position_and_purpose_and_looks_uniform():
    a, b = Noise(1), Noise(2)
    assert a.uniform(7, TOKEN) == Noise(1).uniform(7, TOKEN)
    u = np.array(a.uniforms(range(20000)))
    assert ((0 <= u) & (u < 1)).all() and kstest(u, "uniform").pvalue > 1e-3
    others = [np.array(a.uniforms(range(20000), DRAFT)), np.array(b.uniforms(range(20000))),
              np.array(a.uniforms(range(1, 20001)))]
    for v in others:  # another purpose, seed or position: unrelated numbers
        assert abs(np.corrcoef(u, v)[0, 1]) < 0.03

