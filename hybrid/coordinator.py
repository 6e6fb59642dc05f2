"""The coordinator: choose each round's block size B and denoising steps T per sequence.

Model. Let alpha_i(T) be the probability that draft position i is accepted given positions < i
were (per sequence, per step count T). A round with block size B commits
    E[tau | B, T] = 1 + sum_{i=1..B} prod_{j<=i} alpha_j(T)
tokens and costs c(B, T) = d(B, T) + v(B) seconds, with draft time d(B, T) = d0 + d1 * T * (B + 1)
(T drafter passes over B + 1 rows) and verify time v(B) (one pass over B + 1 rows): per block size, the
decayed mean of that size's measured rounds with the line v0 + v1 * B as one more round, so a size seldom
run leans on the line. (A verifier's cost is not linear in B: on a CPU one row takes a slower path than
two, and 1 -> 4 rows costs more per row than 4 -> 8; the line alone misjudged both ends.)
For B >= 1 the measured sizes' means are pooled where a smaller size measured dearer (one more row never
costs less), so a few rounds on a busy moment do not decide how much of a draft to verify.
The next (B, T) maximises E[tau | B, T] / c(B, T), the expected committed tokens per second.

Estimation. alpha_i(T) is a Beta posterior over decayed counts: a round that accepted a of B draft
tokens "reached" positions 1..min(a+1, B) and accepted positions 1..a. Counts decay by `decay` each
round (memory of about 1 / (1 - decay) rounds), so a text that changes character (prose -> code) moves
the estimate within tens of rounds. A position with few observations leans on its predecessor's
estimate (prior mean alpha_{i-1}), so untried longer blocks look as good as the tail seen so far.
Costs (the lines and the per-size means) are decayed statistics shared across sequences (they are
properties of the machine, not of the text). With probability `explore` a round tries a random size,
so no size starves forever. A new sequence's estimates start
from the engine's shared counts (`shared`, decaying over a few hundred rounds of all sequences) rather
than a flat prior, so short requests do not spend their few rounds relearning what the drafter is worth.

Denoising steps. How much more T > 1 passes accept is a property of the drafter, not of the text, so it
is measured engine-wide and added to the sequence's own estimate:
    alpha_i(T) = alpha_i + (A_i(T) - A_i(1)),   clipped to [0.001, 0.999],
with alpha_i the sequence's acceptance at one step and A_i(T) the engine's per step count (`shared`; a
coordinator without one keeps its own per-T counts). Choosing T takes the gain less one standard error:
the step count in use gathers counts while the others are only explored, so a point estimate would keep
whichever T was lucky early. alpha_i learns from all the sequence's rounds: one at T steps counts its
acceptances less the gain. An untried T has A(T) = A(1) (no gain assumed, so its extra passes are not
bought on hope); exploration measures it. Deciding T from a sequence's own few rounds at each T picked
whichever T had a lucky streak (and four passes that accept no more than one cost ~10 % of a CPU round).

Plain rounds. With `allow_plain` (the engine's default) B = 0 is a candidate too: a round with no draft
commits exactly one token for v(0) seconds, so when no block is expected to pay for its drafting and
its longer verification (a poor drafter, a text it cannot guess) the sequence decodes plainly and loses
only the exploration rounds, which keep measuring acceptance so drafting resumes when it pays again.
A plain round ages the sequence's own counts (by sqrt(`decay`): half a drafted round's memory loss)
towards the engine's (`shared`), so a few early misses do not hold a sequence in plain decoding for the
rest of its text (with a dear draft pass, two or three misses on a short answer did): it drafts again
within a few rounds, and a text that keeps missing still decodes plainly in most of them. Without it, B stays in [1, max].

Trimming by confidence (`calibration`, the engine's default with block size auto). A drafter that
reports its probability c_i of each drafted token lets a round draft the largest block B and then
verify only its first L tokens, chosen per round: L maximises
    E[tau | L] - rate * v(L),   E[tau | L] = 1 + sum_{i=1..L} prod_{j<=i} a(c_j),
(the draft's seconds are spent whatever L is) with a(c) the acceptance of a token drafted with probability c,
given the ones before it were accepted: a Beta posterior per bin of c over decayed counts of all
sequences (prior mean: the bin's centre, i.e. a calibrated drafter), scaled per sequence by
    k = (A + s) / (E + s),   a_seq(c) = min(0.999, k * a(c)),
with A the sequence's accepted tried tokens and E the sum of a(c) over them (decayed like its position
counts; s = prior_strength): the engine's calibration mixes texts the drafter guesses well (code) and
badly (translation), and a sequence on which the same confidence means less learns so in a few rounds.
Confident stretches are verified long, doubtful ones short, which no fixed block size can do.
Extending a draft from L to L + 1 tokens pays when P(all L + 1 accepted) > rate * (v(L + 1) - v(L)),
which is what that argmax does, with `rate` the expected tokens per second of the best option. The
drafted block is the size the position model would choose, or one more than the longest of the last
`recent` verified lengths if larger (twice the last one when that used the whole draft), so drafting
grows with what verification uses.

Prompt lookup. When the context's last n tokens (n = 2..4) occurred earlier, the tokens that followed
them are a free draft. Their acceptance alpha^lookup_i(n) is estimated like the drafter's (decayed counts
per position, per match length n: longer matches copy more reliably), per sequence with the engine's
counts as prior, and a round verifies the first L copied tokens, L maximising E[tau^lookup | L] / v(L),
when that beats the best drafter option's expected rate (else it drafts as usual). With probability
`explore` the choice is random (the whole copy, or the drafter), so a losing source keeps being measured.

Draft trees (`tree` > 0 in the loop). The drafter offers a best-first tree of depth B (the block size
chosen as above) and `trim` keeps its first N nodes (any prefix of a best-first list is a tree): node k
is reached with r_k = r_parent * a(c_k), a(c) the calibration above applied to the node's own drafter
probability, and N maximises 1 + sum_{k<=N} r_k - rate * v(N), v(N) the verify time of N tokens whatever
their shape. Calibration learns from every node tried: the root's children and the children of accepted
nodes (accepted iff on the path). Acceptance per position counts the accepted path's length as a chain's.
A chain is the tree whose parents are i - 1, so trimming a chain is the same computation.

Load. When several sequences share a verifier pass (hybrid.loop.Scheduler), a round's cost is the sequence's
share of the pass (`CostModel.verify_share`): the pass's time with this sequence's plain row split evenly over
its sequences, plus what its draft rows add to it. Each extra row is then weighed against the whole pass, so
where rows are dear (a CPU running many sequences) sequences draft and verify less as the load grows, and where
they are nearly free (a GPU at small batch) they go on drafting; a drafter that drafts all sequences in one
pass has its fixed time split likewise. The scheduler sets the load before it plans each sequence and records
each shared pass's timings itself.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class Load:
    """What the next pass carries besides one sequence's rows (set by the scheduler before it plans that sequence)."""

    sequences: int = 1  # sequences decoding in the pass
    others: int = 0  # verify rows the other sequences put in the pass (their last pass's)
    shared_draft: bool = False  # the drafter drafts every sequence in one pass


