"""The coordinator against a synthetic drafter with known acceptance and synthetic costs."""
import random
from collections import Counter

import pytest

from hybrid.coordinator import Coordinator, CostModel

MAX_B = 16


def draft_cost(b, t):
    return 0.004 + 0.0015 * t * (b + 1)


def verify_cost(b):
    return 0.08 + 0.006 * b


def analytic_rate(alpha, b, t=1):
    tau = 1 + sum(alpha ** i for i in range(1, b + 1))
    return tau / (draft_cost(b, t) + verify_cost(b))


def best_size(alpha):
    return max(range(1, MAX_B + 1), key=lambda b: analytic_rate(alpha, b))


def simulate(coord, alpha_at, rounds, rng):
    """alpha_at(r) -> per-position acceptance in round r. Returns the chosen sizes."""
    chosen = []
    for r in range(rounds):
        b, t = coord.next()
        if b == 0 and coord.allow_plain:
            assert t == 0
            coord.observe(0, 0, 0, 0.0, verify_cost(0))
            chosen.append(0)
            continue
        assert 1 <= b <= MAX_B and 1 <= t <= b
        alpha = alpha_at(r) if alpha_at.__code__.co_argcount == 1 else alpha_at(r, t)
        accepted = 0
        while accepted < b and rng.random() < alpha:
            accepted += 1
        coord.observe(b, t, accepted, draft_cost(b, t), verify_cost(b))
        chosen.append(b)
    return chosen


def near_best(alpha, tolerance=0.97):
    """Sizes within 3% of the analytic optimum's tokens per second."""
    top = analytic_rate(alpha, best_size(alpha))
    return {b for b in range(1, MAX_B + 1) if analytic_rate(alpha, b) >= tolerance * top}


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.85, 0.95])
def test_converges_to_the_analytically_best_block_size_within_100_rounds(alpha):
    coord = Coordinator(MAX_B, seed=1)
    chosen = simulate(coord, lambda r: alpha, 300, random.Random(2))
    mode = Counter(chosen[100:]).most_common(1)[0][0]
    assert mode in near_best(alpha), (alpha, best_size(alpha), Counter(chosen[100:]))


def test_moves_when_acceptance_changes():
    coord = Coordinator(MAX_B, seed=3)
    chosen = simulate(coord, lambda r: 0.95 if r < 200 else 0.3, 400, random.Random(4))
    assert Counter(chosen[100:200]).most_common(1)[0][0] in near_best(0.95)
    assert Counter(chosen[300:]).most_common(1)[0][0] in near_best(0.3)


def test_never_outside_range_and_explores_every_size():
    coord = Coordinator(MAX_B, seed=5, explore=0.05)
    chosen = simulate(coord, lambda r: 0.7, 2000, random.Random(6))
    assert set(chosen) == set(range(1, MAX_B + 1))  # nothing starves
    assert all(1 <= b <= 4 for b in [coord.next(limit=4)[0] for _ in range(200)])


def test_state_is_per_sequence_costs_are_shared():
    costs = CostModel()
    a, b = Coordinator(MAX_B, costs=costs, seed=0), Coordinator(MAX_B, costs=costs, seed=0)
    simulate(a, lambda r: 0.95, 100, random.Random(0))
    assert b.alphas() != a.alphas() and b.alphas()[0] == pytest.approx(0.6)
    assert costs.seconds(8, 1) == pytest.approx(draft_cost(8, 1) + verify_cost(8), rel=0.05)


