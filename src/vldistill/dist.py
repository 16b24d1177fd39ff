"""The one fact about multi-process runs that library code needs: which shard of the batch this process holds."""

from __future__ import annotations

import torch


def process_shard() -> tuple[int, int]:
    """``(rank, world size)`` of this process in a multi-process run, ``(0, 1)`` otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
