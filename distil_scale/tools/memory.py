"""Peak live tensor memory of a piece of code, on any device, by watching storages.

On CUDA the allocator's statistics answer this; on a CPU nothing does: RSS only rises and
keeps freed pages, and tracemalloc does not see ATen's allocations. This dispatch mode sees
every tensor an operator returns, counts each new storage's bytes while it lives (a weak
reference tells when it is freed) and keeps the high-water mark. torch has such a tracker
only as a private tool (``torch.distributed._tools``), hence these few lines.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveStorage(TorchDispatchMode):
    """``with LiveStorage() as m: ...``; then ``m.peak`` bytes (storages made inside only)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, size = st.data_ptr(), st.nbytes()
            if size and key not in self._sizes:
                self._sizes[key] = size
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key)
        return out
