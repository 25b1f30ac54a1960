"""Baseline Mistral: RMSNorm, RoPE, GQA, SwiGLU, causal sliding-window attention.

Built as a megatron-core ``GPTModel`` from the local layer spec, with our core attention swapped
in. Tensor and pipeline parallelism come from megatron's layers and process groups; this file
only describes the model.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import SlidingWindowCoreAttention
from model.config import ModelConfig, ParallelConfig
from model.mistral import decode


def transformer_config(cfg: ModelConfig, par: ParallelConfig):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from kernels import rotary

    rotary.install()  # before TransformerConfig: it checks that a fused RoPE is available
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if par.dtype == "bf16" else torch.float32
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,            # SwiGLU: silu(x W_gate) * (x W_up)
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=par.dtype == "bf16",
        # Fused CUDA paths off on CPU (see FINDINGS.md); megatron picks them on GPU.
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=True,            # megatron's hook for a fused RoPE: kernels/rotary.py
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        batch_p2p_comm=on_gpu,             # the batched path calls torch.cuda.synchronize
        # Activation checkpointing: keep each layer's input, recompute the layer in backward.
        recompute_granularity="full" if par.recompute else None,
        recompute_method="uniform" if par.recompute else None,
        recompute_num_layers=1 if par.recompute else None,
        sequence_parallel=par.sequence_parallel,
    )


def _quiet_row_parallel_group() -> None:
    """megatron-core 0.16.1's ``RowParallelLinear.forward`` passes ``tp_group=None`` down, so each
    call resolves the default group through a ``warnings.warn``: Python overhead on the hot path,
    and under torch.compile a graph break inside every layer that sends the whole transformer
    block back to eager. Resolve None to the default group without the warning, as upstream's
    own helper then does."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import layers

    def tp_group_or_default(tp_group, is_expert=False, check_initialized=True):
        if not dist.is_initialized():
            return None
        if tp_group is not None or not parallel_state.is_initialized():
            return tp_group
        return (parallel_state.get_expert_tensor_parallel_group(check_initialized)
                if is_expert else parallel_state.get_tensor_model_parallel_group(check_initialized))

    layers.get_tensor_model_parallel_group_if_none = tp_group_or_default


def _seeded_layer_class():
    """megatron's TransformerLayer, initialized from (seed, global layer number) alone.

    megatron draws every layer's initial weights from one RNG stream in construction order, so
    the second pipeline stage would start where the first stage's stream starts and get other
    weights than in a one-stage run. Reseeding per layer makes the initial model independent of
    the layout: PP=2 trains the same model as PP=1 (and as TP=2: CPU init splits full tensors).
    The output layer, built after the last layer, then also draws the same numbers everywhere."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

    class SeededTransformerLayer(TransformerLayer):
        def __init__(self, config, submodules, layer_number: int = 1, *args, init_seed: int = 0,
                     **kwargs):
            pp_rank = (parallel_state.get_pipeline_model_parallel_rank()
                       if parallel_state.model_parallel_is_initialized() else 0)
            global_number = layer_number + get_transformer_layer_offset(config, None, pp_rank)
            torch.manual_seed((init_seed * 1_000_003 + global_number) % 2**63)
            super().__init__(config, submodules, layer_number, *args, **kwargs)

    return SeededTransformerLayer


class _KnownMLPSubclass(logging.Filter):
    """megatron's TransformerLayer logs "Unknown MLP type" for any MLP class other than its own
    (and then passes no TP group, which MLP resolves itself): expected for our subclass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


def _swiglu_mlp_class():
    """megatron's MLP with the gated activation done by ``kernels.swiglu`` (fused on CUDA)."""
    from megatron.core.transformer.mlp import MLP

    from kernels.swiglu import swiglu

    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _KnownMLPSubclass) for f in layer_logger.filters):
        layer_logger.addFilter(_KnownMLPSubclass())

    class SwiGLUMLP(MLP):
        def forward(self, hidden_states, per_token_scale=None, **kwargs):
            assert per_token_scale is None, "per-token scaling is a MoE feature"
            intermediate, _ = self.linear_fc1(hidden_states)  # [gate | up], no bias
            return self.linear_fc2(swiglu(intermediate))

    return SwiGLUMLP


