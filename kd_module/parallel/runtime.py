"""Distributed runtime: process groups, megatron parallel state, RNG, and the CPU bridge.

megatron-core 0.16 assumes CUDA in a handful of places. For a run on the CPU this module bridges
exactly those places, and nothing else, so that the real megatron-core runs on CPU with the gloo
backend. Which device a run uses is decided once, by :func:`initialize_distributed` (the
strategy passes Lightning's accelerator; the default is CUDA when it exists), and
:func:`uses_cuda` is the one answer every other module asks. A CPU run on a machine that has a
GPU installs the bridges too; a CUDA run removes them again (notebooks and tests run both in one
process), so a CUDA run always sees megatron exactly as shipped.

The bridge has three parts, each applied only to the megatron modules listed next to it:

1. ``torch.cuda`` as seen from those modules is a small CPU stand-in
   (``current_device()`` is the CPU device, ``synchronize()`` and streams are no-ops). It covers:

   - ``utils.GlobalMemoryBuffer.get_tensor`` (``device=torch.cuda.current_device()``), used by the
     local ``DotProductAttention``;
   - ``pipeline_parallel/p2p_communication.py`` (``torch.cuda.current_device()`` for receive
     buffers, ``torch.cuda.synchronize()`` after batched p2p);
   - ``tensor_parallel/mappings.py`` and ``layers.py`` (gather buffers on the current device);
   - ``models/common/embeddings/rotary_pos_embedding.py`` (``RotaryEmbedding.get_emb`` moves
     ``inv_freq`` to ``torch.cuda.current_device()`` at the first forward: every RoPE model);
   - ``transformer/utils.get_default_causal_mask`` (``torch.ones(sq, sq, device="cuda")`` when
     no attention mask is given);
   - ``distributed/param_and_grad_buffer.py`` and ``distributed_data_parallel.py`` (grad buffers,
     communication streams);
   - ``dist_checkpointing/strategies/filesystem_async.py``, ``state_dict_saver.py`` and
     ``async_utils.py`` (``torch.cuda.synchronize()`` and result tensors on the current device
     while saving distributed checkpoints).

2. Factory calls with a literal ``device="cuda"`` in those modules go to the CPU. This covers
   the token counters of all three schedules
   (``schedules.py``: ``torch.zeros([], ..., device="cuda")``),
   ``optimizer/clip_grads.py`` (norm buffers), ``optimizer/optimizer.py`` (``found_inf`` and
   friends), ``utils.local_multi_tensor_l2_norm`` and ``tensor_parallel/data.py``.

3. Type-string checks (``param.grad.type() == 'torch.cuda.FloatTensor'``) in
   ``optimizer/clip_grads.py``, ``optimizer/optimizer.py`` and ``optimizer/distrib_optimizer.py``
   compare against the CPU type names instead: their string constants are rewritten in the
   functions' code objects.

4. ``LanguageModule.setup_embeddings_and_output_layer`` (``models/common/language_module``) moves
   the tied embedding to CUDA with ``weight.data.cuda()`` before all-reducing it between the first
   and last pipeline stage (PP > 1 with tied embeddings): the method name ``cuda`` in that one
   function's code object becomes ``cpu``.

The RNG tracker (``tensor_parallel/random.py``: ``CudaRNGStatesTracker`` stores CUDA generator
states) is replaced by :class:`CpuRNGStatesTracker`, which keeps the same names
(``model-parallel-rng``, ``expert-parallel-rng``, ``data-parallel-rng``) over CPU generator states.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import types
from collections.abc import Iterator
from typing import Any

import torch

from kd_module.models.gpt import ParallelLayout
from kd_module.parallel.collectives import free_port
from kd_module.rules import Problems
from kd_module.upstream import megatron as upstream_megatron

logger = logging.getLogger(__name__)

# megatron modules whose ``torch`` global is replaced by the CPU view (part 1 and 2 above).
_BRIDGED_MODULES = (
    "megatron.core.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.transformer.module",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.parallel_state",
    # RoPE: get_emb moves inv_freq to torch.cuda.current_device() at the first forward.
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    # dist_checkpointing save: torch.cuda.synchronize() and result tensors on the current device.
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)

# Modules whose functions compare tensor type strings with CUDA names (part 3 above).
_TYPE_STRING_MODULES = (
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
)
_TYPE_STRINGS = {
    "torch.cuda.FloatTensor": "torch.FloatTensor",
    "torch.cuda.HalfTensor": "torch.HalfTensor",
    "torch.cuda.BFloat16Tensor": "torch.BFloat16Tensor",
}

# (module, qualified function name) -> attribute names rewritten in that function (part 4).
_NAME_REWRITES = {
    (
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule.setup_embeddings_and_output_layer",
    ): {"cuda": "cpu"},
}

_FACTORIES = (
    "empty",
    "zeros",
    "ones",
    "full",
    "tensor",
    "arange",
    "rand",
    "randn",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
)

_CPU = torch.device("cpu")
_bridges_installed = False
# What install_cpu_bridges changed, to undo it: (function, original code object) pairs and the
# RNG tracker megatron had before.
_replaced_code: list[tuple[types.FunctionType, types.CodeType]] = []
_replaced_tracker: tuple[Any, bool] | None = None
_run_device: torch.device | None = None
_gloo_process_groups = False


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a run on this process uses.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a ``torch.device``, or ``None`` for CUDA
            when it exists (this process's ``LOCAL_RANK`` picks the GPU) and the CPU otherwise.

    Raises:
        ValueError: for an unknown device type, or CUDA asked for where there is none.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a device (use 'cpu' or 'cuda')") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r} is not supported (use 'cpu' or 'cuda')")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available; use 'cpu'")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def uses_cuda() -> bool:
    """Whether this process's run uses CUDA: the one source of truth for every module.

    It is the device :func:`initialize_distributed` chose; before any run is initialized, whether
    CUDA exists.
    """
    if _run_device is not None:
        return _run_device.type == "cuda"
    return torch.cuda.is_available()


def run_device() -> torch.device:
    """The device of this process's run (see :func:`uses_cuda`)."""
    if _run_device is not None:
        return _run_device
    return resolve_device(None)


