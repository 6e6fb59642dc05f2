"""One pool of KV pages shared by the verifier and the drafter.

A page holds P consecutive token positions of keys/values for every layer of every model
registered with the pool. A sequence may be created with a promise of pages (its worst case):
they stay held back for it while it grows into them, so a sequence admitted with its worst case
never runs out of pages halfway, whatever the other sequences do. A sequence owns one block table (its list of page ids); the same
page id holds the same positions for the verifier's layers and the drafter's layers, so a
roll back frees a page for both models at once.

Each model registers a cache ``kv [L, 2, num_pages, P, H, D]`` and sees a sequence's keys/values through one
``KVView`` (``pool.view(seq, model)``): write and fetch, trim to n (returning how many it removed), move.
Nothing else writes a model's length; a roll back of the sequence (``pool.rollback``) trims every view and
frees the pages past it. The page work itself
(write by slot mapping, gather, copy, block-table roll back) lives in ``hybrid.cuda``:
the torch reference everywhere, CuPy kernels on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybrid.cuda import ops_for
from hybrid.cuda import reference as ref
from hybrid.errors import PagesExhausted


@dataclass
class Sequence:
    """A sequence's block table and how many positions each model has written."""

    seq_id: int
    block_table: list[int] = field(default_factory=list)
    lengths: dict[str, int] = field(default_factory=dict)
    promised: int = 0  # pages held back for this sequence at creation (its worst case), taken as it grows
    pool: "PagePool | None" = field(default=None, repr=False, compare=False)  # the pool its pages are in
    _table_tensor: torch.Tensor | None = None

    @property
    def outstanding(self) -> int:
        """Promised pages the sequence has not taken yet: no other sequence may take them."""
        return max(0, self.promised - len(self.block_table))

    @property
    def length(self) -> int:
        """Positions held by the sequence: the furthest any model has written."""
        return max(self.lengths.values(), default=0)


class KVView:
    """One model's keys/values of one sequence: what that model reads and writes, and all it may change."""

    def __init__(self, pool: "PagePool", seq: Sequence, model: str):
        self.pool, self.seq, self.model = pool, seq, model

    @property
    def length(self) -> int:
        """Positions [0, length) hold this model's keys/values."""
        return self.seq.lengths[self.model]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys/values k, v [T, H, D] of positions [start, start + T) of one layer (pages reserved by `extend`)."""
        self.pool.write(self.model, layer, self.seq, start, k, v)

    def fetch(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of positions [0, length) of one layer: k, v [length, H, D]."""
        return self.pool.gather(self.model, layer, self.seq, length)

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Slot ids of positions [start, end) (pages reserved by `extend`): [end - start]."""
        return ref.slots_for(self.pool.block_table(self.seq), start, end, self.pool.page_size)

    def extend(self, length: int) -> None:
        """Make room for positions [0, length) (taking pages from the pool) and record them as this model's."""
        self.pool.reserve(self.seq, length)
        self.pool.advance(self.model, self.seq, length)

    def trim(self, n: int) -> int:
        """Drop this model's positions past n (rows a pass wrote and does not keep); returns how many. Pages stay
        with the sequence: `PagePool.rollback` frees them for every model at once."""
        removed = max(0, self.length - n)
        self.seq.lengths[self.model] -= removed
        return removed

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy positions src to dst (every layer), in order: a draft tree's accepted path to the committed positions."""
        self.pool.move(self.model, self.seq, src, dst)


