"""The few collectives the library calls outside megatron-core, each a no-op on one rank.

Checkpoints, the teacher cache, the integrity guards and the callbacks synchronize through these,
so a single process (no process group, or a group of one) runs the same code without a
launcher. torch is imported when a collective runs, not when this module is imported.
"""

from __future__ import annotations

import socket
from typing import Any


def world_size() -> int:
    """Ranks of the default process group; 1 when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default process group; 0 when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def barrier() -> None:
    """Wait for every rank (``torch.distributed.barrier``); returns at once on one rank."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``torch.distributed.all_gather_object``).

    Works with gloo and NCCL; on one rank it is ``[value]``.
    """
    size = world_size()
    if size == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * size
    dist.all_gather_object(out, value)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for ``MASTER_PORT`` of a local launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
