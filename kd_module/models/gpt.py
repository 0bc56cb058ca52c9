"""Model configs and builders: megatron-core ``GPTModel`` (and ``MambaModel``) from a dataclass.

A :class:`GPTModelConfig` holds architecture only, in megatron-core's own names. Parallel layout
and precision come from the strategy at build time, so the same config builds the model at any
TP/PP/CP layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kd_module.rules import Problems

ACTIVATIONS = ("gelu", "fast-gelu", "swiglu", "fast-swiglu", "geglu", "squared-relu", "relu")
GATED_ACTIVATIONS = ("swiglu", "fast-swiglu", "geglu")
"""Gated linear units: ``linear_fc1`` holds a gate and an up half of ``ffn_hidden_size`` rows."""
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "none")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
MODEL_TYPES = ("gpt", "mamba")


@dataclass
class GPTModelConfig:
    """Architecture of a decoder-only language model, in megatron-core names."""

    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_attention_heads: int = 4
    """Attention heads per layer."""
    ffn_hidden_size: int | None = None
    """MLP inner width; ``None`` means ``4 * hidden_size``."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; ``None`` means one per attention head."""
    kv_channels: int | None = None
    """Width of one attention head; ``None`` means ``hidden_size // num_attention_heads``."""
    seq_length: int = 128
    """Training sequence length."""
    max_position_embeddings: int | None = None
    """Longest sequence the position embedding supports; ``None`` means ``seq_length``."""
    vocab_size: int | None = None
    """Padded vocabulary size; ``None`` means taken from the tokenizer at build time."""
    make_vocab_size_divisible_by: int = 128
    """The tokenizer's vocabulary is padded to a multiple of this times TP."""
    normalization: str = "LayerNorm"
    """``LayerNorm`` or ``RMSNorm``."""
    layernorm_zero_centered_gamma: bool = False
    """LayerNorm1p: the norm's weight is stored as ``gamma - 1``."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every normalization layer."""
    activation: str = "gelu"
    """MLP activation: one of ``ACTIVATIONS``."""
    add_bias_linear: bool = True
    """Biases in linear layers."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection alone (Qwen2 style) when ``add_bias_linear`` is false."""
    qk_layernorm: bool = False
    """Normalize queries and keys per head (Qwen3 style)."""
    position_embedding_type: str = "learned_absolute"
    """``learned_absolute``, ``rope`` or ``none``."""
    rotary_percent: float = 1.0
    """Fraction of each head's channels that rotary embeddings rotate."""
    rotary_base: int = 10000
    """Base of the rotary frequencies."""
    share_embeddings_and_output_weights: bool = True
    """Tie the output layer to the input embedding."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialization."""
    hidden_dropout: float = 0.0
    """Dropout on the residual stream."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    apply_query_key_layer_scaling: bool = False
    """Scale attention scores by the layer number (fp16 stability)."""
    masked_softmax_fusion: bool = False
    """Fused masked-softmax kernel (CUDA only)."""
    transformer_impl: str = "auto"
    """``transformer_engine``, ``local`` or ``auto`` (TE when TE and CUDA are present)."""
    model_type: str = "gpt"
    """``gpt`` (megatron ``GPTModel``) or ``mamba`` (``MambaModel``, needs mamba-ssm on CUDA)."""
    rope_scaling: bool = False
    """Llama 3.1 style RoPE frequency scaling (NeMo's ``scale_positional_embedding``)."""
    rope_scaling_factor: float = 8.0
    """Scale factor of ``rope_scaling``."""
    hybrid_override_pattern: str | None = None
    """Mamba/hybrid layer pattern such as ``M*M-`` (``M`` mamba, ``*`` attention, ``-`` MLP)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further ``TransformerConfig`` fields passed through unchanged."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("model config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with this config, as messages naming the key and what is allowed."""
        out = Problems()
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            out.positive_int(name, getattr(self, name))
        for name in (
            "ffn_hidden_size",
            "num_query_groups",
            "kv_channels",
            "vocab_size",
            "max_position_embeddings",
        ):
            out.positive_int(name, getattr(self, name), or_none="null")
        out.one_of("activation", self.activation, ACTIVATIONS)
        out.one_of("normalization", self.normalization, NORMALIZATIONS)
        out.one_of("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDINGS)
        out.one_of("transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        out.one_of("model_type", self.model_type, MODEL_TYPES)
        if (
            isinstance(self.hidden_size, int)
            and isinstance(self.num_attention_heads, int)
            and self.num_attention_heads > 0
            and self.kv_channels is None
            and self.hidden_size % self.num_attention_heads
        ):
            out.append(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads} (set kv_channels)"
            )
        if (
            self.num_query_groups
            and isinstance(self.num_attention_heads, int)
            and self.num_attention_heads % self.num_query_groups
        ):
            out.append(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}"
            )
        if (
            isinstance(self.seq_length, int)
            and self.max_position_embeddings is not None
            and self.seq_length > self.max_position_embeddings
        ):
            out.append(
                f"seq_length={self.seq_length} is larger than "
                f"max_position_embeddings={self.max_position_embeddings}"
            )
        if self.model_type == "mamba" and not out:
            out += self._mamba_shape_problems()
        return out

    def mamba_heads_and_groups(self) -> tuple[int | None, int]:
        """Mamba's SSM heads and groups as megatron's ``MambaMixer`` derives them.

        ``mamba_num_heads`` (else ``2 * hidden_size / mamba_head_dim``: the mixer's expand is 2)
        and ``mamba_num_groups``, from ``extra`` or megatron-core 0.16.1's defaults (head dim 64,
        8 groups). Heads are ``None`` when the inner width does not divide into heads.
        """
        head_dim = self.extra.get("mamba_head_dim", 64)
        groups = self.extra.get("mamba_num_groups", 8)
        heads = self.extra.get("mamba_num_heads")
        if heads is None:
            inner = 2 * self.hidden_size
            heads = inner // head_dim if inner % head_dim == 0 else None
        return heads, groups

    def _mamba_shape_problems(self) -> list[str]:
        heads, groups = self.mamba_heads_and_groups()
        head_dim = self.extra.get("mamba_head_dim", 64)
        if heads is None:
            return [
                f"mamba: 2 x hidden_size={2 * self.hidden_size} is not divisible by "
                f"mamba_head_dim={head_dim} (set extra.mamba_head_dim or extra.mamba_num_heads)"
            ]
        if heads % groups:
            return [
                f"mamba: {heads} SSM heads (2 x hidden_size / mamba_head_dim) are not divisible "
                f"by mamba_num_groups={groups} (megatron asserts this when it builds the layer; "
                "set extra.mamba_num_groups or extra.mamba_head_dim)"
            ]
        return []

    def layout_problems(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        context_parallel_size: int = 1,
        who: str = "model",
    ) -> list[str]:
        """Problems of running this architecture at a parallel layout."""
        out: list[str] = []
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        if self.num_attention_heads % tp:
            out.append(
                f"{who}: num_attention_heads={self.num_attention_heads} is not divisible by "
                f"tensor_model_parallel_size={tp}"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if groups % tp:
            out.append(
                f"{who}: num_query_groups={groups} is not divisible by "
                f"tensor_model_parallel_size={tp}"
            )
        if self.model_type == "mamba" and not self._mamba_shape_problems():
            heads, groups = self.mamba_heads_and_groups()
            if heads % tp or groups % tp:
                out.append(
                    f"{who}: mamba heads={heads} and mamba_num_groups={groups} must both be "
                    f"divisible by tensor_model_parallel_size={tp}"
                )
        if self.num_layers % pp:
            out.append(
                f"{who}: num_layers={self.num_layers} is not divisible by "
                f"pipeline_model_parallel_size={pp}"
            )
        if context_parallel_size > 1 and self.seq_length % (2 * context_parallel_size):
            out.append(
                f"{who}: seq_length={self.seq_length} is not divisible by "
                f"2 x context_parallel_size={2 * context_parallel_size}"
            )
        return out

    @property
    def padded_max_position_embeddings(self) -> int:
        return self.max_position_embeddings or self.seq_length

    def replace(self, **changes: Any) -> GPTModelConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass
class ParallelLayout:
    """How a model is split across ranks; the strategy fills it, every model shares it."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    virtual_pipeline_model_parallel_size: int | None = None

    def size_problems(self) -> list[str]:
        """The sizes that are not positive integers (``virtual_...`` may be ``None``)."""
        problems = Problems()
        problems.positive_int("tensor_model_parallel_size", self.tensor_model_parallel_size)
        problems.positive_int("pipeline_model_parallel_size", self.pipeline_model_parallel_size)
        problems.positive_int("context_parallel_size", self.context_parallel_size)
        problems.positive_int(
            "virtual_pipeline_model_parallel_size",
            self.virtual_pipeline_model_parallel_size,
            or_none="None",
        )
        return list(problems)

    @property
    def model_parallel_size(self) -> int:
        """Ranks one model replica spans: TP x PP x CP."""
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def problems(
        self,
        world_size: int,
        global_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        world: str | None = None,
    ) -> list[str]:
        """Problems of this layout on ``world_size`` ranks, and of a batch split over them.

        Args:
            world_size: ranks of the run.
            global_batch_size: samples per optimizer step; with ``micro_batch_size``, it must
                split into whole micro-batches on every data-parallel rank.
            micro_batch_size: samples per forward pass on one rank.
            world: how the caller names the world size (``"num_nodes x num_gpus_per_node = 8"``);
                ``"world size N"`` when ``None``.

        Returns:
            One message per problem; the sizes' own problems first (nothing else is checked
            then).
        """
        problems = self.size_problems()
        if problems:
            return problems
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        cp = self.context_parallel_size
        if world_size % self.model_parallel_size:
            world = world or f"world size {world_size}"
            return [
                f"{world} is not divisible by tensor_model_parallel_size ({tp}) x "
                f"pipeline_model_parallel_size ({pp}) x context_parallel_size ({cp}) = "
                f"{self.model_parallel_size}"
            ]
        if global_batch_size is None or micro_batch_size is None:
            return []
        data_parallel = world_size // self.model_parallel_size
        return self.batch_problems(global_batch_size, micro_batch_size, data_parallel)

    def across_nodes_warnings(self, num_nodes: int, devices_per_node: int) -> list[str]:
        """Groups of this layout that span machines where they should not.

        megatron-core orders ranks tensor-parallel first, so a tensor-parallel group is
        ``tensor_model_parallel_size`` consecutive ranks: unless that size divides the devices
        of a node, some groups straddle two nodes and every layer's all-reduce (and, with
        sequence parallelism, all-gather) crosses the network instead of NVLink. It runs, at a
        fraction of the speed; these messages say so (the strategy warns with them).

        Args:
            num_nodes: machines of the run.
            devices_per_node: ranks per machine.
        """
        tp = self.tensor_model_parallel_size
        if num_nodes <= 1 or devices_per_node % tp == 0:
            return []
        return [
            f"tensor_model_parallel_size={tp} does not divide the {devices_per_node} devices of "
            f"a node: tensor-parallel groups span nodes, and every layer's tensor-parallel "
            f"communication crosses the network between them. Keep tensor parallelism within a "
            f"node (a divisor of the devices per node) and scale across nodes with data or "
            f"pipeline parallelism"
        ]

    @staticmethod
    def batch_problems(
        global_batch_size: int, micro_batch_size: int, data_parallel_size: int
    ) -> list[str]:
        """Whether a global batch splits into whole micro-batches on every data-parallel rank."""
        if global_batch_size % (micro_batch_size * data_parallel_size):
            return [
                f"global_batch_size={global_batch_size} is not divisible by "
                f"micro_batch_size={micro_batch_size} x data_parallel_size={data_parallel_size}"
            ]
        return []

    def data_parallel_size(self, world_size: int) -> int:
        """Model replicas on ``world_size`` ranks.

        Raises:
            ValueError: when ``world_size`` is not a multiple of :attr:`model_parallel_size`.
        """
        Problems(self.problems(world_size)).raise_if_any("parallel layout")
        return world_size // self.model_parallel_size

    def num_microbatches(
        self, global_batch_size: int, micro_batch_size: int, world_size: int
    ) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step.

        Raises:
            ValueError: when the global batch does not split into whole micro-batches.
        """
        problems = self.problems(world_size, global_batch_size, micro_batch_size)
        Problems(problems).raise_if_any("parallel layout")
        return global_batch_size // (micro_batch_size * self.data_parallel_size(world_size))


