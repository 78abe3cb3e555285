"""torch's intra-op thread count, set for a block of work and restored afterwards.

The count is process-wide state: training, verification and benchmarks each choose their
own (one thread is ~2x faster than two on a shared 2-core CPU and fixes the float32
reduction order), and none may leave it changed for the code that runs next.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block (``None``: left alone),
    restored afterwards, also when the block raises."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