def layer_spec(cfg: ModelConfig, init_seed: int = 0, core_attention=None):
    """megatron's local GPT layer with our core attention (the sliding-window baseline unless a
    variant passes its own ``ModuleSpec``), RMSNorm and SwiGLU from ``kernels/``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from kernels.rmsnorm import RMSNorm

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.module = _seeded_layer_class()
    spec.params = {**spec.params, "init_seed": init_seed}
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    spec.submodules.mlp.module = _swiglu_mlp_class()
    spec.submodules.self_attention.submodules.core_attention = core_attention or ModuleSpec(
        module=SlidingWindowCoreAttention,
        params={"sliding_window": cfg.sliding_window, "backend": cfg.attention_backend})
    return spec


def _gpt_model_class():
    from megatron.core.models.gpt import GPTModel

    from kernels.cross_entropy import cross_entropy

    class GPTModelWithOurLoss(GPTModel):
        """GPTModel whose loss over unsharded logits (TP = 1) is ``kernels.cross_entropy``;
        vocabulary-sharded logits keep megatron's vocab-parallel loss."""

        def compute_language_model_loss(self, labels, logits):
            if self.config.tensor_model_parallel_size > 1:
                return super().compute_language_model_loss(labels, logits)
            # logits [s, b, V], labels [b, s] -> loss [b, s], as megatron returns it
            return cross_entropy(logits, labels.transpose(0, 1)).transpose(0, 1).contiguous()

    return GPTModelWithOurLoss


class MistralLM(nn.Module):
    """``forward(input_ids [b, s], labels [b, s], segment_ids [b, s] | None) -> per-token loss
    [b, s]`` (nats, fp32).

    Under pipeline parallelism this rank holds one stage: the first embeds, the last computes the
    loss, the others return hidden states; megatron's schedule feeds each stage its input through
    ``set_input_tensor``. Initial weights depend on the torch seed only, not on the layout."""

    def __init__(self, cfg: ModelConfig, par: ParallelConfig, core_attention=None):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

        from kernels.rmsnorm import RMSNorm

        _quiet_row_parallel_group()
        staged = parallel_state.model_parallel_is_initialized()
        self.cfg = cfg
        self.init_seed = torch.initial_seed()
        config = transformer_config(cfg, par)
        spec = layer_spec(cfg, self.init_seed, core_attention)
        self.gpt = _gpt_model_class()(
            config=config,
            # The block megatron would build from a layer spec, with our RMSNorm as the final norm.
            transformer_layer_spec=TransformerBlockSubmodules(
                layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm),
            pre_process=parallel_state.is_pipeline_first_stage() if staged else True,
            post_process=parallel_state.is_pipeline_last_stage() if staged else True,
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.seq_length,
            share_embeddings_and_output_weights=cfg.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.rope_theta),
        )
        self.register_buffer("position_ids", torch.arange(cfg.seq_length)[None], persistent=False)
        # What megatron's pipeline schedules look up on the model they drive.
        self.config, self.model_type = self.gpt.config, self.gpt.model_type

    def set_input_tensor(self, tensor) -> None:
        self.gpt.set_input_tensor(tensor)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        # Causality and the window live in the core attention module; a mask is only needed to
        # keep packed documents apart (True = masked, megatron's convention). RoPE is relative,
        # so positions need no reset at document starts.
        blocked = None
        if segment_ids is not None:
            blocked = (segment_ids[:, None, :, None] != segment_ids[:, None, None, :])
        return self.gpt(input_ids, positions, blocked, labels=labels,
                        decoder_input=self.embed(input_ids, positions))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """Decoder input ``[s, b, h]`` for variants that add to the token embedding; None lets
        megatron embed (and is required on pipeline stages after the first)."""
        return None

    def core_attentions(self) -> list[nn.Module]:
        return [layer.self_attention.core_attention for layer in self.gpt.decoder.layers]

    def kv_cache(self, attention: SlidingWindowCoreAttention):
        """An empty KV cache for one layer's core attention (a variant with its own attention
        gives its own cache)."""
        return decode.WindowCache(attention.sliding_window, self.cfg.seq_length, attention.backend)

    def initial_state(self, batch: int) -> decode.DecodeState:
        """Incremental decoding (IncrementalDecoder, model/mistral/decode.py): KV caches."""
        return decode.initial_state(self, batch)

    def step(self, token: torch.Tensor, state: decode.DecodeState) -> tuple[torch.Tensor, decode.DecodeState]:
        return decode.step(self, token, state)


def parameter_count(cfg: ModelConfig) -> int:
    """Closed form, no allocation (used by --dry-run for 7B shapes)."""
    h, f, v, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.num_layers
    head_dim = h // cfg.num_attention_heads
    attn = h * h + 2 * h * cfg.num_query_groups * head_dim + h * h
    mlp = 3 * h * f
    per_layer = attn + mlp + 2 * h
    return v * h + L * per_layer + h + (0 if cfg.tie_embeddings else v * h)


def build(cfg: ModelConfig, par: ParallelConfig) -> MistralLM:
    return MistralLM(cfg, par)


def training_flops_per_token(cfg: ModelConfig) -> float:
    """Forward + backward FLOPs per token: 6 x (parameters in matmuls) + the attention matmuls,
    12 x layers x hidden x attended context (PaLM appendix B convention, causal masking not
    discounted; a sliding window bounds the context). The input embedding is a lookup: excluded."""
    matmul_params = parameter_count(cfg) - cfg.vocab_size * cfg.hidden_size
    context = min(cfg.seq_length, cfg.sliding_window) if cfg.sliding_window else cfg.seq_length
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * cfg.hidden_size * context