def transformer_engine_installed() -> bool:
    """Whether Transformer Engine's PyTorch package can be imported here."""
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def uses_transformer_engine(config: GPTModelConfig, cuda: bool | None = None) -> bool:
    """Resolve ``transformer_impl``: TE needs both the package and a CUDA run.

    Args:
        config: the architecture.
        cuda: whether the run uses CUDA; ``None`` asks :func:`kd_module.parallel.runtime.uses_cuda`.
    """
    from kd_module.parallel import runtime

    if config.transformer_impl == "local":
        return False
    cuda = runtime.uses_cuda() if cuda is None else cuda
    available = cuda and transformer_engine_installed()
    if config.transformer_impl == "transformer_engine" and not available:
        raise ValueError(
            "model config: transformer_impl='transformer_engine' needs Transformer Engine and "
            "CUDA (pip install 'megatron-kd[te]' on a GPU machine); use 'local' or 'auto'"
        )
    return available


def implementation_problems(
    config: GPTModelConfig,
    context_parallel_size: int = 1,
    reset_attention_mask: bool = False,
    cuda: bool | None = None,
    who: str = "model",
) -> list[str]:
    """What cannot work with the layer implementation ``config`` resolves to on this run.

    Checked before any model is built; each of these would otherwise fail inside megatron (an
    assertion at construction) or, worse, run and compute something else.

    Args:
        config: the architecture.
        context_parallel_size: ranks the sequence is split across.
        reset_attention_mask: whether batches carry document-boundary attention masks.
        cuda: whether the run uses CUDA; ``None`` asks :func:`kd_module.parallel.runtime.uses_cuda`.
        who: ``student`` / ``teacher`` in messages.
    """
    from kd_module.parallel import runtime

    cuda = runtime.uses_cuda() if cuda is None else cuda
    if config.model_type == "mamba":
        return [f"{who}: {problem}" for problem in mamba_problems(cuda)]
    try:
        te = uses_transformer_engine(config, cuda)
    except ValueError as error:
        return [f"{who}: {str(error).removeprefix('model config: ')}"]
    out: list[str] = []
    if context_parallel_size > 1 and not te:
        out.append(
            f"{who}: context_parallel_size={context_parallel_size} needs Transformer Engine "
            "attention (megatron's local attention cannot split a sequence across ranks), which "
            "needs CUDA and the te extra; use context_parallel_size=1 here"
        )
    if reset_attention_mask and te:
        out.append(
            f"{who}: reset_attention_mask=True under Transformer Engine: TE's causal attention "
            "ignores the per-document mask, so attention would cross document boundaries; use "
            "reset_attention_mask=False or transformer_impl='local'"
        )
    return out


