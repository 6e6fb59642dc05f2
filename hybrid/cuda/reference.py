"""Torch reference for the page work: write, gather, copy, roll back.

Every CuPy kernel in this package must match these functions (bit for bit for copies).
They run on any device torch runs on, and are the implementation used on CPU.

Layout of one model's KV cache: ``kv [L, 2, num_pages, P, H, D]`` (layer, key/value, page,
offset in page, KV head, head dim). A *slot* is ``page * P + offset``.
"""
from __future__ import annotations

import torch


def slots_at(block_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Slot ids of token positions [T] of a sequence with block_table [N] -> slots [T]."""
    return block_table[positions // page_size] * page_size + positions % page_size


def slots_for(block_table: torch.Tensor, start: int, end: int, page_size: int) -> torch.Tensor:
    """Slot ids of token positions [start, end) of a sequence. block_table [N] -> slots [end - start]."""
    return slots_at(block_table, torch.arange(start, end, device=block_table.device), page_size)


def write_kv(kv: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Write keys/values of T tokens into one layer's pages. kv [L, 2, N, P, H, D]; k, v [T, H, D]; slots [T]."""
    L, _, N, P, H, D = kv.shape
    flat = kv[layer].view(2, N * P, H, D)  # [2, N*P, H, D]
    flat[0].index_copy_(0, slots, k.to(kv.dtype))
    flat[1].index_copy_(0, slots, v.to(kv.dtype))


def write_kv_all_layers(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Write all layers at once. kv [L, 2, N, P, H, D]; k, v [L, T, H, D]; slots [T]."""
    L, _, N, P, H, D = kv.shape
    flat = kv.view(L, 2, N * P, H, D)
    flat[:, 0].index_copy_(1, slots, k.to(kv.dtype))
    flat[:, 1].index_copy_(1, slots, v.to(kv.dtype))


def gather_kv(kv: torch.Tensor, layer: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous keys/values of the first `length` positions of a sequence -> k, v [length, H, D]."""
    L, _, N, P, H, D = kv.shape
    n_pages = -(-length // P)
    pages = kv[layer][:, block_table[:n_pages]]  # [2, n_pages, P, H, D]
    pages = pages.reshape(2, n_pages * P, H, D)[:, :length]
    return pages[0], pages[1]


def gather_slots(kv: torch.Tensor, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values of token slots [S] of one layer, in order (any sequences' slots) -> k, v [S, H, D]."""
    L, _, N, P, H, D = kv.shape
    flat = kv[layer].view(2, N * P, H * D)  # [2, N*P, H*D]: one row per slot
    return (flat[0].index_select(0, slots).view(-1, H, D), flat[1].index_select(0, slots).view(-1, H, D))


def copy_pages(kv: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole pages src[i] -> dst[i] for every layer (forking a sequence). kv [L, 2, N, P, H, D]; src, dst [M]."""
    kv[:, :, dst] = kv[:, :, src]


def copy_slots(kv: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy single token slots src[i] -> dst[i] for every layer (a draft tree's accepted path moving to the
    committed positions). kv [L, 2, N, P, H, D]; src, dst [M]; sources are read before any is written."""
    L, _, N, P, H, D = kv.shape
    flat = kv.view(L, 2, N * P, H, D)
    flat[:, :, dst] = flat[:, :, src]


def rollback_block_table(block_table: list[int], n: int, page_size: int) -> tuple[list[int], list[int]]:
    """Truncate a block table to cover n tokens -> (kept pages, freed pages)."""
    keep = -(-n // page_size)
    return block_table[:keep], block_table[keep:]
