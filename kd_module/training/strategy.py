"""``MegatronStrategy``: megatron-core parallelism, DDP and optimizer as a Lightning strategy.

Lightning's stock strategies wrap the model in ``torch.nn.parallel.DistributedDataParallel``;
megatron-core needs its own parallel state (tensor / pipeline / context / data parallel groups),
its own ``DistributedDataParallel`` (contiguous gradient buffers, reduce of per-token loss
gradients, pipeline embedding all-reduce) and its own optimizer. This strategy provides them:

- ``setup_environment``: initializes torch.distributed and megatron's parallel state through
  :func:`kd_module.parallel.runtime.initialize_distributed` (gloo on CPU, NCCL on GPU, a single
  in-process
  rank in a notebook);
- ``setup``: wraps the module built by ``configure_model`` in megatron's DDP (and ``Float16Module``
  for bf16) and builds megatron's optimizer through ``configure_optimizers``;
- ``teardown``: destroys megatron's state, so ``Trainer.fit`` can run again in the same process.

The LightningModule drives megatron's forward-backward schedule itself (see
:class:`kd_module.training.module.DistillationModule`); the strategy gives it the layout and the
number of
micro-batches.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy

from kd_module.models.gpt import ParallelLayout
from kd_module.parallel import runtime
from kd_module.rules import Problems
from kd_module.training.precision import PRECISIONS, precision_problems
from kd_module.upstream import lightning as upstream_lightning

logger = logging.getLogger(__name__)


class MegatronStrategy(DDPStrategy):
    """Lightning strategy running megatron-core models with TP/PP/CP/DP.

    Args:
        tensor_model_parallel_size: ranks each layer's weights are split across.
        pipeline_model_parallel_size: ranks the layers are split across (1F1B schedule).
        context_parallel_size: ranks the sequence is split across (needs Transformer Engine).
        sequence_parallel: split activations outside tensor-parallel regions along the sequence.
        virtual_pipeline_model_parallel_size: interleaved pipeline chunks; distillation refuses it.
        use_distributed_optimizer: shard optimizer state across data-parallel ranks.
        overlap_grad_reduce: overlap DDP's gradient all-reduce with the backward pass.
        grad_reduce_in_fp32: keep DDP gradient buffers in fp32 with bf16 parameters.
        precision: ``fp32`` or ``bf16`` (bf16 parameters with fp32 main weights; CUDA only).
        seed: seed of torch and megatron's named RNG states.
        timeout_minutes: collective timeout, so a dead rank fails the job instead of hanging it.
        **kwargs: passed to Lightning's ``DDPStrategy`` (accelerator, cluster_environment, ...).

    Raises:
        ValueError: for sizes that are not positive integers, an unknown precision, or bf16 on a
            machine without CUDA.

    Examples:
        >>> trainer = lightning.Trainer(
        ...     accelerator="cpu", devices=2,
        ...     strategy=MegatronStrategy(tensor_model_parallel_size=2))
    """

    strategy_name = "megatron"

    def __init__(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        context_parallel_size: int = 1,
        sequence_parallel: bool = False,
        virtual_pipeline_model_parallel_size: int | None = None,
        use_distributed_optimizer: bool = False,
        overlap_grad_reduce: bool = False,
        grad_reduce_in_fp32: bool = True,
        precision: str = "fp32",
        seed: int = 1234,
        timeout_minutes: int = 10,
        **kwargs: Any,
    ) -> None:
        layout = ParallelLayout(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
            sequence_parallel=sequence_parallel and tensor_model_parallel_size != 1,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        )
        problems = Problems(layout.size_problems())
        problems.positive_int("timeout_minutes", timeout_minutes)
        problems.extend(precision_problems(precision, cuda=torch.cuda.is_available()))
        if sequence_parallel and tensor_model_parallel_size == 1:
            logger.warning("sequence_parallel has no effect with tensor_model_parallel_size=1")
        problems.raise_if_any("MegatronStrategy")
        super().__init__(**kwargs)
        self.layout = layout
        self.use_distributed_optimizer = use_distributed_optimizer
        self.overlap_grad_reduce = overlap_grad_reduce
        self.grad_reduce_in_fp32 = grad_reduce_in_fp32
        self.precision_name = precision
        self.seed = seed
        self.timeout_minutes = timeout_minutes

    # ------------------------------------------------------------------ layout
    @property
    def params_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision_name].dtype

    @property
    def data_parallel_size(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_world_size()

    def layout_problems(self, world_size: int) -> list[str]:
        """Problems of this layout on ``world_size`` ranks (checked before any model is built)."""
        return self.layout.problems(
            world_size, world=f"world size {world_size} (num_nodes x devices)"
        )

    # ------------------------------------------------------------------ environment
    def setup_environment(self) -> None:
        # The data module's megatron-style sampler already splits batches across data-parallel
        # ranks; Lightning must not inject its DistributedSampler on top of it.
        module = self.lightning_module
        trainer = upstream_lightning.attached_trainer(module) if module is not None else None
        if trainer is not None:
            upstream_lightning.disable_distributed_sampler(trainer)
        super().setup_environment()

    def setup_distributed(self) -> None:
        self.set_world_ranks()
        problems = Problems(self.layout_problems(self.world_size))
        problems.extend(precision_problems(self.precision_name, self.root_device.type == "cuda"))
        problems.raise_if_any("parallel layout")
        from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

        for warning in self.layout.across_nodes_warnings(self.num_nodes, self.num_processes):
            rank_zero_warn(warning)
        if self.world_size > 1 or "RANK" in os.environ:
            environment = self.cluster_environment
            rank_zero_info(
                f"MegatronStrategy: {self.num_nodes} node(s) x {self.num_processes} device(s), "
                f"world size {self.world_size}, ranks from {type(environment).__name__}"
            )
            os.environ["MASTER_ADDR"] = str(environment.main_address)
            os.environ["MASTER_PORT"] = str(environment.main_port)
            os.environ["RANK"] = str(self.global_rank)
            os.environ["WORLD_SIZE"] = str(self.world_size)
            os.environ["LOCAL_RANK"] = str(self.local_rank)
        runtime.initialize_distributed(
            tensor_model_parallel_size=self.layout.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.layout.pipeline_model_parallel_size,
            context_parallel_size=self.layout.context_parallel_size,
            virtual_pipeline_model_parallel_size=self.layout.virtual_pipeline_model_parallel_size,
            seed=self.seed,
            timeout_minutes=self.timeout_minutes,
            device=self.root_device,
        )

    def _configure_launcher(self) -> None:
        # One in-process rank (a notebook, a plain script): nothing to launch. Lightning's DDP
        # launcher would refuse an interactive environment.
        if self.num_processes == 1 and self.num_nodes == 1:
            upstream_lightning.clear_launcher(self)
            return
        super()._configure_launcher()

    @property
    def process_group_backend(self) -> str | None:
        """NCCL for a CUDA run, gloo for a CPU one (the runtime creates the group)."""
        if self.parallel_devices is None:
            return None
        return "nccl" if self.root_device.type == "cuda" else "gloo"

    def model_to_device(self) -> None:
        pass  # megatron builds the model on its device

    # ------------------------------------------------------------------ model and optimizer
    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """megatron's Float16Module (bf16) and DistributedDataParallel around a model chunk."""
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.transformer.module import Float16Module

        config = model.config
        if self.precision_name == "bf16":
            model = Float16Module(config, model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=self.grad_reduce_in_fp32,
            overlap_grad_reduce=self.overlap_grad_reduce,
            use_distributed_optimizer=self.use_distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        wrapped = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        config.no_sync_func = wrapped.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        if self.overlap_grad_reduce:
            config.grad_sync_func = wrapped.start_grad_sync
        return wrapped

    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        module.wrap_for_training(self)
        self.model = module
        if trainer.state.fn == "fit":
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def configure_ddp(self) -> None:
        pass  # megatron's DDP is applied in setup()

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        return optimizer.step(closure=closure)

    # ------------------------------------------------------------------ checkpoints
    # Run checkpoints are megatron distributed checkpoints of the student, its optimizer, the LR
    # schedule and RNG (kd_module.checkpoints.run), written by every rank together. Lightning's own
    # state (loops, callbacks, data position) travels inside them.
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the optimizer's sharded state needs the optimizer built

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # restored in load_checkpoint

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return {}

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        from kd_module.checkpoints.run import save_run_checkpoint

        save_run_checkpoint(self.lightning_module, checkpoint, filepath)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        from kd_module.checkpoints.run import load_run_checkpoint

        return load_run_checkpoint(self.lightning_module, checkpoint_path)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        pass  # loaded with the optimizer in load_checkpoint

    def remove_checkpoint(self, filepath: Any) -> None:
        from kd_module.checkpoints.run import remove_run_checkpoint

        remove_run_checkpoint(filepath)

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        return tensor  # metrics are reduced by the module across megatron's groups

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002
        """Whether every rank (``all``) or any rank decided ``decision``, over the whole world.

        Lightning's ``DDPStrategy`` counts the votes with :meth:`reduce`, which here leaves
        tensors as they are: one vote never equals the world size, so on more than one rank
        ``ModelCheckpoint`` stopped saving once it held ``keep_last`` checkpoints. The votes are
        summed here instead.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return bool(decision)
        votes = torch.tensor(int(bool(decision)), device=self.root_device)
        dist.all_reduce(votes, op=dist.ReduceOp.SUM)
        return bool(votes == dist.get_world_size()) if all else bool(votes > 0)

    def teardown(self) -> None:
        """Release megatron's state; the model stays where it is.

        Lightning's default teardown moves the LightningModule (and the optimizer state) to the
        CPU. For a megatron model on a GPU that would split it: parameters on the host while
        megatron DDP's contiguous gradient buffers and the optimizer's fp32 main parameters stay
        on the device. The model is left on its device instead (a notebook can keep using it).
        """
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()
        runtime.destroy_distributed()