def _activation_fields(activation: str) -> dict[str, Any]:
    import torch.nn.functional as F

    def squared_relu(x: Any) -> Any:
        return F.relu(x).pow(2)

    def fast_gelu(x: Any) -> Any:
        return F.gelu(x, approximate="tanh")

    functions = {
        "gelu": F.gelu,
        "fast-gelu": fast_gelu,
        "relu": F.relu,
        "squared-relu": squared_relu,
        "swiglu": F.silu,
        "fast-swiglu": F.silu,
        "geglu": F.gelu,
    }
    return {
        "activation_func": functions[activation],
        "gated_linear_unit": activation in GATED_ACTIVATIONS,
    }


def unwrap(model: Any) -> Any:
    """The innermost module under megatron's DDP / Float16Module wrappers (they expose
    ``.module``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def transformer_config(
    config: GPTModelConfig,
    layout: ParallelLayout | None = None,
    params_dtype: Any = None,
    **overrides: Any,
) -> Any:
    """The megatron ``TransformerConfig`` for ``config`` at ``layout``."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from kd_module.parallel import runtime

    layout = layout or ParallelLayout()
    params_dtype = params_dtype or torch.float32
    on_cuda = runtime.uses_cuda()
    kwargs: dict[str, Any] = dict(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        ffn_hidden_size=config.ffn_hidden_size or 4 * config.hidden_size,
        num_query_groups=config.num_query_groups,
        kv_channels=config.kv_channels,
        normalization=config.normalization,
        layernorm_zero_centered_gamma=config.layernorm_zero_centered_gamma,
        layernorm_epsilon=config.layernorm_epsilon,
        add_bias_linear=config.add_bias_linear,
        add_qkv_bias=config.add_qkv_bias,
        qk_layernorm=config.qk_layernorm,
        init_method_std=config.init_method_std,
        hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        apply_query_key_layer_scaling=config.apply_query_key_layer_scaling,
        masked_softmax_fusion=config.masked_softmax_fusion and on_cuda,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        sequence_parallel=layout.sequence_parallel and layout.tensor_model_parallel_size > 1,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_cuda,
        perform_initialization=True,
        cross_entropy_loss_fusion=False,
        # Loss functions return (sum, num_tokens); megatron divides gradients by the global
        # token count (finalize_model_grads), so losses are per-token means over the global batch.
        calculate_per_token_loss=True,
    )
    kwargs.update(_activation_fields(config.activation))
    kwargs.update(config.extra)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(
    config: GPTModelConfig,
    layout: ParallelLayout | None = None,
    vocab_size: int | None = None,
    params_dtype: Any = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
) -> Any:
    """Build the local pipeline stage of ``config`` at ``layout`` (megatron's parallel state set).

    Args:
        config: architecture.
        layout: parallel sizes; must match megatron's initialized parallel state.
        vocab_size: padded vocabulary size when ``config.vocab_size`` is unset.
        params_dtype: parameter dtype (fp32 by default).
        pre_process: whether this stage holds the embedding (default: first PP stage).
        post_process: whether this stage holds the output layer (default: last PP stage).

    Returns:
        A megatron-core ``GPTModel`` (or ``MambaModel``) on the current device.
    """
    from megatron.core import parallel_state

    vocab = config.vocab_size or vocab_size
    if vocab is None:
        raise ValueError("model config: vocab_size is unset and no tokenizer gave one")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    tconfig = transformer_config(config, layout, params_dtype)
    if config.model_type == "mamba":
        return _build_mamba(config, tconfig, vocab, pre_process, post_process)

    from megatron.core.models.gpt import GPTModel

    use_te = uses_transformer_engine(config)
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    else:
        spec = local_block_spec(tconfig, config.qk_layernorm)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=config.padded_max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        rotary_percent=config.rotary_percent,
        rotary_base=config.rotary_base,
        rope_scaling=config.rope_scaling,
        rope_scaling_factor=config.rope_scaling_factor,
    )
    return _place(model, tconfig.params_dtype)


