"""Helpers for tests and benchmarks: run a function on N gloo ranks, and layout-free weights.

``run_distributed(fn, nprocs)`` launches ``fn`` (a module-level function) on ``nprocs`` ranks under
torchrun, returns each rank's return value, fails with the ranks' output when a rank fails, and
kills the whole process group after ``timeout`` seconds so that a deadlock fails a test instead of
hanging CI.

``init_weights_by_global_key(model, seed)`` gives a megatron model the same weights at any
TP/PP layout: every tensor is drawn whole from a generator seeded by its global checkpoint key,
then the local shard is cut out using megatron's own sharding metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd_module.parallel.collectives import free_port

_REPO_ROOT = Path(__file__).resolve().parent.parent


class DistributedRunError(AssertionError):
    """A multi-rank run failed or timed out; the message carries the ranks' output."""


def _target_of(fn: Callable[..., Any] | str) -> str:
    if isinstance(fn, str):
        return fn
    if "<locals>" in fn.__qualname__ or fn.__module__ == "__main__":
        raise ValueError(
            f"run_distributed: {fn.__qualname__} must be a module-level function of an importable "
            "module (ranks import it by name)"
        )
    return f"{fn.__module__}:{fn.__qualname__}"


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def run_distributed(
    fn: Callable[..., Any] | str,
    nprocs: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``nprocs`` gloo ranks under torchrun.

    Args:
        fn: a module-level function (or ``"module:function"``); it may call
            :func:`kd_module.parallel.runtime.initialize_distributed` itself.
        nprocs: number of ranks.
        *args: positional arguments, pickled to every rank.
        timeout: seconds before the whole process group is killed and the run fails.
        env: extra environment variables for the ranks.
        **kwargs: keyword arguments, pickled to every rank.

    Returns:
        The return values, indexed by global rank.

    Raises:
        DistributedRunError: a rank failed, or the run did not finish within ``timeout``.
    """
    target = _target_of(fn)
    with tempfile.TemporaryDirectory(prefix="kd_ranks_") as tmp:
        work = Path(tmp)
        (work / "call.pkl").write_bytes(pickle.dumps((args, kwargs)))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nprocs}",
            "--nnodes=1",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "--max_restarts=0",
            "-m",
            "tests.helpers",
            target,
            str(work),
        ]
        run_env = dict(os.environ)
        run_env.setdefault("OMP_NUM_THREADS", "1")
        run_env["PYTHONPATH"] = os.pathsep.join(
            [str(_REPO_ROOT), os.getcwd(), run_env.get("PYTHONPATH", "")]
        )
        run_env.update(env or {})
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=run_env,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            raise DistributedRunError(
                f"{target} on {nprocs} ranks did not finish within {timeout:.0f} s "
                f"(process group killed). Output:\n{_tail(output)}"
            ) from None
        errors = sorted(work.glob("rank*.err"))
        if process.returncode != 0 or errors:
            details = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in errors)
            raise DistributedRunError(
                f"{target} on {nprocs} ranks failed (exit {process.returncode}).\n"
                f"{details}\nOutput:\n{_tail(output)}"
            )
        results = []
        for rank in range(nprocs):
            path = work / f"rank{rank}.pkl"
            if not path.exists():
                raise DistributedRunError(f"rank {rank} returned nothing. Output:\n{_tail(output)}")
            results.append(pickle.loads(path.read_bytes()))
        return results


def _rank_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="one rank of tests.helpers.run_distributed")
    parser.add_argument("target")
    parser.add_argument("workdir")
    options = parser.parse_args(argv)
    work = Path(options.workdir)
    rank = int(os.environ.get("RANK", "0"))
    module_name, _, qualname = options.target.partition(":")
    try:
        fn: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        args, kwargs = pickle.loads((work / "call.pkl").read_bytes())
        result = fn(*args, **kwargs)
        (work / f"rank{rank}.pkl").write_bytes(pickle.dumps(_to_portable(result)))
    except BaseException:
        (work / f"rank{rank}.err").write_text(traceback.format_exc())
        return 1
    finally:
        _teardown()
    return 0


def _teardown() -> None:
    try:
        from kd_module.parallel import runtime

        if "megatron.core" in sys.modules:
            runtime.destroy_distributed()
    except Exception:  # best effort: the process is about to exit anyway
        pass


def _to_portable(value: Any) -> Any:
    """Detach tensors so results pickle without autograd graphs."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_portable(v) for v in value)
    return value


def _key_seed(key: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_weights_by_global_key(model: Any, seed: int = 0, std: float = 0.02) -> None:
    """Fill every parameter of a megatron model so that all layouts hold the same global weights.

    Each checkpoint key's full tensor is drawn from ``N(0, std)`` (norm weights: ``1 + N(0, std)``)
    with a generator seeded by the key, and the rank's shard is cut out by the sharded tensor's
    global offset. Uses ``model.sharded_state_dict()``, so it covers exactly what megatron's
    distributed checkpoints cover.
    """
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    sharded = model.sharded_state_dict()
    items: list[Any] = []

    def collect(value: Any) -> None:
        if isinstance(value, ShardedTensor):
            items.append(value)
        elif isinstance(value, ShardedTensorFactory):
            collect(value.build())
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v)

    collect(sharded)
    with torch.no_grad():
        for sh in items:
            if sh.data is None or sh.data.numel() == 0:
                continue
            # Drawn on the CPU whatever the default device (Lightning builds models under a
            # torch.device("cuda") context), so every device gets the same weights.
            generator = torch.Generator(device="cpu").manual_seed(_key_seed(sh.key, seed))
            full = torch.randn(
                sh.global_shape, generator=generator, dtype=torch.float32, device="cpu"
            )
            full *= std
            if "layernorm" in sh.key or "norm.weight" in sh.key:
                full += 1.0
            index = tuple(
                slice(offset, offset + size)
                for offset, size in zip(sh.global_offset, _full_local_shape(sh), strict=True)
            )
            local = full[index]
            sh.data.copy_(local.reshape(sh.data.shape).to(sh.data.dtype))


def _sharded_tensors(model: Any) -> dict[str, Any]:
    """Local state-dict name -> megatron ``ShardedTensor`` for every plain sharded tensor."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {
        name: sh
        for name, sh in model.sharded_state_dict().items()
        if isinstance(sh, ShardedTensor) and sh.data is not None
    }


def global_shards(model: Any, which: str = "param") -> dict[str, list[Any]]:
    """This rank's pieces of every parameter (``which="param"``) or gradient (``"grad"``).

    Returns a mapping from global checkpoint key to ``[global_shape, [(global_offset, local_shape,
    tensor)]]`` that :func:`assemble_global` stitches together across ranks.
    """
    params = dict(model.named_parameters())
    out: dict[str, list[Any]] = {}
    for name, sh in _sharded_tensors(model).items():
        if name not in params:
            continue
        tensor = params[name] if which == "param" else params[name].grad
        if tensor is None:
            continue
        entry = out.setdefault(sh.key, [tuple(sh.global_shape), []])
        entry[1].append(
            (tuple(sh.global_offset), _full_local_shape(sh), tensor.detach().cpu().clone())
        )
    return out


def assemble_global(per_rank: list[dict[str, list[Any]]]) -> dict[str, Any]:
    """Full tensors from the :func:`global_shards` of every rank (replicas overwrite each other)."""
    import torch

    full: dict[str, Any] = {}
    for shards in per_rank:
        for key, (global_shape, pieces) in shards.items():
            target = full.setdefault(key, torch.zeros(global_shape, device="cpu"))
            for offset, local_shape, tensor in pieces:
                index = tuple(slice(o, o + n) for o, n in zip(offset, local_shape, strict=True))
                target[index] = tensor.reshape(local_shape)
    return full


def _full_local_shape(sh: Any) -> tuple[int, ...]:
    prepended = sh.prepend_axis_num
    return tuple([1] * prepended) + tuple(sh.local_shape)


def largest_new_allocation(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn``; return its result and the bytes of the largest tensor storage it created.

    Every aten op is seen through a ``TorchDispatchMode``; an output whose storage is not one of
    the op's inputs' is a new allocation (views and in-place results are not). Lets a CPU test
    check that code works in bounded chunks instead of copying a whole tensor, which process
    memory figures are too coarse to show.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def storages(tree: Any) -> set[int]:
        return {
            leaf.untyped_storage().data_ptr()
            for leaf in tree_leaves(tree)
            if isinstance(leaf, torch.Tensor)
        }

    class LargestAllocation(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            inputs = storages((args, kwargs))
            for leaf in tree_leaves(out):
                if (
                    isinstance(leaf, torch.Tensor)
                    and leaf.untyped_storage().data_ptr() not in inputs
                ):
                    self.largest = max(self.largest, leaf.untyped_storage().nbytes())
            return out

    with LargestAllocation() as mode:
        result = fn()
    return result, mode.largest


def gpu_sleep(milliseconds: float) -> None:
    """Queue about ``milliseconds`` of work on the current CUDA stream, without waiting for it.

    A spinning kernel (``torch.cuda._sleep``) calibrated against CUDA events: what GPU tests use
    to check that a measurement waits for asynchronous device work.
    """
    import torch

    # An idle GPU runs at a low clock and speeds up under load (an H200 went from 345 to 1980
    # MHz): a calibration on the idle clock made a 200 ms request spin for 90 ms. So spin once to
    # raise the clock, calibrate three times and keep the fastest rate (spin at least as long).
    calibration = 20_000_000
    torch.cuda._sleep(4 * calibration)
    fastest_ms = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(calibration)
        end.record()
        end.synchronize()
        fastest_ms = min(fastest_ms, start.elapsed_time(end))
    torch.cuda._sleep(int(calibration * milliseconds / fastest_ms))


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))


def save_hf_tokenizer(directory: str | os.PathLike[str], texts: list[str], vocab_size: int) -> int:
    """Train a tiny byte-level BPE on ``texts`` and save it with transformers; its size.

    The byte alphabet is always in it, so any text encodes; merges fill it up to
    ``vocab_size`` as far as ``texts`` allow.
    """
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eod>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eod>")
    tokenizer.save_pretrained(directory)
    return len(tokenizer)