def gloo_process_groups() -> bool:
    """Whether megatron's gloo process groups exist (created for CPU runs only)."""
    return _gloo_process_groups


def _to_cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream`` on CPU: every operation is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> None:
        return None


def _make_cuda_view() -> types.SimpleNamespace:
    """The ``torch.cuda`` seen by the bridged megatron modules on a CPU-only machine."""
    real = torch.cuda

    def current_device() -> torch.device:
        return _CPU

    def _noop(*args: Any, **kwargs: Any) -> None:
        return None

    view = types.SimpleNamespace(
        is_available=lambda: False,
        current_device=current_device,
        synchronize=_noop,
        empty_cache=_noop,
        device_count=lambda: 0,
        Stream=_CpuStream,
        stream=lambda stream=None: contextlib.nullcontext(),
        current_stream=lambda device=None: _CpuStream(),
        default_stream=lambda device=None: _CpuStream(),
        memory_allocated=lambda device=None: 0,
        max_memory_allocated=lambda device=None: 0,
        reset_peak_memory_stats=_noop,
        nvtx=types.SimpleNamespace(range_push=_noop, range_pop=_noop),
        get_rng_state=lambda device=None: torch.get_rng_state(),
        set_rng_state=lambda state, device=None: torch.set_rng_state(state),
        manual_seed=_noop,
    )
    # Anything else (type objects such as torch.cuda.FloatTensor, amp helpers) stays the real one.
    for name in ("FloatTensor", "HalfTensor", "BFloat16Tensor", "amp", "OutOfMemoryError", "Event"):
        if hasattr(real, name):
            setattr(view, name, getattr(real, name))
    return view


