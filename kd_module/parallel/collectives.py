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


# ---------------------------------------------------------------------- a lost peer
PEER_LOST_SIGNS = (
    "connection closed by peer",  # gloo: the peer's process is gone (its socket closed)
    "connection reset by peer",
    "application timeout caused pair closure",  # gloo: the peer stopped answering
    "timed out waiting",
    "watchdog caught collective operation timeout",  # NCCL
    "nccl communicator was aborted",
    "broken pipe",
)
"""Lower-case fragments of the errors torch.distributed raises when a peer rank disappears."""


class PeerLostError(RuntimeError):
    """A collective failed because another rank (its process, or its whole node) is gone."""


def is_peer_lost(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a collective losing its peer."""
    import torch.distributed as dist

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, dist.DistBackendError | dist.DistNetworkError):
            return True
        text = str(current).lower()
        if isinstance(current, RuntimeError) and any(sign in text for sign in PEER_LOST_SIGNS):
            return True
        current = current.__cause__ or current.__context__
    return False


def peer_lost_error(
    error: BaseException, timeout_minutes: float, resume_from: str
) -> PeerLostError:
    """The error a surviving rank raises instead of ``error`` when a peer is gone.

    Args:
        error: what the collective raised.
        timeout_minutes: the process group's timeout (``MegatronStrategy(timeout_minutes=...)``):
            the longest a rank waits for a peer that stopped answering without closing its
            connections.
        resume_from: where a rerun with ``resume`` continues (the last complete checkpoint),
            in words.
    """
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return PeerLostError(
        f"rank {rank()} of {world_size()}: a peer rank is gone (its process or its node died, or "
        f"it did not answer within timeout_minutes={timeout_minutes}); this job cannot go on. "
        f"Rerun the same command with resume to continue from {resume_from}. "
        f"The collective said: {first_line}"
    )