def _place(model: Any, params_dtype: Any) -> Any:
    """The model on the run's device, every floating-point tensor in ``params_dtype``.

    megatron leaves a few modules in fp32 whatever ``params_dtype`` says (the learned position
    embedding is a plain ``torch.nn.Embedding``) and relies on ``Float16Module`` to cast the
    whole model. A model used without that wrapper (the teacher cache, notebooks) would feed fp32
    activations into bf16 layers; casting here makes the built model what ``params_dtype`` says.
    """
    from kd_module.parallel import runtime

    return model.to(device=runtime.run_device(), dtype=params_dtype)


class LocalNorm:
    """Norm factory for the local spec: :class:`kd_module.models.norms.LocalLayerNorm` or
    :class:`kd_module.models.norms.LocalRMSNorm`, by ``config.normalization`` (megatron's
    build_module
    calls it with the norm arguments of ``WrappedTorchNorm``)."""

    def __new__(
        cls,
        config: Any,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> Any:
        from kd_module.models.norms import LocalLayerNorm, LocalRMSNorm

        norm = LocalRMSNorm if config.normalization == "RMSNorm" else LocalLayerNorm
        return norm(config, hidden_size, eps)


def local_block_spec(tconfig: Any, qk_layernorm: bool = False) -> Any:
    """megatron's local GPT layer spec with :class:`LocalNorm` for every norm, as a block spec."""
    import copy

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = copy.deepcopy(get_gpt_layer_local_spec(qk_layernorm=qk_layernorm))

    def replace_norms(spec: Any) -> None:
        submodules = spec.submodules if isinstance(spec, ModuleSpec) else spec
        if submodules is None or not dataclasses.is_dataclass(submodules):
            return
        for item in dataclasses.fields(submodules):
            value = getattr(submodules, item.name)
            if value is WrappedTorchNorm:
                setattr(submodules, item.name, LocalNorm)
            elif isinstance(value, ModuleSpec):
                if value.module is WrappedTorchNorm:
                    value.module = LocalNorm
                replace_norms(value)

    replace_norms(layer)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(tconfig), layer_norm=LocalNorm
    )


