"""CuPy page kernels against the torch reference (GPU only; skipped with a reason elsewhere)."""
import pytest
import torch

from hybrid.cuda import kernels, reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not kernels.available(), reason="needs a CUDA GPU and CuPy (pip install cupy-cuda12x)"),
]

SHAPES = [  # (layers, pages, page size, kv heads, head dim)
    (2, 9, 16, 2, 64),
    (3, 7, 32, 8, 128),
    (1, 5, 16, 1, 80),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def rand_kv(L, N, P, H, D, dtype):
    return torch.randn(L, 2, N, P, H, D, device="cuda").to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 17, 33])  # odd lengths; a page boundary inside the block
def test_write_kv_all_layers_matches_reference(shape, dtype, T):
    L, N, P, H, D = shape
    table = torch.randperm(N, device="cuda")
    start = P - 3  # the block crosses a page boundary
    T = min(T, N * P - start)
    slots = ref.slots_for(table, start, start + T, P)
    k = torch.randn(L, T, H, D, device="cuda").to(dtype)
    v = torch.randn(L, T, H, D, device="cuda").to(dtype)
    a, b = rand_kv(L, N, P, H, D, dtype), None
    b = a.clone()  # same poison in both
    ref.write_kv_all_layers(a, k, v, slots)
    kernels.write_kv_all_layers(b, k, v, slots)
    torch.cuda.synchronize()
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_matches_reference(shape, dtype):
    L, N, P, H, D = shape
    kv = rand_kv(L, N, P, H, D, dtype)
    table = torch.randperm(N, device="cuda")
    for length in (1, P - 1, P, P + 1, N * P - 5):
        for layer in range(L):
            rk, rv = ref.gather_kv(kv, layer, table, length)
            kk, kv_ = kernels.gather_kv(kv, layer, table, length)
            assert torch.equal(rk, kk) and torch.equal(rv, kv_)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_pages_bit_for_bit(shape, dtype):
    L, N, P, H, D = shape
    a = rand_kv(L, N, P, H, D, dtype)
    b = a.clone()
    perm = torch.randperm(N, device="cuda")
    src, dst = perm[: N // 2], perm[N // 2 : 2 * (N // 2)]
    ref.copy_pages(a, src, dst)
    kernels.copy_pages(b, src, dst)
    torch.cuda.synchronize()
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_rollback_table_matches_reference():
    table = torch.tensor([4, 9, 2, 7, 5], device="cuda")
    for n, P in ((0, 16), (1, 16), (16, 16), (17, 16), (80, 16), (33, 32)):
        t = table.clone()
        freed = kernels.rollback_table(t, n, P)
        kept, freed_ref = ref.rollback_block_table(table.tolist(), n, P)
        assert freed.tolist() == freed_ref
        assert t.tolist() == kept + [-1] * len(freed_ref)
