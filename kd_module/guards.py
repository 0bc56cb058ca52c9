"""Reliability guards: non-finite losses and the teacher's integrity.

* :func:`nonfinite_terms` / :func:`skip_optimizer_update` / :class:`NonFiniteLossError`: what
  ``GPTModule.training_step`` does when a loss term is NaN or Inf (``on_nonfinite="skip"``
  skips the update, ``"stop"`` ends the run). The terms it checks are reduced over the global
  batch and identical on every rank, so every rank takes the same decision without a collective.
* :func:`teacher_digests` / :func:`combined_sha256` / :class:`TeacherIntegrityError`: a SHA-256
  of the frozen teacher's weights, taken when the model is built and compared at the end of
  training.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kd_module.parallel.collectives import PeerLostError, all_gather_object

if TYPE_CHECKING:
    import torch

ON_NONFINITE = ("skip", "stop")
"""What a training step does when a loss term is NaN or Inf."""


class NonFiniteLossError(RuntimeError):
    """A loss term was NaN or Inf and ``on_nonfinite="stop"``."""


class TeacherIntegrityError(RuntimeError):
    """The frozen teacher's weights changed during training."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    NonFiniteLossError,
    TeacherIntegrityError,
    PeerLostError,
)
"""Errors that describe a problem with the run's inputs or its outcome, not a bug."""


# ---------------------------------------------------------------------- non-finite losses
def check_on_nonfinite(value: Any) -> list[str]:
    """Problems with an ``on_nonfinite`` argument (empty when it is valid)."""
    if value not in ON_NONFINITE:
        return [f"on_nonfinite={value!r} is not one of {', '.join(map(repr, ON_NONFINITE))}"]
    return []


def nonfinite_terms(values: dict[str, float]) -> list[str]:
    """Names of the loss terms whose value is NaN or +-Inf, in the order given."""
    return [key for key, value in values.items() if not math.isfinite(float(value))]


def nonfinite_message(step: int, values: dict[str, float], action: str) -> str:
    """One line naming the step, the non-finite terms and what was done about it."""
    bad = nonfinite_terms(values)
    named = ", ".join(f"{key}={float(values[key])}" for key in bad)
    return f"non-finite loss at step {step}: {named}; {action}"


