"""Page work: CuPy kernels on CUDA tensors, the torch reference everywhere else.

`HYBRID_PAGE_OPS=torch` forces the reference (to compare); `cupy` insists on the kernels.
"""
from __future__ import annotations

import os

from hybrid.cuda import reference


def ops_for(kv):
    """The module (kernels or reference) with write_kv, write_kv_all_layers, gather_kv, copy_pages for kv."""
    choice = os.environ.get("HYBRID_PAGE_OPS", "auto")
    if choice == "torch" or not kv.is_cuda:
        return reference
    from hybrid.cuda import kernels

    if kernels.available():
        return kernels
    if choice == "cupy":
        from hybrid.errors import UserError

        raise UserError("HYBRID_PAGE_OPS=cupy but CuPy is not installed: pip install cupy-cuda12x")
    return reference
