"""Per-GPU memory estimate of a run: training state, activations, rollout KV cache, host offload.

An estimate for choosing a layout before a cluster is booked, not a measurement. Assumptions (all
stated in `MemoryAssumptions`): bf16/fp16 weights, fp32 main gradients (megatron's DDP buffer), Adam
with fp32 master weights + two fp32 moments (12 bytes per parameter, sharded over data-parallel
ranks by the distributed optimizer), flash attention (no seq² score matrices kept), vocab padded to a
multiple of 128 x TP, 1F1B pipeline schedule (stage s keeps pp - s micro-batches in flight).

Per token and layer, the activations kept for backward are counted tensor by tensor (see
`_layer_activation_elems`); with sequence parallelism the layer-boundary tensors are split over TP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megarl.planner.model_stats import ModelStats

GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class MemoryAssumptions:
    grad_bytes: int = 4
    """Megatron DDP main-gradient buffer (fp32)."""
    optimizer_bytes: int = 12
    """Adam: fp32 master copy + exp_avg + exp_avg_sq per parameter."""
    cpu_optimizer_grad_bytes: int = 4
    """The CPU part of the hybrid optimizer keeps an fp32 host copy of its parameters' gradients."""
    logits_bytes: int = 4
    """fp32 logits on the last stage (log-probs / entropy are computed in fp32)."""
    logits_copies: int = 2
    """logits + their gradient (or the softmax workspace)."""
    vocab_pad_multiple: int = 128
    rollout_overhead_gib: float = 3.0
    """vLLM's own activations, CUDA graphs and allocator slack inside its memory share."""


@dataclass(frozen=True)
class ParallelSizes:
    """The layout numbers the estimate needs (train GPUs, not the whole world when disaggregated)."""

    tp: int
    pp: int
    ep: int
    etp: int
    cp: int
    vpp: int | None
    sequence_parallel: bool
    train_gpus: int
    num_layers_in_last_pipeline_stage: int | None = None

    @property
    def dp(self) -> int:
        return self.train_gpus // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        return self.train_gpus // (self.etp * self.ep * self.pp)


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage's per-GPU numbers (bytes unless named otherwise)."""

    stage: int
    layers: int
    dense_params: int
    """Parameters on one GPU outside the routed experts (attention, norms, router, embeddings)."""
    expert_params: int
    """Routed-expert parameters on one GPU (num_experts / EP experts, each split by ETP)."""
    param_bytes: int
    grad_bytes: int
    optimizer_gpu_bytes: int
    optimizer_host_bytes: int
    activation_bytes: int
    in_flight_microbatches: int
    reference_bytes: int = 0
    """The frozen reference's weights (when a KL term needs them)."""
    critic_bytes: int = 0
    """PPO: the critic's weights + gradients + GPU optimizer states (its LM head replaced by a value
    head, so the actor's state less the output layer)."""

    @property
    def params(self) -> int:
        return self.dense_params + self.expert_params

    @property
    def other_models_bytes(self) -> int:
        return self.reference_bytes + self.critic_bytes

    @property
    def actor_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_gpu_bytes

    @property
    def train_peak_bytes(self) -> int:
        return self.actor_bytes + self.other_models_bytes + self.activation_bytes


@dataclass(frozen=True)
class RolloutPlan:
    tensor_parallel_size: int
    weight_bytes_per_gpu: int
    kv_bytes_per_token: int
    """K and V of one token, all layers, on one GPU of the engine."""
    kv_budget_bytes: int
    kv_tokens: int
    """Tokens the engine's KV cache holds (every GPU of an engine holds its slice of the same tokens)."""
    max_sequence_len: int
    resident_train_bytes: int
    """Training state left on each GPU while the engine runs (colocated; 0 when disaggregated)."""

    @property
    def full_length_sequences(self) -> int:
        return self.kv_tokens // self.max_sequence_len if self.max_sequence_len else 0


@dataclass(frozen=True)
class MemoryPlan:
    stages: list[StagePlan]
    rollout: RolloutPlan
    host_bytes_per_node: int
    gpu_memory_bytes: int
    tokens_per_microbatch: int
    assumptions: MemoryAssumptions = field(default_factory=MemoryAssumptions)

    @property
    def worst_stage(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.train_peak_bytes)