class PackedKV:
    """One model's keys/values of several sequences for one packed pass: sequence i's rows (T_i of them, packed
    one after another) go to its positions [start_i, start_i + T_i), and attention reads every sequence's
    positions [0, start_i + T_i), concatenated. The slots are worked out once per pass, so each layer is one
    write and one gather whatever the number of sequences."""

    def __init__(self, parts: list[tuple[KVView, int, int]]):
        view = parts[0][0]
        self.pool, self.model = view.pool, view.model
        self.write_slots = torch.cat([v.slots(start, start + T) for v, start, T in parts])  # [sum T]
        self.read_slots = torch.cat([v.slots(0, start + T) for v, start, T in parts])  # [sum (start + T)]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys/values of every sequence's rows, packed: k, v [sum T, H, D]."""
        kv = self.pool.kv[self.model]
        ops_for(kv).write_kv(kv, layer, k, v, self.write_slots)

    def fetch(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's keys/values through its rows, packed: k, v [sum (start + T), H, D]."""
        return ref.gather_slots(self.pool.kv[self.model], layer, self.read_slots)


class PagePool:
    """A bounded pool of KV pages for one or more models, with per-sequence block tables."""

    def __init__(self, num_pages: int, page_size: int = 16, device: str | torch.device = "cpu"):
        if num_pages < 1 or page_size < 1:
            raise ValueError("num_pages and page_size must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.device = torch.device(device)
        self.kv: dict[str, torch.Tensor] = {}  # model -> [L, 2, N, P, H, D]
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # stack; pops low ids first
        self._seqs: dict[int, Sequence] = {}
        self._next_id = 0

    # -- models ---------------------------------------------------------------------------
    def register(self, model: str, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """Allocate the cache of one model: kv [L, 2, num_pages, P, H, D]. Registering a model again with the
        same shape and dtype returns its cache (several engines over one verifier may share a pool)."""
        if model in self.kv:
            kv = self.kv[model]
            if kv.shape[0] == num_layers and kv.shape[-2:] == (num_kv_heads, head_dim) and kv.dtype == dtype:
                return kv
            raise ValueError(f"model {model!r} is already registered with this pool with another shape")
        self.kv[model] = torch.zeros(
            num_layers, 2, self.num_pages, self.page_size, num_kv_heads, head_dim, dtype=dtype, device=self.device
        )
        return self.kv[model]

    # -- sequences ------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        """Pages in no block table (some may be promised to running sequences)."""
        return len(self._free)

    @property
    def available_pages(self) -> int:
        """Pages a new sequence may be promised: free and not promised to another."""
        return len(self._free) - sum(s.outstanding for s in self._seqs.values())

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def new_sequence(self, max_tokens: int = 0) -> Sequence:
        """A new sequence; with max_tokens, the pages for that many positions are promised to it now
        (PagesExhausted if fewer are available), so it can always grow to max_tokens."""
        need = self.pages_for(max_tokens)
        if need > self.available_pages:
            raise PagesExhausted(
                f"KV pages exhausted: the request needs {need} pages of {self.page_size} tokens, "
                f"{self.available_pages} of {self.num_pages} are available; raise --num-pages or shorten the request"
            )
        seq = Sequence(self._next_id, lengths={m: 0 for m in self.kv}, promised=need, pool=self)
        self._seqs[seq.seq_id] = seq
        self._next_id += 1
        return seq

    def sequences(self) -> list[Sequence]:
        return list(self._seqs.values())

    def view(self, seq: Sequence, model: str) -> KVView:
        """`model`'s keys/values of `seq`."""
        if model not in self.kv:
            raise KeyError(f"model {model!r} is not registered with this pool")
        seq.lengths.setdefault(model, 0)
        return KVView(self, seq, model)

    def check_fits(self, seq: Sequence, n_tokens: int) -> int:
        """Pages seq still needs to cover n_tokens; raises PagesExhausted if fewer are free that no other
        sequence was promised."""
        need = self.pages_for(n_tokens) - len(seq.block_table)
        usable = len(self._free) - sum(s.outstanding for s in self._seqs.values() if s is not seq)
        if need > usable:
            raise PagesExhausted(
                f"KV pages exhausted: sequence needs {need} more pages of {self.page_size} tokens, "
                f"{usable} of {self.num_pages} are free; raise --num-pages or shorten the request"
            )
        return need

    def reserve(self, seq: Sequence, n_tokens: int) -> None:
        """Make the block table cover n_tokens positions, taking pages from the pool."""
        need = self.check_fits(seq, n_tokens)
        if need <= 0:
            return
        seq.block_table.extend(self._free.pop() for _ in range(need))
        seq._table_tensor = None

    def block_table(self, seq: Sequence) -> torch.Tensor:
        """The block table as a tensor on the pool's device: [n_pages]."""
        if seq._table_tensor is None:
            seq._table_tensor = torch.tensor(seq.block_table, dtype=torch.long, device=self.device)
        return seq._table_tensor

    def rollback(self, seq: Sequence, n: int) -> int:
        """Truncate the sequence to n tokens for every model, freeing pages past it.

        Returns the number of token positions removed (0 only when the sequence already held n).
        """
        if n < 0 or n > seq.length:
            raise ValueError(f"cannot roll back a sequence of {seq.length} tokens to {n}")
        removed = seq.length - n
        for model in seq.lengths:
            seq.lengths[model] = min(seq.lengths[model], n)
        kept, freed = ref.rollback_block_table(seq.block_table, n, self.page_size)
        if freed:
            seq.block_table = kept
            seq._table_tensor = None
            self._free.extend(reversed(freed))
        return removed

    def free(self, seq: Sequence) -> None:
        """Return all pages of a finished sequence to the pool."""
        if self._seqs.pop(seq.seq_id, None) is None:
            return
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
        seq._table_tensor = None
        seq.lengths = {m: 0 for m in seq.lengths}
        seq.promised = 0

    def fork(self, seq: Sequence) -> Sequence:
        """A new sequence with a copy of seq's pages (for every model)."""
        child = self.new_sequence()
        self.reserve(child, len(seq.block_table) * self.page_size)
        src = self.block_table(seq)
        dst = self.block_table(child)
        for kv in self.kv.values():
            ops_for(kv).copy_pages(kv, src, dst)
        child.lengths = dict(seq.lengths)
        return child

    # -- keys/values ----------------------------------------------------------------------
    def write(self, model: str, layer: int, seq: Sequence, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write keys/values k, v [T, H, D] of positions [start, start + T) for one layer.

        Pages must already be reserved; the model's length is advanced by ``advance``.
        """
        T = k.shape[0]
        slots = ref.slots_for(self.block_table(seq), start, start + T, self.page_size)  # [T]
        kv = self.kv[model]
        ops_for(kv).write_kv(kv, layer, k, v, slots)

    def gather(self, model: str, layer: int, seq: Sequence, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of positions [0, length) of one layer: k, v [length, H, D]."""
        kv = self.kv[model]
        return ops_for(kv).gather_kv(kv, layer, self.block_table(seq), length)

    def move(self, model: str, seq: Sequence, src: list[int], dst: list[int]) -> None:
        """Copy keys/values of positions src to positions dst (every layer of `model`), in order: after a draft
        tree's pass, the accepted nodes' entries move to the positions of the committed tokens."""
        if not src:
            return
        table = self.block_table(seq)
        slots = lambda pos: ref.slots_at(table, torch.tensor(pos, device=table.device), self.page_size)  # noqa: E731
        ref.copy_slots(self.kv[model], slots(src), slots(dst))

    def advance(self, model: str, seq: Sequence, length: int) -> None:
        """Record that `model` has written positions [0, length) of the sequence."""
        if length > len(seq.block_table) * self.page_size:
            raise ValueError("advance past the reserved pages")
        seq.lengths[model] = length