@dataclass
class CostModel:
    """Decayed least-squares fits of draft and verify seconds; shared by all sequences of an engine.

    Verify seconds are a pass's, as a function of its rows (rows - 1, the block size of a sequence alone). A
    sequence in a pass with others is charged its share: the pass's time with its plain row, split evenly, plus
    what its draft rows add to the pass, v(R + B) - v(R) with R the others' rows; likewise a drafter that drafts
    every sequence in one pass splits that pass's fixed time. Alone (the default load) that is v(B) and d(B)."""

    decay: float = 0.98
    # sufficient statistics of y = a + b x: [n, sx, sxx, sy, sxy], decayed; the prior counts until data come
    draft: list[float] = field(default_factory=lambda: [0.0] * 5)
    verify: list[float] = field(default_factory=lambda: [0.0] * 5)  # rounds that verified B >= 1 draft tokens
    # verify seconds per block size B (0: plain rounds): [n, sum of seconds], decayed with the line's
    by_size: dict[int, list[float]] = field(default_factory=dict)
    prior_draft: tuple[float, float] = (0.002, 0.001)  # seconds: a, b per (T * (B + 1))
    prior_verify: tuple[float, float] = (0.05, 0.004)  # seconds: a, b per B
    _monotone: dict[int, float] | None = field(default=None, repr=False)  # measured sizes' v(B), until the next round
    load: Load = field(default_factory=Load)  # the pass being planned

    @staticmethod
    def _add(s: list[float], x: float, y: float, decay: float) -> None:
        for i in range(5):
            s[i] *= decay
        s[0] += 1
        s[1] += x
        s[2] += x * x
        s[3] += y
        s[4] += x * y

    @staticmethod
    def _fit(s: list[float], prior: tuple[float, float], x: float, strength: float = 1.0) -> float:
        """y = a + b x by decayed least squares, the slope shrunk towards the prior's by `strength` (a
        pseudo-spread of x, in x units squared) and the line through the data's mean; no data: the prior.
        (Pseudo-points at fixed x would be far from data clustered at a few block sizes, and their leverage
        set the slope: it read ~0.5 ms per token on a CPU where a token costs ~9.)"""
        n, sx, sxx, sy, sxy = s
        a0, b0 = prior
        if n < 1e-9:
            return max(a0 + b0 * x, 1e-9)
        mx, my = sx / n, sy / n
        b = (sxy - n * mx * my + strength * b0) / (sxx - n * mx * mx + strength)
        return max(my + b * (x - mx), 1e-9)

    def observe(self, block_size: int, steps: int, draft_s: float, verify_s: float, drafted: int | None = None) -> None:
        """A round's timings: `drafted` tokens drafted (default block_size), block_size of them verified.
        Plain rounds (nothing verified but the last token) are not points on the line: one row can take
        another kernel path than several (on a CPU in bf16 it is slower than two)."""
        drafted = block_size if drafted is None else drafted
        if drafted > 0:
            self._add(self.draft, steps * (drafted + 1), draft_s, self.decay)
        if block_size > 0:
            self._add(self.verify, block_size, verify_s, self.decay)
        for stats in self.by_size.values():
            stats[0] *= self.decay
            stats[1] *= self.decay
        stats = self.by_size.setdefault(block_size, [0.0, 0.0])
        stats[0] += 1
        stats[1] += verify_s
        self._monotone = None

    def _raw_verify(self, block_size: int) -> tuple[float, float]:
        """(this size's decayed mean of measured rounds with the line's value at B as one more round, its weight)"""
        n, total = self.by_size.get(block_size, (0.0, 0.0))
        return (total + self._fit(self.verify, self.prior_verify, block_size)) / (n + 1), n + 1

    def verify_seconds(self, block_size: int) -> float:
        """v(B): for B = 0 (one row: a plain round) its own estimate; for B >= 1 the measured sizes' estimates
        made non-decreasing in B (pooled where a smaller size measured dearer, weighted by rounds), and a size
        never measured the line's value held between its measured neighbours': one more row never costs less,
        and where rows are nearly free the noise of a few rounds would otherwise decide how much to verify."""
        if block_size <= 0:
            return self._raw_verify(0)[0]
        if self._monotone is None:  # once per round
            blocks: list[list] = []  # pooled runs of measured sizes: [mean, weight, sizes]
            for b in sorted(k for k in self.by_size if k >= 1):
                blocks.append([*self._raw_verify(b), [b]])
                while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                    (m1, w1, s1), (m2, w2, s2) = blocks[-2], blocks.pop()
                    blocks[-1] = [(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, s1 + s2]
            self._monotone = {b: m for m, _, sizes in blocks for b in sizes}
        if block_size in self._monotone:
            return self._monotone[block_size]
        below = [m for b, m in self._monotone.items() if b < block_size]
        above = [m for b, m in self._monotone.items() if b > block_size]
        line = self._raw_verify(block_size)[0]
        return min(max([line, *below]), *above) if above else max([line, *below])

    def verify_share(self, block_size: int) -> float:
        """A sequence's share of the pass's verify seconds when it verifies `block_size` draft tokens (see above)."""
        load = self.load
        if load.sequences <= 1 and load.others == 0:
            return self.verify_seconds(block_size)
        base = self.verify_seconds(load.others)  # the pass with this sequence's plain row
        return base / load.sequences + (self.verify_seconds(load.others + block_size) - base if block_size else 0.0)

    def seconds(self, block_size: int, steps: int) -> float:
        """A round's expected seconds for one sequence: its draft (its share of a shared drafter pass) and verify."""
        d = 0.0
        if block_size:
            d = self._fit(self.draft, self.prior_draft, steps * (block_size + 1))
            if self.load.shared_draft and self.load.sequences > 1:
                fixed = self._fit(self.draft, self.prior_draft, 0.0)
                d -= fixed * (1 - 1 / self.load.sequences)
        return d + self.verify_share(block_size)


@dataclass
class AcceptanceCounts:
    """Decayed per-position counts, per step count T: a round that accepted a of B draft tokens reached
    positions 1..min(a+1, B) and accepted positions 1..a. Every observed round decays all counts."""

    max_block_size: int
    decay: float
    prior_strength: float = 2.0
    counts: dict = field(default_factory=dict)  # T -> (reached [Bmax], accepted [Bmax])

    def get(self, steps: int):
        if steps not in self.counts:
            self.counts[steps] = ([0.0] * self.max_block_size, [0.0] * self.max_block_size)
        return self.counts[steps]

    def observe(self, block_size: int, steps: int, accepted: int, shift: list[float] | None = None) -> None:
        """`shift`: subtract shift[i] from each acceptance at position i (a round at more steps, counted on the
        one-step scale); accepted counts stay within [0, reached]."""
        self.age()
        reached, acc = self.get(steps)
        for i in range(min(accepted + 1, block_size)):
            reached[i] += 1
            acc[i] += (i < accepted) - (shift[i] if shift is not None else 0.0)
            acc[i] = min(reached[i], max(0.0, acc[i]))

    def age(self, factor: float | None = None) -> None:
        """Every count decays: by `decay` (a round observed), or by `factor`."""
        factor = self.decay if factor is None else factor
        for counts in self.counts.values():
            for c in counts:
                for i in range(len(c)):
                    c[i] *= factor

    def means(self, steps: int, priors: list[float] | None = None) -> list[float]:
        """Posterior mean acceptance per position: counts plus `prior_strength` pseudo-rounds at the prior,
        which is priors[i] if given, else the previous position's mean (0.6 before position 1)."""
        reached, accepted = self.get(steps)
        out, prev = [], 0.6
        for i, (r, a) in enumerate(zip(reached, accepted)):
            prior = priors[i] if priors is not None else prev
            prev = (a + self.prior_strength * prior) / (r + self.prior_strength)
            out.append(prev)
        return out


@dataclass
class Calibration:
    """Acceptance as a function of the drafter's confidence: decayed (reached, accepted) counts per bin of
    the drafted token's probability, over positions whose predecessors were all accepted."""

    bins: int = 10
    decay: float = 0.998
    prior_strength: float = 4.0
    reached: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.reached = self.reached or [0.0] * self.bins
        self.accepted = self.accepted or [0.0] * self.bins

    def bin(self, conf: float) -> int:
        return min(self.bins - 1, max(0, int(conf * self.bins)))

    def alpha(self, conf: float) -> float:
        """Posterior mean acceptance of a token drafted with probability `conf`."""
        b = self.bin(conf)
        prior = (b + 0.5) / self.bins
        return (self.accepted[b] + self.prior_strength * prior) / (self.reached[b] + self.prior_strength)

    @staticmethod
    def tried(conf: list[float], accepted: int, tree: tuple[list[int], list[int]] | None = None
              ) -> list[tuple[float, bool]]:
        """(confidence, accepted) of each token a verified draft tried against the verifier's: a chain's first
        `accepted` + 1; a tree's (parents [N] per node, rows 1..N; the accepted path's rows) children of the root
        and of accepted nodes, the one on the path accepted."""
        if tree is None:
            return [(c, i < accepted) for i, c in enumerate(conf[: accepted + 1])]
        parents, path = tree
        reached, on_path = {0, *path}, set(path)
        return [(c, row in on_path) for row, (c, p) in enumerate(zip(conf, parents), start=1) if p in reached]

    def count(self, tried: list[tuple[float, bool]]) -> None:
        """One verified draft's tried tokens, (confidence, accepted) each: decay, then count them."""
        for i in range(self.bins):
            self.reached[i] *= self.decay
            self.accepted[i] *= self.decay
        for c, ok in tried:
            b = self.bin(c)
            self.reached[b] += 1
            self.accepted[b] += ok


@dataclass
class Coordinator:
    """Per-sequence choice of (block size, steps). Call `next()` before a round, `observe()` after it."""

    max_block_size: int
    max_steps: int = 1
    costs: CostModel = field(default_factory=CostModel)
    decay: float = 0.9
    explore: float = 0.05
    prior_strength: float = 2.0
    seed: int = 0
    allow_plain: bool = False  # B = 0 (no draft) is a candidate when drafting does not pay
    # engine-wide counts (slow decay) that a new sequence starts from instead of a flat prior; None: per sequence only
    shared: AcceptanceCounts | None = None
    # engine-wide acceptance per drafter confidence: when set, rounds draft a block and trim()
    # chooses how much of it to verify; None: the block size chosen before drafting is verified whole
    calibration: Calibration | None = None
    recent: int = 8  # trimmed rounds whose verified lengths bound the next draft (with calibration)
    # engine-wide acceptance of prompt-lookup drafts, keyed by match length (a prior for this sequence's)
    shared_lookup: AcceptanceCounts | None = None
    max_lookup: int = 8
    _acc: AcceptanceCounts = field(init=False)
    _rng: random.Random = field(init=False)

    def __post_init__(self):
        if self.max_block_size < 1:
            raise ValueError("max_block_size must be >= 1")
        if self.shared is not None and self.shared.max_block_size != self.max_block_size:
            raise ValueError("shared acceptance counts must cover the same maximum block size")
        self._rng = random.Random(self.seed)
        self._acc = AcceptanceCounts(self.max_block_size, self.decay, self.prior_strength)
        self._verified: list[int] = []  # the last `recent` trimmed lengths
        self._seq_cal = [0.0, 0.0]  # this sequence's tried draft tokens: decayed [sum of calibrated a(c), accepted]
        self._hit_cap = False  # the last trimmed round verified all it drafted
        self.step_options = [t for t in (1, 2, 4, 8) if t <= max(1, self.max_steps)]
        self._lookup = AcceptanceCounts(self.max_lookup, self.decay, self.prior_strength)
        # acceptance per step count, for the gain of T > 1 passes: the engine's, else this coordinator's own
        # (remembering as long as the engine's: a property of the drafter, not of the last few rounds)
        self._by_steps = self.shared if self.shared is not None else AcceptanceCounts(
            self.max_block_size, 0.995, self.prior_strength)

    def alphas(self, steps: int = 1) -> list[float]:
        """Posterior mean acceptance per position (conditional on the previous ones): this sequence's at one
        step (prior: the engine's), plus for `steps` > 1 the gain of that many passes measured over the
        engine (see "Denoising steps")."""
        priors = None if self.shared is None else self.shared.means(1)
        own = self._acc.means(1, priors)
        if steps == 1:
            return own
        return [min(0.999, max(0.001, a + g)) for a, g in zip(own, self.step_gain(steps, cautious=True))]

    def step_gain(self, steps: int, cautious: bool = False) -> list[float]:
        """A_i(steps) - A_i(1) per position: the engine's measured gain of `steps` denoising passes over one.
        `cautious`: less one standard error of that difference (what choosing T uses)."""
        by = self._by_steps
        one = by.means(1)
        more = by.means(steps, one)  # untried: no gain
        gain = [m - o for m, o in zip(more, one)]
        if not cautious:
            return gain
        n1, n2 = by.get(1)[0], by.get(steps)[0]  # decayed rounds that reached each position
        ps = by.prior_strength
        return [g - math.sqrt(o * (1 - o) / (a + ps) + m * (1 - m) / (b + ps))
                for g, o, m, a, b in zip(gain, one, more, n1, n2)]

    def expected_taus(self, steps: int = 1) -> list[float]:
        """E[tau | B, steps] for B = 0..max: 1 + sum_{i<=B} prod_{j<=i} alpha_j."""
        taus, run = [1.0], 1.0
        for alpha in self.alphas(steps):
            run *= alpha
            taus.append(taus[-1] + run)
        return taus

    def expected_tau(self, block_size: int, steps: int = 1) -> float:
        return self.expected_taus(steps)[block_size]

    def rate(self, block_size: int, steps: int = 1) -> float:
        """Expected committed tokens per second (block size 0: a plain round, one token)."""
        return self.expected_tau(block_size, steps) / self.costs.seconds(block_size, steps)

    def best(self) -> tuple[int, int]:
        b, t, _ = self.best_option()
        return b, t

    def best_option(self) -> tuple[int, int, float]:
        """(block size, steps, expected tokens per second) of the best option."""
        options = [(0, 0, 1 / self.costs.seconds(0, 0))] if self.allow_plain else []
        for t in self.step_options:
            taus = self.expected_taus(t)
            options += [(b, t, taus[b] / self.costs.seconds(b, t)) for b in range(max(1, t), self.max_block_size + 1)]
        return max(options, key=lambda o: o[2])

    def next(self, limit: int | None = None) -> tuple[int, int]:
        """The next (block size, steps): block size in [1, min(max, limit)], or 0 (steps 0) with allow_plain."""
        top = self.max_block_size if limit is None else max(1, min(self.max_block_size, limit))
        if self._rng.random() < self.explore:
            b = self._rng.randint(1, top)
            return b, self._rng.choice([t for t in self.step_options if t <= b])
        b, t = self.best()
        if b == 0:
            return 0, 0
        if self.calibration is not None and self._verified:  # draft a little more than was recently worth verifying
            b = max(b, 2 * self._verified[-1] if self._hit_cap else max(self._verified) + 1)
        return min(b, top), min(t, min(b, top))

    def calibration_factor(self) -> float:
        """k: how many times as often as the engine's calibration predicts this sequence's drafted tokens are
        accepted (decayed sums over the tokens tried, `prior_strength` tokens' worth of k = 1 as prior)."""
        expected, accepted = self._seq_cal
        return (accepted + self.prior_strength) / (expected + self.prior_strength)

    def _alpha(self, conf: float, k: float) -> float:
        return min(0.999, k * self.calibration.alpha(conf))

    def trim(self, conf: list[float], parents: list[int] | None = None) -> int:
        """How many nodes of a best-first draft tree to verify (the first N; any prefix is a tree; a chain is the
        tree whose parents are i - 1, the default), given the drafter's probability of each node's token at its
        position and each node's parent row: the N in [1, size] that maximises E[tau | N] - rate * v(N), where a
        node is accepted with the product of its path's calibrated a(c), so E[tau | N] = 1 + the sum of that over
        the first N nodes, `rate` is the tokens per second the sequence expects (its best option's), and v(N) the
        verify time of N tokens (rows cost the same whether they form a chain or a tree; the draft's own seconds
        are spent whatever N is)."""
        if self.calibration is None or not conf:
            return len(conf)
        parents = list(range(len(conf))) if parents is None else parents
        rate, k = self.best_option()[2], self.calibration_factor()
        best, best_gain, tau = 1, float("-inf"), 1.0
        reach = [1.0]  # per row: probability that the verifier's tokens follow the path to it
        depth = [0]
        for n, (c, p) in enumerate(zip(conf, parents), start=1):
            reach.append(reach[p] * self._alpha(c, k))
            depth.append(depth[p] + 1)
            tau += reach[-1]
            gain = tau - rate * self.costs.verify_share(n)
            if gain > best_gain:
                best, best_gain = n, gain
        deepest = max(depth[1 : best + 1])
        self._verified = (self._verified + [deepest])[-self.recent:]
        self._hit_cap = deepest == max(depth)
        return best

    def lookup_taus(self, match: int) -> list[float]:
        """E[tau | L] for L = 0..max_lookup tokens copied by prompt lookup after a match of `match` tokens."""
        priors = None if self.shared_lookup is None else self.shared_lookup.means(match)
        taus, run = [1.0], 1.0
        for alpha in self._lookup.means(match, priors):
            run *= alpha
            taus.append(taus[-1] + run)
        return taus

    def lookup(self, size: int, match: int) -> int:
        """How many of `size` tokens copied by prompt lookup (after the context's last `match` tokens recurred)
        to verify: the L with the best expected tokens per second, or 0 (draft as usual) when the best
        drafter option is expected to beat it."""
        size = min(size, self.max_lookup)
        if size <= 0:
            return 0
        u = self._rng.random()
        if u < self.explore:  # keep measuring both sources
            return size if u < self.explore / 2 else 0
        taus = self.lookup_taus(match)
        best, best_rate = 0, self.best_option()[2]
        for length in range(1, size + 1):
            rate = taus[length] / self.costs.verify_share(length)
            if rate > best_rate:
                best, best_rate = length, rate
        return best

    def observe_lookup(self, size: int, match: int, accepted: int, verify_s: float | None) -> None:
        """Feedback after a prompt-lookup round: copied tokens verified, match length, accepted, verify time (None:
        the pass was shared, and the scheduler records its timings)."""
        if verify_s is not None:
            self.costs.observe(size, 0, 0.0, verify_s, drafted=0)
        if size <= 0:
            return
        self._lookup.observe(size, match, accepted)
        if self.shared_lookup is not None:
            self.shared_lookup.observe(size, match, accepted)

    def observe(self, block_size: int, steps: int, accepted: int, draft_s: float | None, verify_s: float | None,
                drafted: int | None = None, conf: list[float] | None = None,
                tree: tuple[list[int], list[int]] | None = None) -> None:
        """Feedback after a round: block size verified (a tree's depth), steps, accepted count, timings (None: the
        pass was shared with other sequences, and the scheduler records its timings), and (trimmed rounds) the
        tokens drafted and the verified tokens' confidences; `tree`: (parents, accepted path rows) of a draft
        tree (a chain's parents are i - 1), whose verify time counts against its number of tokens."""
        if draft_s is not None and verify_s is not None:
            self.costs.observe(len(tree[0]) if tree else block_size, steps, draft_s, verify_s, drafted)
        if block_size <= 0:
            if self.shared is not None:  # a plain round ages the sequence's own counts towards the engine's
                self._acc.age(math.sqrt(self._acc.decay))
            return
        if self.calibration is not None and conf:
            tried = Calibration.tried(conf if tree else conf[:block_size], accepted, tree)
            for i in range(2):
                self._seq_cal[i] *= self.decay
            self._seq_cal[0] += sum(self.calibration.alpha(c) for c, _ in tried)  # before the engine learns
            self._seq_cal[1] += sum(ok for _, ok in tried)
            self.calibration.count(tried)
        gain = self.step_gain(steps) if steps > 1 else None
        self._acc.observe(block_size, 1, accepted, shift=gain)  # the text's acceptance, on the one-step scale
        self._by_steps.observe(block_size, steps, accepted)

    def __call__(self, ctx) -> tuple[int, int]:
        return self.next()
