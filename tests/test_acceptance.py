"""Acceptance: exact outcomes on crafted logits; the sampling rule reproduces p, a biased one does not."""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import hybrid.acceptance as acc
from hybrid.acceptance import Acceptance, SamplingParams, accept_greedy, accept_sampling, warp
from hybrid.errors import UserError


def one_hot_logits(targets, V=6):
    logits = torch.full((len(targets), V), -5.0)
    logits[torch.arange(len(targets)), torch.tensor(targets)] = 5.0
    return logits


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
    assert accept_greedy(torch.tensor(draft, dtype=torch.long), one_hot_logits(targets)) == expected


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


def first_token_counts(rule, n=20000, deterministic=False, seed=0):
    """Sample a draft from Q (or take its argmax), accept with `rule`; count the first committed token."""
    g = torch.Generator().manual_seed(seed)
    counts = np.zeros(P.shape[1])
    for _ in range(n):
        if deterministic:
            draft, q = Q.argmax(-1), None
        else:
            draft, q = torch.multinomial(Q, 1, generator=g)[:, 0], Q
        a = rule(draft, q, P, g)
        first = int(draft[0]) if a.accepted > 0 else a.bonus
        counts[first] += 1
    return counts


def expected(counts):
    p0 = P[0].double().numpy()
    return p0 / p0.sum() * counts.sum()


@pytest.mark.parametrize("deterministic", [False, True])
def test_rejection_sampling_reproduces_the_verifier_distribution(deterministic):
    counts = first_token_counts(accept_sampling, deterministic=deterministic)
    assert chisquare(counts, expected(counts)).pvalue > 1e-3


def biased_accept(draft, q, p, g):
    """A plausible bug: on rejection resample from p instead of norm(max(0, p - q))."""
    a = accept_sampling(draft, q, p, g)
    if a.accepted < draft.numel():
        return Acceptance(a.accepted, int(torch.multinomial(p[a.accepted], 1, generator=g)))
    return a


def test_a_biased_acceptance_rule_fails_the_same_test():
    counts = first_token_counts(biased_accept)
    assert chisquare(counts, expected(counts)).pvalue < 1e-6


def test_identical_draft_and_target_accepts_everything():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        draft = torch.multinomial(P[:2], 1, generator=g)[:, 0]
        assert accept_sampling(draft, P[:2], P, g).accepted == 2


def test_dispatch_uses_greedy_at_temperature_zero(monkeypatch):
    monkeypatch.setattr(acc, "accept_sampling", lambda *a: pytest.fail("sampling path at temperature 0"))
    assert acc.accept(torch.tensor([1]), None, one_hot_logits([1, 3]), SamplingParams(0.0), None) == Acceptance(1, 3)