def mamba_problems(cuda: bool | None = None) -> list[str]:
    """Why megatron's MambaModel cannot run here: it needs a CUDA run, the mamba-ssm and
    causal-conv1d kernels, and Transformer Engine (megatron's Mamba layer spec is built from TE
    modules)."""
    import importlib.util

    from kd_module.parallel import runtime

    cuda = runtime.uses_cuda() if cuda is None else cuda
    missing = [] if cuda else ["a CUDA run"]
    missing += [
        package
        for package, module in (
            ("mamba-ssm", "mamba_ssm"),
            ("causal-conv1d", "causal_conv1d"),
            ("transformer-engine", "transformer_engine"),
        )
        if importlib.util.find_spec(module) is None
    ]
    if not missing:
        return []
    return [
        "model_type='mamba' needs CUDA, Transformer Engine and the mamba-ssm and causal-conv1d "
        f"kernels (missing: {', '.join(missing)}; pip install 'megatron-kd[te]' mamba-ssm "
        "causal-conv1d on a GPU machine); use model_type='gpt' here"
    ]


def mamba_available() -> bool:
    """Whether megatron's MambaModel can run here (see :func:`mamba_problems`)."""
    return not mamba_problems()


def check_mamba_available() -> None:
    """Raise the configuration-time error for Mamba models on a machine that cannot run them."""
    problems = mamba_problems()
    if problems:
        raise ValueError("model config: " + "; ".join(problems))


def _build_mamba(config: GPTModelConfig, tconfig: Any, vocab: int, pre: bool, post: bool) -> Any:
    check_mamba_available()
    from megatron.core.models.mamba import MambaModel
    from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec

    model = MambaModel(
        config=tconfig,
        mamba_stack_spec=mamba_stack_spec,
        vocab_size=vocab,
        max_sequence_length=config.padded_max_position_embeddings,
        hybrid_override_pattern=config.hybrid_override_pattern,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        rotary_percent=config.rotary_percent,
        rotary_base=config.rotary_base,
    )
    return _place(model, tconfig.params_dtype)