def _wrap_factory(fn: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    factory.__name__ = getattr(fn, "__name__", "factory")
    factory.__wrapped__ = fn
    return factory


class _CpuTorchView(types.ModuleType):
    """``torch`` as seen by a bridged module: the real torch, except ``cuda`` and the factories."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.__dict__.update({k: v for k, v in vars(torch).items() if not k.startswith("__")})
        self.cuda = _make_cuda_view()
        for name in _FACTORIES:
            setattr(self, name, _wrap_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:  # attributes added to torch after the copy
        return getattr(torch, name)


def _rewrite_code_constants(code: types.CodeType, mapping: dict[str, str]) -> types.CodeType:
    consts = []
    changed = False
    for const in code.co_consts:
        if isinstance(const, str) and const in mapping:
            consts.append(mapping[const])
            changed = True
        elif isinstance(const, types.CodeType):
            new = _rewrite_code_constants(const, mapping)
            changed |= new is not const
            consts.append(new)
        else:
            consts.append(const)
    return code.replace(co_consts=tuple(consts)) if changed else code


def _rewrite_code_names(code: types.CodeType, mapping: dict[str, str]) -> types.CodeType:
    names = tuple(mapping.get(name, name) for name in code.co_names)
    return code.replace(co_names=names)


def _functions_of(module: types.ModuleType) -> Iterator[types.FunctionType]:
    """Every plain function defined in ``module``, including methods of its classes."""
    for value in vars(module).values():
        if isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
            yield value
        elif isinstance(value, type) and value.__module__ == module.__name__:
            for attr in vars(value).values():
                fn = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
                if isinstance(fn, property):
                    fn = fn.fget
                fn = getattr(fn, "__wrapped__", fn)
                if isinstance(fn, types.FunctionType):
                    yield fn


def _replace_code(fn: types.FunctionType, code: types.CodeType) -> None:
    if code is not fn.__code__:
        _replaced_code.append((fn, fn.__code__))
        fn.__code__ = code


def install_cpu_bridges() -> bool:
    """Make megatron-core run on the CPU. Idempotent; inert when this run uses CUDA.

    Returns:
        ``True`` when the bridges are (or already were) installed, ``False`` for a CUDA run.
    """
    global _bridges_installed, _replaced_tracker
    if uses_cuda():
        return False
    if _bridges_installed:
        return True
    import importlib

    view = _CpuTorchView()
    for name in _BRIDGED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = view
    for name in _TYPE_STRING_MODULES:
        for fn in _functions_of(importlib.import_module(name)):
            _replace_code(fn, _rewrite_code_constants(fn.__code__, _TYPE_STRINGS))

    for (module_name, qualname), mapping in _NAME_REWRITES.items():
        owner: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            owner = getattr(owner, part)
        _replace_code(owner, _rewrite_code_names(owner.__code__, mapping))

    _replaced_tracker = upstream_megatron.swap_rng_tracker(CpuRNGStatesTracker())
    _bridges_installed = True
    return True


def remove_cpu_bridges() -> bool:
    """Undo :func:`install_cpu_bridges`: megatron as shipped, for a CUDA run after a CPU one.

    Returns:
        ``True`` when bridges were removed, ``False`` when none were installed.
    """
    global _bridges_installed, _replaced_tracker
    if not _bridges_installed:
        return False
    import importlib

    for name in _BRIDGED_MODULES:
        module = importlib.import_module(name)
        if isinstance(getattr(module, "torch", None), _CpuTorchView):
            module.torch = torch
    while _replaced_code:
        fn, code = _replaced_code.pop()
        fn.__code__ = code
    if _replaced_tracker is not None:
        upstream_megatron.swap_rng_tracker(*_replaced_tracker)
        _replaced_tracker = None
    _bridges_installed = False
    return True


def bridges_installed() -> bool:
    """Whether :func:`install_cpu_bridges` changed megatron in this process."""
    return _bridges_installed


class CpuRNGStatesTracker:
    """megatron's RNG tracker over CPU generator states (same names, same fork semantics).

    Megatron forks named RNG states so that, e.g., dropout inside tensor-parallel regions differs
    across TP ranks while staying reproducible. On CPU the default generator plays the role of the
    CUDA one.
    """

    def __init__(self) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._current_state_name = "default-rng"

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG tracker: seed {seed} is already used")
        if name in self.states_:
            raise ValueError(f"RNG tracker: state {name!r} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator().manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise ValueError(f"RNG tracker: state {name!r} was never added")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name


def seed_everything(seed: int) -> None:
    """Seed python-level torch RNGs and megatron's named model-parallel RNG states.

    Mirrors ``megatron.core.tensor_parallel.model_parallel_cuda_manual_seed``: data-parallel state
    gets ``seed``, tensor-parallel state ``seed + 2718 + tp_rank``, expert state
    ``seed + 1024 + 100 * ep_rank + etp_rank``.
    """
    import random

    import numpy as np
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as mp_tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if uses_cuda():
        mp_tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    tracker = upstream_megatron.rng_tracker()
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    tracker.add("data-parallel-rng", seed)
    tracker.add("model-parallel-rng", seed + 2718 + tp_rank)
    tracker.add("expert-parallel-rng", seed + 1024 + 100 * ep_rank + etp_rank)


_owns_process_group = False
_env_set_here: list[str] = []


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    seed: int = 1234,
    timeout_minutes: int = 10,
    device: str | torch.device | None = None,
) -> None:
    """Initialize torch.distributed, megatron's parallel state and the RNG tracker.

    Under torchrun (``RANK``/``WORLD_SIZE`` set) it joins the launched group; otherwise it starts
    a single in-process rank on a free local port, so notebooks and plain scripts work. The
    device decides the rest: a CUDA run uses NCCL and megatron as shipped; a CPU run (also on a
    machine with a GPU) uses gloo, megatron's gloo groups and the CPU bridges. Calling it again
    with the same layout is a no-op; with a different layout it rebuilds megatron's groups.

    Args:
        tensor_model_parallel_size: ranks a layer's weights are split across.
        pipeline_model_parallel_size: ranks the layers are split across.
        context_parallel_size: ranks the sequence is split across.
        virtual_pipeline_model_parallel_size: interleaved pipeline chunks per rank, or ``None``.
        seed: base seed for torch and megatron's named RNG states.
        timeout_minutes: collective timeout, so a dead peer fails the job instead of hanging it.
        device: the run's device, see :func:`resolve_device` (``None``: CUDA when it exists).

    Raises:
        ValueError: for a device that cannot be used, or a world size not divisible by
            TP x PP x CP.
    """
    global _owns_process_group, _run_device, _gloo_process_groups
    import torch.distributed as dist

    device = resolve_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized() and dist.get_backend() != backend:
        if not _owns_process_group:
            raise ValueError(
                f"device={str(device)!r} needs the {backend} backend, but this process already "
                f"joined a {dist.get_backend()} process group; one launched process runs on "
                "one kind of device"
            )
        destroy_distributed()
    _run_device = device
    if device.type == "cuda":
        remove_cpu_bridges()
        torch.cuda.set_device(device)
    else:
        install_cpu_bridges()
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            single = {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()),
                "RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_RANK": "0",
            }
            for key, value in single.items():
                if key not in os.environ or key == "MASTER_PORT":
                    os.environ[key] = value
                    _env_set_here.append(key)
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
        # Only the single in-process rank is ours to tear down: under torchrun the group
        # outlives a fit, so a second fit in the same ranks reuses it (re-creating it against
        # the launcher's store fails).
        _owns_process_group = bool(_env_set_here)

    layout = ParallelLayout(
        tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    )
    Problems(layout.problems(dist.get_world_size())).raise_if_any("parallel layout")

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tensor_model_parallel_size
            and parallel_state.get_pipeline_model_parallel_world_size()
            == pipeline_model_parallel_size
            and parallel_state.get_context_parallel_world_size() == context_parallel_size
            and parallel_state.get_virtual_pipeline_model_parallel_world_size()
            == virtual_pipeline_model_parallel_size
            and _gloo_process_groups == (device.type == "cpu")
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
            # megatron's gloo groups serve CPU-side collectives; a CUDA run does not need them.
            # The optimizer must be told the same (optim.build_megatron_optimizer asks
            # gloo_process_groups()).
            create_gloo_process_groups=device.type == "cpu",
        )
        _gloo_process_groups = device.type == "cpu"
    seed_everything(seed)


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and, for a single in-process rank, the process group.

    After this, :func:`initialize_distributed` can be called again in the same process (tests
    and notebooks run several fits one after another).
    """
    global _owns_process_group, _run_device, _gloo_process_groups
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _gloo_process_groups = False
    tracker = upstream_megatron.rng_tracker()
    if tracker is not None:
        tracker.reset()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
        _owns_process_group = False
        while _env_set_here:
            os.environ.pop(_env_set_here.pop(), None)
    _run_device = None


def is_initialized() -> bool:
    """Whether megatron's parallel state is set up in this process."""
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized()