def test_cost_fit_finds_the_slope_of_sizes_clustered_together_and_keeps_plain_rounds_apart():
    """Verify seconds measured at block sizes 2-8 only (as the coordinator's choices cluster), noisy: the fit
    finds the per-token cost, far from the prior's; plain rounds, slower than a 1-token block on a CPU
    (another kernel path), are their own mean rather than a point pulling the line."""
    rng, costs = random.Random(3), CostModel()
    assert costs.verify_seconds(4) == pytest.approx(0.05 + 0.004 * 4)  # no data: the prior
    for _ in range(300):
        b = rng.randint(2, 8)
        costs.observe(b, 1, 0.002 + 0.001 * (b + 1), 0.19 + 0.009 * b + rng.gauss(0, 0.01), b)
        if rng.random() < 0.1:
            costs.observe(0, 0, 0.0, 0.225 + rng.gauss(0, 0.01))
    slope = (costs.verify_seconds(8) - costs.verify_seconds(1)) / 7
    assert slope == pytest.approx(0.009, abs=0.003)
    assert costs.verify_seconds(4) == pytest.approx(0.19 + 0.036, abs=0.01)
    assert costs.verify_seconds(0) == pytest.approx(0.225, abs=0.01)
    assert costs.seconds(0, 0) == costs.verify_seconds(0)
    assert costs.seconds(4, 2) == pytest.approx(costs.verify_seconds(4) + 0.002 + 0.001 * 10, abs=0.003)
    one = CostModel()
    one.observe(8, 1, 0.011, 0.26, 8)  # one round: its level, the prior's slope
    assert one.verify_seconds(8) == pytest.approx(0.26) and one.verify_seconds(4) == pytest.approx(0.26 - 4 * 0.004)


def test_verify_seconds_follow_a_cost_curve_no_line_fits():
    """A CPU's verify seconds (bench (c)): one row slower than two, steep from 1 to 4 rows, flat after. Each
    size the coordinator runs is read at its own measured mean (1 and 2, 0.005 apart, pooled into one: more
    draft tokens are never read as cheaper); a size never run leans on the line."""
    curve = {0: 0.225, 1: 0.200, 2: 0.195, 3: 0.215, 4: 0.230, 6: 0.240, 8: 0.250}
    rng, costs = random.Random(11), CostModel()
    for _ in range(400):
        b = rng.choice([0, 1, 2, 2, 2, 3, 4, 4, 6, 8])
        costs.observe(b, 1, 0.002 + 0.001 * (b + 1), curve[b] + rng.gauss(0, 0.008), b)
    for b, seconds in curve.items():
        assert costs.verify_seconds(b) == pytest.approx(seconds, abs=0.006), b
    assert costs.verify_seconds(0) > costs.verify_seconds(1)  # one row dearer than two: no line can say this
    assert costs.verify_seconds(12) > costs.verify_seconds(8)  # never run: the line, rising


def test_a_few_unlucky_rounds_do_not_make_a_longer_verify_look_cheaper():
    """Rows nearly free (a CPU from 2 to 8 rows): a size run twice on a busy moment, one run once on a quiet
    one, must not read as 'two draft tokens cost more than seven', which would decide how much of a tree to
    verify on noise; the estimates stay non-decreasing, pooled where the measurements disagree."""
    costs = CostModel()
    for _ in range(40):
        for b in (1, 3, 4):
            costs.observe(b, 1, 0.003, 0.240, b)
    costs.observe(2, 1, 0.003, 0.330, 2)
    costs.observe(2, 1, 0.003, 0.310, 2)
    costs.observe(7, 1, 0.003, 0.200, 7)
    v = [costs.verify_seconds(b) for b in range(1, 9)]
    assert v == sorted(v)
    assert v[0] == pytest.approx(0.240, abs=0.01) and v[7 - 1] >= v[4 - 1]
    assert costs._raw_verify(2)[0] > 0.26 and costs._raw_verify(7)[0] < 0.235  # what the rounds alone said