def stage_layer_counts(num_layers: int, pp: int, last: int | None) -> list[int]:
    """Layers per pipeline stage (megatron's even split, or `last` on the last stage)."""
    if pp == 1:
        return [num_layers]
    if last is None:
        return [num_layers // pp] * pp
    return [(num_layers - last) // (pp - 1)] * (pp - 1) + [last]


def padded_vocab(vocab: int, tp: int, multiple: int) -> int:
    step = multiple * tp
    return math.ceil(vocab / step) * step


def _layer_activation_elems(m: ModelStats, layer: int, par: ParallelSizes) -> float:
    """Elements saved for backward per token in one layer on one GPU (before the CP split)."""
    h, tp = m.hidden_size, par.tp
    boundary = h / tp if par.sequence_parallel else h  # tensors in the sequence-parallel region
    q_dim, kv_dim = m.num_attention_heads * m.head_dim, m.num_kv_heads * m.head_dim
    # attention: norm output, q/k/v, attention output (input of o_proj), flash-attn softmax stats ~0
    attn = boundary + (q_dim + 2 * kv_dim) / tp + q_dim / tp
    if m.moe_layers[layer]:
        k, f, etp = m.experts_per_token, m.moe_intermediate_size, par.etp
        # Under sequence parallelism each TP rank routes only its 1/TP of the tokens. Per routed token:
        # router probabilities (fp32 = 2 bf16 elems), k dispatched copies in and k expert outputs out
        # (ETP ranks all see their experts' tokens), fc1 output (gate+up) and activation (width / ETP).
        routed = 1 / tp if par.sequence_parallel else 1
        mlp = boundary + routed * (2 * m.num_experts + 2 * k * h * etp + k * 3 * f)
    else:
        mlp = boundary + 3 * m.intermediate_size / tp
    return attn + mlp


def activation_bytes(m: ModelStats, par: ParallelSizes, layers: range, in_flight: int, tokens: int,
                     act_bytes: int, recompute) -> int:
    """Activations one GPU of the stage holding `layers` keeps at its peak."""
    tokens_local = tokens / par.cp
    full = [_layer_activation_elems(m, i, par) * tokens_local * act_bytes for i in layers]
    vpp = par.vpp or 1
    if vpp > 1:  # interleaved 1F1B: rank 0 keeps (pp-1)*2 + (vpp-1)*pp + 1 chunk-micro-batches
        chunk_units = (par.pp - 1) * 2 + (vpp - 1) * par.pp + 1
        in_flight_layers = chunk_units * len(layers) / vpp
    else:
        in_flight_layers = in_flight * len(layers)
    if recompute.granularity == "full":
        boundary = (m.hidden_size / par.tp if par.sequence_parallel else m.hidden_size) * tokens_local * act_bytes
        group = recompute.num_layers or 1
        # uniform: a checkpoint every `group` layers; block: the first `group` layers of a stage are
        # recomputed and the rest keep everything.
        if recompute.method == "block":
            kept = max(len(layers) - group, 0)
            per_mb = group * boundary + (sum(full[group:]) if kept else 0)
            return int(per_mb * in_flight_layers / max(len(layers), 1) + max(full[:group], default=0) * group)
        checkpoints = math.ceil(len(layers) / group)
        return int(boundary * checkpoints * in_flight_layers / max(len(layers), 1) + max(full, default=0) * group)
    return int(sum(full) / max(len(layers), 1) * in_flight_layers)


def estimate_memory(cfg, m: ModelStats, par: ParallelSizes,
                    assume: MemoryAssumptions = MemoryAssumptions()) -> MemoryPlan:
    """Per-GPU memory plan of the resolved config `cfg` (a MegaRLConfig) for model `m`."""
    weight_bytes = DTYPE_BYTES[cfg.model.dtype]
    opt, actor, rollout = cfg.optimizer, cfg.actor, cfg.rollout
    seq_len = {"rl": cfg.data.max_prompt_length + rollout.max_new_tokens, "sft": cfg.sft.max_length,
               "dpo": 2 * cfg.dpo.max_length}[cfg.trainer.type]  # (a DPO micro-batch item is a pair)
    tokens = actor.max_token_len_per_gpu if actor.use_dynamic_bsz else actor.micro_batch_size * seq_len
    vocab_local = padded_vocab(m.vocab_size, par.tp, assume.vocab_pad_multiple) // par.tp
    offload = opt.optimizer_offload_fraction if opt.optimizer_cpu_offload else 0.0

    stages, start = [], 0
    counts = stage_layer_counts(m.num_layers, par.pp, par.num_layers_in_last_pipeline_stage)
    for s, n_layers in enumerate(counts):
        layers = range(start, start + n_layers)
        start += n_layers
        dense = sum((m.attention_linear_params + (m.dense_mlp_params if not m.moe_layers[i] else 0)) // par.tp
                    + m.layer_norm_params + (m.router_params if m.moe_layers[i] else 0) for i in layers)
        experts = sum(m.layer_expert_params(i) // (par.ep * par.etp) for i in layers)
        if s == 0:
            dense += vocab_local * m.hidden_size
        if s == par.pp - 1:
            # untied: the output layer; tied with pp > 1: megatron keeps a copy of the embedding here
            if not m.tie_word_embeddings or par.pp > 1:
                dense += vocab_local * m.hidden_size
            dense += m.final_norm_params
        if opt.use_distributed_optimizer:
            opt_bytes = assume.optimizer_bytes * (dense / par.dp + experts / par.expert_dp)
        else:
            opt_bytes = assume.optimizer_bytes * (dense + experts)
        host_opt = offload * opt_bytes * (1 + assume.cpu_optimizer_grad_bytes / assume.optimizer_bytes)
        reference, critic = _other_models_bytes(cfg, dense, experts, vocab_local * m.hidden_size if s == par.pp - 1
                                                else 0, weight_bytes, par, assume)
        act = activation_bytes(m, par, layers, par.pp - s, tokens, weight_bytes, cfg.parallel.recompute)
        if s == par.pp - 1:
            act += int(tokens / par.cp * vocab_local * assume.logits_bytes * assume.logits_copies)
        stages.append(StagePlan(
            stage=s, layers=n_layers, dense_params=dense, expert_params=experts,
            param_bytes=(dense + experts) * weight_bytes, grad_bytes=(dense + experts) * assume.grad_bytes,
            optimizer_gpu_bytes=int((1 - offload) * opt_bytes), optimizer_host_bytes=int(host_opt),
            activation_bytes=act, in_flight_microbatches=par.pp - s,
            reference_bytes=reference, critic_bytes=critic,
        ))

    gpu_bytes = int(cfg.trainer.gpu_memory_gib * GIB)
    worst = max(stages, key=lambda st: st.train_peak_bytes)
    return MemoryPlan(
        stages=stages,
        rollout=_rollout_plan(cfg, m, worst, gpu_bytes, weight_bytes, assume),
        host_bytes_per_node=_host_bytes(cfg, worst),
        gpu_memory_bytes=gpu_bytes,
        tokens_per_microbatch=tokens,
        assumptions=assume,
    )


def _other_models_bytes(cfg, dense: int, experts: int, output_layer: int, weight_bytes: int, par: ParallelSizes,
                        assume: MemoryAssumptions) -> tuple[int, int]:
    """(reference weights when a KL term needs them, the PPO critic's training state), per GPU."""
    reference = critic = 0
    if cfg.algorithm.use_kl_loss or cfg.algorithm.use_kl_in_reward:
        reference = (dense + experts) * weight_bytes
    if cfg.algorithm.name == "ppo":
        c = cfg.critic.optimizer
        critic_dense = dense - output_layer
        opt = assume.optimizer_bytes * (critic_dense / par.dp + experts / par.expert_dp if c.use_distributed_optimizer
                                        else critic_dense + experts)
        offload = c.optimizer_offload_fraction if c.optimizer_cpu_offload else 0.0
        critic = (critic_dense + experts) * (weight_bytes + assume.grad_bytes) + int((1 - offload) * opt)
    return int(reference), int(critic)


def _rollout_plan(cfg, m: ModelStats, worst: StagePlan, gpu_bytes: int, weight_bytes: int,
                  assume: MemoryAssumptions) -> RolloutPlan:
    r, actor = cfg.rollout, cfg.actor
    rtp = r.tensor_parallel_size
    weights = m.total_params * weight_bytes // rtp  # vLLM shards attention heads and experts over TP
    # KV heads are split over TP; with TP > kv heads each GPU keeps one (replicated) KV head.
    kv_heads_local = max(m.num_kv_heads // rtp, 1)
    kv_per_token = 2 * m.num_layers * kv_heads_local * m.head_dim * weight_bytes
    if cfg.trainer.device == "cpu":
        # vLLM's CPU backend sizes its KV cache by VLLM_CPU_KVCACHE_SPACE (the engine sets it from
        # VLLMEngineConfig.cpu_kv_cache_gb), in host memory apart from the weights; no GPU share.
        from megarl.rollout.vllm_engine import CPU_KV_CACHE_GIB

        budget = int(CPU_KV_CACHE_GIB * GIB)
    else:
        budget = int(r.gpu_memory_utilization * gpu_bytes - weights - assume.rollout_overhead_gib * GIB)
    resident = 0
    if r.placement == "colocated":
        resident += 0 if actor.param_offload else worst.param_bytes
        resident += 0 if actor.grad_offload else worst.grad_bytes
        resident += 0 if actor.optimizer_offload else worst.optimizer_gpu_bytes
        resident += 0 if actor.param_offload else worst.reference_bytes  # offloaded with the actor's params
        resident += worst.critic_bytes  # the plan has no critic offload switches
    return RolloutPlan(
        tensor_parallel_size=rtp, weight_bytes_per_gpu=weights, kv_bytes_per_token=kv_per_token,
        kv_budget_bytes=budget, kv_tokens=max(budget, 0) // kv_per_token,
        max_sequence_len=cfg.data.max_prompt_length + r.max_new_tokens, resident_train_bytes=resident,
    )


def _host_bytes(cfg, worst: StagePlan) -> int:
    """Host memory one node needs for offloaded state (a node holds one pipeline stage's ranks)."""
    actor = cfg.actor
    per_gpu = worst.optimizer_host_bytes
    per_gpu += worst.param_bytes + worst.reference_bytes if actor.param_offload else 0
    per_gpu += worst.grad_bytes if actor.grad_offload else 0
    per_gpu += worst.optimizer_gpu_bytes if actor.optimizer_offload else 0
    return per_gpu * cfg.trainer.gpus_per_node