@contextlib.contextmanager
def skip_optimizer_update(optimizer: Any) -> Iterator[None]:
    """Within the block, ``optimizer.step()`` counts the step but leaves every parameter alone.

    ``optimizer`` is the :class:`~kd_module.training.optim.MegatronOptimizerAdapter` Lightning
    wraps: its
    ``step`` is shadowed on the instance so that Lightning's step counter (and with it the data
    sampler and ``global_step``) still advances, as a step skipped by megatron's loss scaler
    does. ``last_step`` records ``update_successful=False``.
    """

    def skipped_step(closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        optimizer.last_step = {
            "update_successful": False,
            "grad_norm": None,
            "num_zeros_in_grad": None,
        }
        return loss

    optimizer.step = skipped_step
    try:
        yield
    finally:
        del optimizer.step


# ---------------------------------------------------------------------- teacher integrity
HASH_CHUNK_BYTES = 64 * 1024 * 1024
"""Host buffer for hashing tensors that are not on the CPU: copied this many bytes at a time."""


def tensor_sha256(
    tensor: torch.Tensor,
    chunk_bytes: int = HASH_CHUNK_BYTES,
    host_buffer: torch.Tensor | None = None,
) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes: ``f"{dtype}|{shape}|"`` then the raw bytes.

    A CPU tensor is hashed where it lies (hashlib reads the tensor's memory through the buffer
    protocol, no copy); any other is copied to the host at most ``chunk_bytes`` at a time into
    one reused buffer, so hashing an 8B teacher never holds a host copy of it.

    Args:
        tensor: any dtype, shape and device.
        chunk_bytes: size of the host buffer for a device tensor.
        host_buffer: a 1-D uint8 CPU tensor to use as that buffer (``teacher_digests`` shares
            one across tensors); made here when ``None``.

    Returns:
        64 hex digits.
    """
    import torch

    data = tensor.detach()
    digest = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
    if data.numel():
        raw = data.contiguous().view(-1).view(torch.uint8)
        if raw.device.type == "cpu":
            digest.update(raw.numpy())
        else:
            if host_buffer is None:
                host_buffer = _host_buffer(min(chunk_bytes, raw.numel()), raw.device)
            _update_through_host(digest, raw, host_buffer)
    return digest.hexdigest()


def _host_buffer(size: int, device: torch.device) -> torch.Tensor:
    """A uint8 host buffer for copies from ``device`` (page-locked for CUDA: faster copies)."""
    import torch

    return torch.empty(size, dtype=torch.uint8, pin_memory=device.type == "cuda")


def _update_through_host(digest: Any, raw: torch.Tensor, host_buffer: torch.Tensor) -> None:
    """Feed the bytes of ``raw`` (1-D uint8, any device) to ``digest`` through ``host_buffer``."""
    step = host_buffer.numel()
    for start in range(0, raw.numel(), step):
        part = host_buffer[: min(step, raw.numel() - start)]
        part.copy_(raw[start : start + step])
        digest.update(part.numpy())


def teacher_digests(model: torch.nn.Module, chunk_bytes: int = HASH_CHUNK_BYTES) -> dict[str, str]:
    """SHA-256 of every parameter and floating-point buffer of this rank's model stage, by name.

    Tensors off the CPU share one host buffer of at most ``chunk_bytes``.
    """
    tensors = dict(model.named_parameters())
    for name, buffer in model.named_buffers():
        if buffer is not None and buffer.is_floating_point():
            tensors[name] = buffer
    off_cpu = [tensor for tensor in tensors.values() if tensor.device.type != "cpu"]
    host_buffer = None
    if off_cpu:
        largest = max(tensor.nbytes for tensor in off_cpu)
        host_buffer = _host_buffer(min(chunk_bytes, largest), off_cpu[0].device)
    digests = {
        name: tensor_sha256(tensor, chunk_bytes, host_buffer) for name, tensor in tensors.items()
    }
    return dict(sorted(digests.items()))


def combined_sha256(digests: dict[str, str]) -> str:
    """One SHA-256 over every rank's digests, in rank order; identical on every rank.

    A collective when ``torch.distributed`` is initialized: every rank must call it.
    """
    local = hashlib.sha256("".join(f"{k}={v}\n" for k, v in digests.items()).encode()).hexdigest()
    return hashlib.sha256("".join(all_gather_object(local)).encode()).hexdigest()


def changed_tensors(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Names whose digest differs (or that appeared or vanished), gathered from every rank.

    A collective when ``torch.distributed`` is initialized: every rank must call it.
    """
    local = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    rank_lists = all_gather_object(local)
    return sorted({name for names in rank_lists for name in names})


def check_teacher_integrity(
    model: torch.nn.Module, recorded: dict[str, str], recorded_sha256: str
) -> str:
    """Recompute the teacher's hash; raise :class:`TeacherIntegrityError` if it changed.

    A collective when ``torch.distributed`` is initialized: every rank must call it.

    Returns:
        The (unchanged) combined SHA-256.

    Raises:
        TeacherIntegrityError: naming the hashes and the changed tensors, on every rank.
    """
    now = teacher_digests(model)
    sha256 = combined_sha256(now)
    changed = changed_tensors(recorded, now)
    if sha256 != recorded_sha256 or changed:
        shown = ", ".join(changed[:5])
        if len(changed) > 5:
            shown += f" and {len(changed) - 5} more"
        raise TeacherIntegrityError(
            f"teacher integrity: the frozen teacher's weights changed during training "
            f"(teacher_sha256 {recorded_sha256[:12]}... at build, {sha256[:12]}... at the end); "
            f"changed: {shown or 'none on this rank'}"
        )
    return sha256