def test_expected_tau_formula():
    c = Coordinator(4)
    c._acc.counts[1] = ([1e9] * 4, [0.5e9] * 4)  # alpha = 0.5 everywhere, certain
    assert c.expected_tau(3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_chooses_more_denoising_steps_when_they_pay():
    # two steps cost one more drafter pass but lift acceptance from 0.5 to 0.9: worth it here
    coord = Coordinator(MAX_B, max_steps=4, seed=7)
    chosen_t = []
    rng = random.Random(8)
    for r in range(400):
        b, t = coord.next()
        alpha = {1: 0.5, 2: 0.9, 4: 0.9}[t]
        acc = 0
        while acc < b and rng.random() < alpha:
            acc += 1
        coord.observe(b, t, acc, draft_cost(b, t), verify_cost(b))
        chosen_t.append(t)
    assert Counter(chosen_t[200:]).most_common(1)[0][0] == 2


def test_plain_rounds_when_no_block_pays_and_drafting_resumes_when_it_does():
    """With allow_plain, B = 0 is chosen while acceptance is too low for any block to beat a plain round
    (alpha 0.05 here: every block costs more than the tokens it adds), exploration keeps measuring, and
    blocks return when acceptance rises. Sizes stay in [0, max]."""
    plain_rate = 1 / verify_cost(0)
    assert all(analytic_rate(0.05, b) < plain_rate for b in range(1, MAX_B + 1))
    coord = Coordinator(MAX_B, seed=9, allow_plain=True)
    chosen = simulate(coord, lambda r: 0.05 if r < 300 else 0.9, 800, random.Random(10))
    assert Counter(chosen[100:300]).most_common(1)[0][0] == 0
    assert 0.85 < chosen[100:300].count(0) / 200 < 1  # exploration rounds still draft
    assert Counter(chosen[600:]).most_common(1)[0][0] in near_best(0.9)
    assert all(0 <= b <= MAX_B for b in chosen)
    assert all(b == 0 or 1 <= b <= 4 for b in [coord.next(limit=4)[0] for _ in range(200)])
    # without it (the dataclass default) the same text never gets a plain round
    assert 0 not in simulate(Coordinator(MAX_B, seed=9), lambda r: 0.05, 300, random.Random(10))


def test_a_new_sequence_starts_from_the_engines_shared_acceptance():
    """Sequences sharing engine-wide counts: the second starts near the acceptance the first measured (and
    picks the size that suits it from its first round), while its own counts stay its own."""
    from hybrid.coordinator import AcceptanceCounts

    shared = AcceptanceCounts(MAX_B, decay=0.995)
    costs = CostModel()
    first = Coordinator(MAX_B, costs=costs, seed=0, shared=shared)
    simulate(first, lambda r: 0.3, 300, random.Random(11))
    second = Coordinator(MAX_B, costs=costs, seed=1, explore=0.0, shared=shared)
    assert second.alphas()[0] == pytest.approx(0.3, abs=0.08)
    assert second.next()[0] in near_best(0.3, tolerance=0.9)
    assert sum(second._acc.get(1)[0]) == 0  # nothing observed by the second sequence itself yet
    assert Coordinator(MAX_B, costs=costs, seed=1).alphas()[0] == pytest.approx(0.6)  # no sharing: flat prior
    with pytest.raises(ValueError):
        Coordinator(MAX_B, shared=AcceptanceCounts(MAX_B - 1, decay=0.995))  # counts for other block sizes


def test_untried_step_counts_lean_on_the_one_step_estimate():
    """More denoising passes cost more: until measured, they are assumed to accept no more than one pass
    (and are chosen on that less its doubt), so they are not chosen on hope; measured better, they are."""
    coord = Coordinator(MAX_B, max_steps=4, seed=12, explore=0.0)
    simulate(coord, lambda r, t: 0.3, 60, random.Random(13))
    assert sum(coord._by_steps.get(2)[0]) == 0  # T = 2 never tried
    assert coord.step_gain(2) == pytest.approx([0.0] * MAX_B)  # untried: no gain assumed ...
    assert all(a2 < a1 for a1, a2 in zip(coord.alphas(1), coord.alphas(2)))  # ... and chosen less its doubt
    assert coord.alphas(1)[0] == pytest.approx(0.3, abs=0.15)
    assert coord.next()[1] == 1
    for _ in range(30):  # measured: two passes accept far more
        coord.observe(8, 2, 8, draft_cost(8, 2), verify_cost(8))
    assert coord.next()[1] == 2


def test_steps_that_accept_no_more_are_not_chosen_on_a_lucky_streak():
    """Acceptance 0.4 whatever the steps, and each pass costs: many short sequences sharing the engine's
    counts (as in a bench or a server) keep to one step but for exploration. Deciding T per sequence from
    its own few rounds picked T > 1 in a third of the rounds (measured on the CPU bench)."""
    from hybrid.coordinator import AcceptanceCounts

    shared, costs, rng, steps = AcceptanceCounts(MAX_B, decay=0.995), CostModel(), random.Random(21), Counter()
    for s in range(40):
        coord = Coordinator(MAX_B, max_steps=4, seed=s, costs=costs, shared=shared, allow_plain=True)
        for _ in range(20):
            b, t = coord.next()
            acc = 0
            while acc < b and rng.random() < 0.4:
                acc += 1
            coord.observe(b, t, acc, draft_cost(b, t) if b else 0.0, verify_cost(b))
            steps[t] += 1
    assert steps[0] + steps[1] > 0.93 * sum(steps.values()), steps
    assert all(abs(g) < 0.1 for g in coord.step_gain(4)[:2])  # measured: no gain at the positions that matter


def test_a_step_gain_measured_on_the_engine_lifts_every_sequence():
    """The gain of more passes is the engine's: a fresh sequence whose own one-step estimate is low still
    adds it, and its own rounds at two steps count on the one-step scale (acceptance less the gain)."""
    from hybrid.coordinator import AcceptanceCounts

    shared = AcceptanceCounts(4, decay=1.0)
    shared.counts[1] = ([1e6] * 4, [0.3e6] * 4)
    shared.counts[2] = ([1e6] * 4, [0.6e6] * 4)
    coord = Coordinator(4, max_steps=2, shared=shared, explore=0.0)
    assert coord.step_gain(2) == pytest.approx([0.3] * 4, abs=1e-4)
    assert coord.alphas(2) == pytest.approx([a + 0.3 for a in coord.alphas(1)], abs=2e-3)  # 1e6 rounds: no doubt
    for _ in range(50):
        coord.observe(4, 2, 4, 0.01, 0.1)  # everything accepted at two steps
    n = sum(0.9 ** k for k in range(50))  # decayed rounds, plus 2 pseudo-rounds at the engine's 0.3
    assert coord.alphas(1)[0] == pytest.approx((n * (1 - 0.3) + 2 * 0.3) / (n + 2), abs=1e-3)  # one-step scale
    assert coord.alphas(2)[0] == pytest.approx(coord.alphas(1)[0] + 0.3, abs=1e-3)


# -- trimming by the drafter's confidence -------------------------------------------------------------
def test_calibration_learns_acceptance_per_confidence():
    """Tokens drafted at 0.95 that are accepted 60 % of the time, at 0.15 5 %: the per-bin posterior
    finds both, and only positions whose predecessors were accepted count."""
    from hybrid.coordinator import Calibration

    cal, rng = Calibration(decay=1.0), random.Random(0)
    assert cal.alpha(0.95) == pytest.approx(0.95) and cal.alpha(0.15) == pytest.approx(0.15)  # prior: calibrated
    for _ in range(3000):
        conf = [0.95 if rng.random() < 0.5 else 0.15 for _ in range(4)]
        accepted = 0
        while accepted < 4 and rng.random() < (0.6 if conf[accepted] == 0.95 else 0.05):
            accepted += 1
        cal.count(Calibration.tried(conf, accepted))
    assert cal.alpha(0.95) == pytest.approx(0.6, abs=0.03) and cal.alpha(0.15) == pytest.approx(0.05, abs=0.02)
    assert cal.alpha(0.55) == pytest.approx(0.55)  # a bin never seen keeps its prior


def test_trim_verifies_the_confident_stretch():
    """Extending a draft pays while P(all accepted) beats rate * (v(L+1) - v(L)): a confident run is
    verified to its end, a doubtful first token alone, never less than one token or more than drafted."""
    from hybrid.coordinator import Calibration

    coord = Coordinator(MAX_B, costs=CostModel(), calibration=Calibration(), seed=0)
    for _ in range(30):
        coord.costs.observe(4, 1, draft_cost(4, 1), verify_cost(4), drafted=8)
        coord.costs.observe(1, 1, draft_cost(1, 1), verify_cost(1))
    assert coord.trim([0.99, 0.99, 0.99, 0.05, 0.99, 0.99]) == 3
    assert coord.trim([0.02] * 8) == 1
    assert coord.trim([0.99] * 5) == 5
    assert coord.trim([]) == 0 and Coordinator(MAX_B).trim([0.1, 0.2]) == 2  # no calibration: whole


def _trimmed_rate(trim: bool, rounds: int, p_easy: float) -> float:
    """Tokens per second of the coordinator on a drafter whose rounds are mostly easy or mostly hard
    (confidence 0.95 or 0.25 per token; accepted 90 % or 5 %), synthetic costs."""
    from hybrid.coordinator import Calibration

    rng = random.Random(1)
    coord = Coordinator(MAX_B, calibration=Calibration() if trim else None, seed=3)
    tokens = seconds = 0.0
    for _ in range(rounds):
        b, t = coord.next()
        p = 0.9 if rng.random() < p_easy else 0.1
        conf = [0.95 if rng.random() < p else 0.25 for _ in range(b)]
        d = draft_cost(b, t)
        n = coord.trim(conf) if trim else b
        accepted = 0
        while accepted < n and rng.random() < (0.9 if conf[accepted] == 0.95 else 0.05):
            accepted += 1
        coord.observe(n, t, accepted, d, verify_cost(n), drafted=b, conf=conf)
        tokens, seconds = tokens + accepted + 1, seconds + d + verify_cost(n)
    return tokens / seconds


def _fixed_rate(b: int, rounds: int, p_easy: float) -> float:
    rng = random.Random(1)
    tokens = seconds = 0.0
    for _ in range(rounds):
        p = 0.9 if rng.random() < p_easy else 0.1
        conf = [0.95 if rng.random() < p else 0.25 for _ in range(b)]
        accepted = 0
        while accepted < b and rng.random() < (0.9 if conf[accepted] == 0.95 else 0.05):
            accepted += 1
        tokens, seconds = tokens + accepted + 1, seconds + draft_cost(b, 1) + verify_cost(b)
    return tokens / seconds


@pytest.mark.parametrize("p_easy", [0.3, 0.6])
def test_trimming_beats_every_fixed_block_size_when_confidence_tells(p_easy):
    """Rounds that are easy or hard as a whole (as code and prose are): a fixed size fits neither, the
    untrimmed coordinator finds the best fixed size at best, trimming verifies each round as far as it pays
    and beats every fixed size by 10 % (analytic rates of a synthetic drafter, not timings)."""
    best_fixed = max(_fixed_rate(b, 2000, p_easy) for b in range(1, MAX_B + 1))
    assert _trimmed_rate(True, 2000, p_easy) >= 1.1 * best_fixed
    assert _trimmed_rate(True, 2000, p_easy) > _trimmed_rate(False, 2000, p_easy)


def simulate_with_lookup(coord, alpha_draft, alpha_lookup, rounds, rng):
    """Every round a prompt-lookup copy of 8 tokens is on offer after a match of 2 or 4 tokens (alternating),
    accepted per position with alpha_lookup[match]; the drafter's tokens with alpha_draft.
    Returns (match, tokens verified from the copy (0: drafted instead)) per round."""
    used = []
    for r in range(rounds):
        b, t = coord.next()
        match = 2 if r % 2 else 4
        size = coord.lookup(8, match)
        assert 0 <= size <= 8
        n, alpha = (size, alpha_lookup[match]) if size else (b, alpha_draft)
        accepted = 0
        while accepted < n and rng.random() < alpha:
            accepted += 1
        if size:
            coord.observe_lookup(size, match, accepted, verify_cost(size))
        else:
            coord.observe(b, t, accepted, draft_cost(b, t), verify_cost(b))
        used.append((match, size))
    return used


def test_prompt_lookup_is_verified_where_it_beats_the_drafter():
    """Copies after 4-token matches are right 90% of the time, after 2-token matches 5%; the drafter 70%.
    The coordinator learns per match length: it verifies long copies after 4-token matches and drafts
    after 2-token ones (but for exploration), and it keeps measuring both."""
    coord = Coordinator(MAX_B, seed=4)
    used = simulate_with_lookup(coord, 0.7, {2: 0.05, 4: 0.9}, 600, random.Random(5))
    late = used[200:]
    long_copies = [s for m, s in late if m == 4]
    assert sum(s >= 4 for s in long_copies) / len(long_copies) > 0.9
    short = [s for m, s in late if m == 2]
    assert 0.0 < sum(s > 0 for s in short) / len(short) < 0.15  # exploration only
    assert coord.lookup_taus(4)[8] > 4 and coord.lookup_taus(2)[1] < coord.lookup_taus(4)[1]


def test_prompt_lookup_gives_way_to_a_better_drafter():
    """A drafter right 95% of the time beats copies that are right 60% of the time: drafted rounds win."""
    coord = Coordinator(MAX_B, seed=6)
    used = simulate_with_lookup(coord, 0.95, {2: 0.6, 4: 0.6}, 600, random.Random(7))
    assert sum(s > 0 for _, s in used[200:]) / 400 < 0.15


def test_calibration_of_a_tree_counts_every_tried_node():
    """The root's children and the children of accepted nodes were each tried against the verifier's token;
    nodes under a rejected node were not."""
    from hybrid.coordinator import Calibration

    cal = Calibration(decay=1.0)
    conf, parents, path = [0.95, 0.15, 0.95, 0.55, 0.15], [0, 0, 1, 1, 2], [1, 3]
    cal.count(Calibration.tried(conf, len(path), (parents, path)))
    assert cal.reached[9] == 2 and cal.accepted[9] == 2  # rows 1 and 3, both on the path
    assert cal.reached[1] == 1 and cal.accepted[1] == 0  # row 2 tried and rejected; row 5 (under row 2) not tried
    assert cal.reached[5] == 1 and cal.accepted[5] == 0  # row 4: a sibling of the accepted row 3
    assert sum(cal.reached) == 4


def test_trimming_a_tree_keeps_the_nodes_whose_path_pays_for_its_row():
    """A node pays when the calibrated probability of reaching it beats rate * (v(N+1) - v(N)): the likely
    paths are kept whole, the unlikely runners-up cut; rows that cost much keep only the first node."""
    from hybrid.coordinator import Calibration

    coord = Coordinator(MAX_B, costs=CostModel(), calibration=Calibration(), seed=0)
    for _ in range(30):
        coord.costs.observe(4, 1, draft_cost(4, 1), verify_cost(4), drafted=8)
        coord.costs.observe(1, 1, draft_cost(1, 1), verify_cost(1))
    # best first: 0.6 under the root, 0.9 and 0.9 down its path, runners-up 0.3 and 0.05, then 0.02 under the 0.3
    conf, parents = [0.6, 0.9, 0.9, 0.3, 0.05, 0.02], [0, 1, 2, 0, 0, 4]
    # calibrated reach (prior = bin centre): .65, .62, .59, .35, .05, .0175; a row costs rate * 0.006 tokens
    threshold = coord.best_option()[2] * 0.006
    assert 0.05 < threshold < 0.35
    assert coord.trim(conf, parents) == 4
    assert coord._verified[-1] == 3 and coord._hit_cap  # deepest kept node at depth 3, the whole depth drafted
    for _ in range(60):  # rows now cost 0.5 s each
        coord.costs.observe(4, 1, draft_cost(4, 1), 0.08 + 0.5 * 4, drafted=8)
        coord.costs.observe(1, 1, draft_cost(1, 1), 0.08 + 0.5 * 1)
    assert coord.trim(conf, parents) == 1
    assert Coordinator(MAX_B).trim(conf, parents) == 6  # no calibration: the whole tree


def test_trim_learns_per_sequence_what_the_drafters_confidence_is_worth():
    """Two sequences share the engine's calibration: on one the drafter's confident tokens are always
    accepted (code), on the other never (a text it cannot guess). The engine-wide a(c) is their mix; each
    sequence's own factor k moves its trimming apart: the first verifies the whole draft, the second a token or two."""
    from hybrid.coordinator import Calibration

    cal, costs = Calibration(), CostModel()
    row = 0.0005  # verify seconds per row: ~0.09 of a token at this sequence's rate
    for b in range(1, MAX_B + 1):
        for _ in range(5):
            costs.observe(b, 1, draft_cost(b, 1), 0.08 + row * b, drafted=MAX_B)
    good = Coordinator(MAX_B, costs=costs, calibration=cal, seed=0)
    bad = Coordinator(MAX_B, costs=costs, calibration=cal, seed=1)
    conf = [0.75] * 6  # [B] the same confidence on both texts
    parents = [0, 1, 2, 0, 4, 5]  # a tree: two paths of three
    for _ in range(20):
        good.observe(3, 1, 3, 0.01, 0.08 + row * 6, 6, conf, (parents, [1, 2, 3]))
        bad.observe(3, 1, 0, 0.01, 0.08 + row * 6, 6, conf, (parents, []))
    assert 0.3 < cal.alpha(0.75) < 0.7  # the engine's estimate: the mix of both
    assert good.calibration_factor() > 1.3 and bad.calibration_factor() < 0.2
    trimmed = {name: (c.trim(conf), c.trim(conf, parents)) for name, c in (("good", good), ("bad", bad))}
    assert trimmed["good"] == (6, 6)  # the whole chain, the whole tree
    assert trimmed["bad"][0] <= 2 and trimmed["bad"][1] < 6
    good._seq_cal, bad._seq_cal = [0.0, 0.0], [0.0, 0.0]  # the engine's a(c) alone: the chain in between
    assert trimmed["bad"][0] < good.trim(conf) < 6 and bad.trim(conf) > trimmed["bad"][0]
    fresh = Coordinator(MAX_B, costs=costs, calibration=cal, seed=2)
    assert fresh.calibration_factor() == 1.0  # a new sequence starts from the engine's calibration


def test_a_plain_round_ages_early_misses_so_drafting_resumes_where_the_engine_says_it_pays():
    """A dear draft pass (about a third of a round, as a 0.5B drafter's on a CPU): a sequence whose first
    rounds miss turns plain; each plain round ages its own counts towards the engine's (acceptance 0.8 here),
    so it drafts again within a few rounds, while a text that keeps missing stays mostly plain."""
    from hybrid.coordinator import AcceptanceCounts

    dear = lambda b, t: 0.035 + 0.001 * t * (b + 1)  # noqa: E731

    def engine_shared():
        shared = AcceptanceCounts(MAX_B, decay=1.0)
        shared.counts[1] = ([1e3] * MAX_B, [0.8e3] * MAX_B)
        return shared

    def run(alpha, rounds, seed):
        """Every draft misses until the sequence first turns plain, then drafts are accepted at `alpha`."""
        coord = Coordinator(MAX_B, seed=seed, explore=0.0, shared=engine_shared(), allow_plain=True)
        rng, chosen = random.Random(seed), []
        for _ in range(rounds):
            b, t = coord.next()
            if b == 0:
                coord.observe(0, 0, 0, 0.0, verify_cost(0))
            else:
                acc = 0 if 0 not in chosen else next(i for i in range(b + 1) if i == b or rng.random() >= alpha)
                coord.observe(b, t, acc, dear(b, t), verify_cost(b))
            chosen.append(b)
        return chosen

    for seed in range(5):
        good = run(0.8, 40, seed)
        assert 0 in good[:8], good  # the early misses made it plain ...
        assert sum(b > 0 for b in good[20:]) >= 15, good  # ... and it drafts again, for good
        bad = run(0.05, 200, seed)
        assert bad[40:].count(0) / 160 > 0.6, bad  # a text that keeps missing stays mostly plain
