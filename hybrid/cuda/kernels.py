"""CuPy kernels for the page work; each must match ``hybrid.cuda.reference`` bit for bit.

Tensors cross between torch and CuPy without copies (``cupy.from_dlpack`` on torch's DLPack
capsule). Values are moved as raw bits (16- or 32-bit words), so the kernels serve bf16, fp16
and fp32 caches alike and copies are exact.

Layout: ``kv [L, 2, N, P, H, D]`` contiguous; a slot is ``page * P + offset``.
"""
from __future__ import annotations

import functools

import torch

_SOURCE = r"""
extern "C" {

// Write keys/values of T tokens for all L layers in one launch.
// kv [L, 2, N*P, HD] words; k, v [L, T, HD]; slots [T]. One thread per (layer, token, word).
__global__ void write_kv_all_layers(WORD* kv, const WORD* k, const WORD* v, const long long* slots,
                                    long long L, long long T, long long NP, long long HD) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long total = L * T * HD;
  if (i >= total) return;
  long long w = i % HD;
  long long t = (i / HD) % T;
  long long l = i / (HD * T);
  long long slot = slots[t];
  long long base = (l * 2) * NP * HD + slot * HD + w;
  kv[base] = k[i];
  kv[base + NP * HD] = v[i];
}

// Gather the first `length` positions of one layer through a block table.
// kv [L, 2, N*P, HD]; table [n_pages]; out_k, out_v [length, HD]. One thread per (position, word).
__global__ void gather_kv(const WORD* kv, const long long* table, WORD* out_k, WORD* out_v,
                          long long layer, long long length, long long P, long long NP, long long HD) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= length * HD) return;
  long long w = i % HD;
  long long pos = i / HD;
  long long slot = table[pos / P] * P + pos % P;
  long long base = (layer * 2) * NP * HD + slot * HD + w;
  out_k[i] = kv[base];
  out_v[i] = kv[base + NP * HD];
}

// Copy whole pages src[m] -> dst[m] for every layer and both of K/V.
// kv [L*2, N, PHD]; one thread per (layer-kv, pair, word).
__global__ void copy_pages(WORD* kv, const long long* src, const long long* dst,
                           long long L2, long long M, long long N, long long PHD) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= L2 * M * PHD) return;
  long long w = i % PHD;
  long long m = (i / PHD) % M;
  long long lk = i / (PHD * M);
  kv[(lk * N + dst[m]) * PHD + w] = kv[(lk * N + src[m]) * PHD + w];
}

// Roll back a device block table: entries at and past `keep` are returned in `freed` and set to -1.
__global__ void rollback_table(long long* table, long long* freed, long long n_pages, long long keep) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n_pages - keep || keep >= n_pages) return;
  freed[i] = table[keep + i];
  table[keep + i] = -1;
}

}
"""

_THREADS = 256


def available() -> bool:
    """CuPy importable and a CUDA device present."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _module(word: str):
    import cupy

    return cupy.RawModule(code=_SOURCE.replace("WORD", word), options=("-std=c++14",))


def _word(t: torch.Tensor) -> tuple[str, torch.dtype]:
    size = t.element_size()
    if size == 2:
        return "unsigned short", torch.int16
    if size == 4:
        return "unsigned int", torch.int32
    raise TypeError(f"page kernels move 16- or 32-bit values, got {t.dtype}")


def _cp(t: torch.Tensor):
    import cupy

    return cupy.from_dlpack(t)


def _launch(kernel, n: int, args) -> None:
    if n <= 0:
        return
    stream = torch.cuda.current_stream()
    import cupy

    with cupy.cuda.ExternalStream(stream.cuda_stream):
        kernel(((n + _THREADS - 1) // _THREADS,), (_THREADS,), args)


def write_kv_all_layers(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """kv [L, 2, N, P, H, D]; k, v [L, T, H, D]; slots [T] (as the reference)."""
    import numpy as np

    L, _, N, P, H, D = kv.shape
    T = k.shape[1]
    word, view = _word(kv)
    kw = kv.view(view)
    kk = k.to(kv.dtype).contiguous().view(view)
    vv = v.to(kv.dtype).contiguous().view(view)
    fn = _module(word).get_function("write_kv_all_layers")
    _launch(fn, L * T * H * D, (_cp(kw), _cp(kk), _cp(vv), _cp(slots.to(torch.int64).contiguous()),
                                np.int64(L), np.int64(T), np.int64(N * P), np.int64(H * D)))


def write_kv(kv: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """One layer: kv [L, 2, N, P, H, D]; k, v [T, H, D]; slots [T]."""
    write_kv_all_layers(kv[layer : layer + 1], k.unsqueeze(0), v.unsqueeze(0), slots)


def gather_kv(kv: torch.Tensor, layer: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [length, H, D] of one layer through the block table."""
    import numpy as np

    L, _, N, P, H, D = kv.shape
    word, view = _word(kv)
    out_k = torch.empty(length, H, D, dtype=kv.dtype, device=kv.device)
    out_v = torch.empty_like(out_k)
    fn = _module(word).get_function("gather_kv")
    _launch(fn, length * H * D, (_cp(kv.view(view)), _cp(block_table.to(torch.int64).contiguous()),
                                 _cp(out_k.view(view)), _cp(out_v.view(view)), np.int64(layer), np.int64(length),
                                 np.int64(P), np.int64(N * P), np.int64(H * D)))
    return out_k, out_v


def copy_pages(kv: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    import numpy as np

    L, _, N, P, H, D = kv.shape
    word, view = _word(kv)
    M = src.numel()
    fn = _module(word).get_function("copy_pages")
    _launch(fn, 2 * L * M * P * H * D, (_cp(kv.view(view)), _cp(src.to(torch.int64).contiguous()),
                                        _cp(dst.to(torch.int64).contiguous()), np.int64(2 * L), np.int64(M),
                                        np.int64(N), np.int64(P * H * D)))


def rollback_table(table: torch.Tensor, n: int, page_size: int) -> torch.Tensor:
    """Device block table [n_pages] int64: entries past the pages covering n tokens become -1;
    returns the freed page ids [n_pages - keep]."""
    import numpy as np

    keep = -(-n // page_size)
    freed = torch.empty(max(table.numel() - keep, 0), dtype=torch.int64, device=table.device)
    fn = _module("unsigned int").get_function("rollback_table")
    _launch(fn, freed.numel(), (_cp(table), _cp(freed), np.int64(table.numel()), np.int64(keep)))
    return freed
