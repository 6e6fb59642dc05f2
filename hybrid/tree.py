"""Draft trees: several alternatives per draft position, verified in one forward pass.

A one-pass block drafter gives a distribution per block position, p_d(x) for d = 1..B. A chain
verifies only the argmax of each; a tree also verifies the runners-up. Nodes are scored by the
drafter's probability of their whole path, s(node) = prod_{d <= depth} p_d(token at d), and the
tree holds the ``budget`` best paths (best first, as DDTree and EAGLE-2 build theirs): a child's
score never exceeds its parent's, so every node's parent is already in the tree and comes before it.

Layout: row 0 of a verify pass is the last committed token (the root); node i (1-based row i) holds
``tokens[i-1]``, sits at position ``n - 1 + depth[i-1]`` and attends to the context, its ancestors
and itself (``tree_mask``). The verifier's logits at row r predict the token after row r's path.

Acceptance walks from the root: at row r the verifier's token is its argmax (greedy) or, at temperature
> 0, the inverse-CDF sample of its warped distribution with the uniform of the position it predicts
(hybrid.acceptance.Noise); if a child of r holds that token the walk moves to it, else that token is the
bonus and the walk ends. Every node is a deterministic proposal (q one-hot), so sampling first and
matching afterwards commits exactly what sampling from the verifier alone would: with the same seed,
the same tokens as plain decoding. A chain is the tree whose parents are i - 1 (`chain_parents`).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from hybrid.acceptance import Noise, SamplingParams, sample, warp


@dataclass
class Tree:
    tokens: torch.Tensor  # [N] int64 node tokens, best-first (parents before children)
    parents: torch.Tensor  # [N] int64 parent row of each node (0: the root, i.e. the last committed token)
    depth: torch.Tensor  # [N] int64 1-based draft position of each node
    score: torch.Tensor  # [N] float32 the drafter's probability of the node's whole path
    prob: torch.Tensor  # [N] float32 the drafter's probability of the node's token at its position

    @property
    def size(self) -> int:
        return int(self.tokens.numel())


def build_tree(probs: torch.Tensor, ids: torch.Tensor, budget: int) -> Tree:
    """The `budget` most probable paths through per-position candidates.

    probs [B, k] descending per row: the drafter's top-k probabilities at positions 1..B; ids [B, k]
    their token ids. Returns a Tree of min(budget, nodes available) nodes.
    """
    B, k = probs.shape
    p = probs.float().tolist()
    tok = ids.tolist()
    tokens, parents, depth, score, prob = [], [], [], [], []
    heap = [(-p[0][r], 0, r, 0) for r in range(k)] if B else []  # (-score, depth-1, rank, parent row)
    heapq.heapify(heap)
    while heap and len(tokens) < budget:
        neg, d, r, parent = heapq.heappop(heap)
        tokens.append(tok[d][r])
        parents.append(parent)
        depth.append(d + 1)
        score.append(-neg)
        prob.append(p[d][r])
        row = len(tokens)  # this node's row
        if d + 1 < B:
            for r2 in range(k):
                heapq.heappush(heap, (neg * p[d + 1][r2], d + 1, r2, row))
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)
    as_float = lambda xs: torch.tensor(xs, dtype=torch.float32)
    return Tree(as_long(tokens), as_long(parents), as_long(depth), as_float(score), as_float(prob))


TREE_WIDTH = 8  # candidates per block position a draft tree may choose from


def tree_from_probs(probs: torch.Tensor, budget: int, vocab: torch.Tensor | None = None) -> Tree:
    """The `budget` most probable paths through each position's top TREE_WIDTH candidates of a one-pass drafter's
    distributions probs [B, V'] (vocab [V']: the token id of each column; None: column = token id)."""
    top_p, top_i = probs.topk(min(budget, TREE_WIDTH, probs.shape[-1]), dim=-1)  # [B, k] descending
    if vocab is not None:
        top_i = vocab.to(top_i.device)[top_i]
    return build_tree(top_p.cpu(), top_i.cpu(), budget)


def chain_parents(n: int) -> torch.Tensor:
    """The parents of a chain of n nodes: [0, 1, ..., n-1] -> [n]."""
    return torch.arange(n, dtype=torch.long)


def depths(parents: torch.Tensor) -> torch.Tensor:
    """1-based depth of each node from its parents [N] -> [N]."""
    d = [0]
    for p in parents.tolist():
        d.append(d[p] + 1)
    return torch.tensor(d[1:], dtype=torch.long)


def tree_mask(parents: torch.Tensor) -> torch.Tensor:
    """Which rows of [root, nodes] each row attends to: [N+1, N+1] bool (a row sees its ancestors and itself)."""
    n = parents.numel() + 1
    mask = torch.eye(n, dtype=torch.bool)
    par = [0] + parents.tolist()
    for i in range(1, n):
        mask[i] |= mask[par[i]]
    return mask


@dataclass
class TreeAcceptance:
    path: list[int]  # accepted node rows, root excluded, in order (len = accepted tokens)
    bonus: int  # the verifier's own token after them


def accept_tree(tokens: torch.Tensor, parents: torch.Tensor, logits: torch.Tensor, params: SamplingParams,
                noise: Noise | None, start: int = 0) -> TreeAcceptance:
    """Walk the tree along the verifier's tokens. tokens, parents [N]; logits [N+1, V] per row; row 0 predicts
    sequence position `start` (the first position after the committed tokens), a node at depth d position
    start + d. noise: the request's random numbers (None: greedy)."""
    children: dict[int, dict[int, int]] = {}
    for i, (t, p) in enumerate(zip(tokens.tolist(), parents.tolist()), start=1):
        children.setdefault(p, {}).setdefault(t, i)
    path, row = [], 0
    while True:
        if params.greedy:
            x = int(logits[row].argmax())
        else:
            x = int(sample(warp(logits[row : row + 1], params), [noise.uniform(start + len(path))])[0])
        nxt = children.get(row, {}).get(x)
        if nxt is None:
            return TreeAcceptance(path, x)
        path.append(nxt)
        row = nxt
