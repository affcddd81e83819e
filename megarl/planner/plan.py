"""Dry-run plan of a resolved config: does the layout fit the model and the cluster, and the memory.

    plan = plan_run(cfg)            # reads cfg.model.path/config.json
    print(format_plan(plan))
    if plan.errors: sys.exit(2)

Layout rules come from `megarl.distributed.validate_layout` (megatron-core's own constraints); this
module adds what depends on the rest of the config: rollout TP against the attention heads, the
batch against the data-parallel size, GPU counts of a disaggregated placement, and the memory plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megarl.config.resolve import rollout_gpus, train_gpus
from megarl.distributed import LayoutError, ModelShape, ParallelLayout, validate_layout
from megarl.planner.memory import GIB, MemoryPlan, ParallelSizes, estimate_memory
from megarl.planner.model_stats import ModelStats, load_hf_config
from megarl.planner.sync_model import SyncPlan, format_sync_plan, plan_sync

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class RunPlan:
    stats: ModelStats | None
    parallel: ParallelSizes | None
    memory: MemoryPlan | None
    sync: SyncPlan | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def parallel_layout(cfg) -> ParallelLayout:
    p = cfg.parallel
    return ParallelLayout(tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep, etp=p.etp, cp=p.cp,
                          sequence_parallel=p.sequence_parallel,
                          num_layers_in_last_pipeline_stage=p.num_layers_in_last_pipeline_stage)


def plan_run(cfg, hf_config: dict | None = None) -> RunPlan:
    """Check `cfg` (resolved MegaRLConfig) against its model and cluster; estimate memory per GPU."""
    if hf_config is None:
        hf_config = load_hf_config(cfg.model.path)
    stats = ModelStats.from_hf_config(hf_config)
    plan = RunPlan(stats=stats, parallel=None, memory=None)
    world_train = train_gpus(cfg)
    try:
        validate_layout(parallel_layout(cfg), world_train, ModelShape.from_hf_config(hf_config))
    except LayoutError as exc:
        plan.errors.append(f"parallel: {exc} (training world: {world_train} GPUs)")
    rl = cfg.trainer.type == "rl"  # SFT / DPO have no rollout engines
    if rl:
        _check_rollout(cfg, stats, plan)
    if plan.errors:
        return plan
    p = cfg.parallel
    plan.parallel = ParallelSizes(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, cp=p.cp, vpp=p.vpp,
                                  sequence_parallel=p.sequence_parallel, train_gpus=world_train,
                                  num_layers_in_last_pipeline_stage=p.num_layers_in_last_pipeline_stage)
    if rl:
        _check_batch(cfg, plan)
    plan.memory = estimate_memory(cfg, stats, plan.parallel)
    _check_memory(cfg, plan)
    if rl:
        plan.sync = plan_weight_sync(cfg, stats, plan.parallel)
    return plan


def plan_weight_sync(cfg, stats: ModelStats, parallel: ParallelSizes) -> SyncPlan:
    """The modelled trainer → rollout push of this run (megarl.planner.sync_model)."""
    r = cfg.rollout
    transport = r.weight_sync.transport
    if transport == "auto":  # what the trainer picks on GPUs
        transport = "cuda_ipc" if r.placement == "colocated" else "nccl"
    return plan_sync(stats, parallel, bytes_per_param=_DTYPE_BYTES[cfg.model.dtype], rollout_tp=r.tensor_parallel_size,
                     num_engines=r.num_engines or rollout_gpus(cfg) // r.tensor_parallel_size,
                     gpus_per_node=cfg.trainer.gpus_per_node, bucket_bytes=int(r.weight_sync.bucket_mb * 2**20),
                     transport=transport)


def _check_rollout(cfg, m: ModelStats, plan: RunPlan) -> None:
    r = cfg.rollout
    rtp = r.tensor_parallel_size
    if m.num_attention_heads % rtp:
        plan.errors.append(f"rollout.tensor_parallel_size: {rtp} does not divide the model's "
                           f"{m.num_attention_heads} attention heads (vLLM splits heads over TP)")
    elif m.num_kv_heads % rtp and rtp % m.num_kv_heads:
        plan.errors.append(f"rollout.tensor_parallel_size: {rtp} and the model's {m.num_kv_heads} KV heads must "
                           "divide one another (vLLM splits or replicates KV heads over TP)")
    if r.engine == "vllm" and rtp > cfg.trainer.gpus_per_node:
        plan.warnings.append(f"rollout.tensor_parallel_size: {rtp} spans {rtp // cfg.trainer.gpus_per_node} nodes; "
                             "each engine's all-reduces cross the inter-node network")
    if rollout_gpus(cfg) % rtp:
        plan.errors.append(f"rollout.tensor_parallel_size: {rtp} does not divide the {rollout_gpus(cfg)} rollout GPUs")


def _check_batch(cfg, plan: RunPlan) -> None:
    dp = plan.parallel.dp
    n = cfg.rollout.n
    mini = cfg.actor.ppo_mini_batch_size * n
    if mini % dp:
        plan.errors.append(f"actor.ppo_mini_batch_size: {cfg.actor.ppo_mini_batch_size} prompts x rollout.n {n} = "
                           f"{mini} sequences do not split evenly over data-parallel size {dp}")


def _check_memory(cfg, plan: RunPlan) -> None:
    mem = plan.memory
    gpu = mem.gpu_memory_bytes
    worst = mem.worst_stage
    if worst.train_peak_bytes > gpu:
        plan.warnings.append(
            f"memory: pipeline stage {worst.stage} needs ~{worst.train_peak_bytes / GIB:.1f} GiB per GPU to train "
            f"(> {cfg.trainer.gpu_memory_gib:g} GiB): raise optimizer_offload_fraction, recompute, pp/ep, or "
            "lower the token budget")
    if cfg.trainer.type == "rl":
        _check_rollout_memory(cfg, plan)
    host = cfg.trainer.host_memory_gib
    if host is not None and mem.host_bytes_per_node > host * GIB:
        plan.warnings.append(f"memory: offloaded state needs ~{mem.host_bytes_per_node / GIB:.0f} GiB of host memory "
                             f"per node (> trainer.host_memory_gib={host:g})")


def _check_rollout_memory(cfg, plan: RunPlan) -> None:
    r, gpu = plan.memory.rollout, plan.memory.gpu_memory_bytes
    if r.kv_budget_bytes <= 0:
        plan.warnings.append(
            f"memory: the rollout engine's weights ({r.weight_bytes_per_gpu / GIB:.1f} GiB per GPU) leave no KV "
            f"cache within rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization}: raise it or "
            "rollout.tensor_parallel_size")
    elif r.kv_tokens < r.max_sequence_len:
        plan.warnings.append(f"memory: the KV cache holds {r.kv_tokens} tokens, less than one full sequence "
                             f"({r.max_sequence_len})")
    if cfg.rollout.placement == "colocated":
        free = gpu * (1 - cfg.rollout.gpu_memory_utilization)
        if r.resident_train_bytes > free:
            plan.warnings.append(
                f"memory: {r.resident_train_bytes / GIB:.1f} GiB of training state stays on each GPU during rollout "
                f"but only {free / GIB:.1f} GiB is outside vLLM's share: enable actor.param_offload/grad_offload/"
                "optimizer_offload or lower rollout.gpu_memory_utilization")


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def format_plan(plan: RunPlan, cfg) -> str:
    """Human-readable plan: model, layout, per-GPU memory by stage, rollout KV, host memory."""
    lines = []
    m = plan.stats
    if m is not None:
        lines.append(f"model: {m.model_type}, {m.num_layers} layers, hidden {m.hidden_size}, "
                     f"{m.num_attention_heads} heads / {m.num_kv_heads} KV heads"
                     + (f", {m.num_experts} experts top-{m.experts_per_token}" if m.is_moe else ""))
        lines.append(f"parameters: {m.total_params / 1e9:.2f}B total, {m.active_params / 1e9:.2f}B active per token")
    par = plan.parallel
    if par is not None:
        mem = plan.memory
        lines.append(f"cluster: {cfg.trainer.nnodes} nodes x {cfg.trainer.gpus_per_node} GPUs = {cfg.world_size}; "
                     f"training on {par.train_gpus}, rollout placement {cfg.rollout.placement}")
        lines.append(f"training layout: TP {par.tp} x PP {par.pp}{f' (VPP {par.vpp})' if par.vpp else ''} x CP {par.cp}"
                     f" x DP {par.dp}; experts: EP {par.ep} x ETP {par.etp} x expert-DP {par.expert_dp}"
                     f"{'; sequence parallel' if par.sequence_parallel else ''}")
        counts = [s.layers for s in mem.stages]
        lines.append(f"layers per pipeline stage: {counts}")
        if m.is_moe:
            lines.append(f"experts per EP rank: {m.num_experts // par.ep}; attention heads per TP rank: "
                         f"{m.num_attention_heads // par.tp}; KV heads per TP rank: {max(m.num_kv_heads // par.tp, 1)}")
        lines.append(f"micro-batch: {mem.tokens_per_microbatch} tokens per GPU"
                     f"{' (dynamic token budget)' if cfg.actor.use_dynamic_bsz else ''}; recompute: "
                     f"{cfg.parallel.recompute.granularity or 'none'}")
        lines.append("per-GPU training memory (GiB) by pipeline stage:")
        lines.append("  stage layers  params(B)   weights     grads  optim-GPU  optim-host  ref+critic  activations   peak")
        for s in mem.stages:
            lines.append(f"  {s.stage:5d} {s.layers:6d} {s.params / 1e9:10.3f} {_gib(s.param_bytes)} {_gib(s.grad_bytes)}"
                         f"   {_gib(s.optimizer_gpu_bytes)}    {_gib(s.optimizer_host_bytes)}    {_gib(s.other_models_bytes)}"
                         f"     {_gib(s.activation_bytes)} {_gib(s.train_peak_bytes)}")
        r = mem.rollout
        if cfg.trainer.type != "rl":
            lines.append(f"no rollout ({cfg.trainer.type}): every GPU trains")
        else:
            lines.append(f"rollout (TP {r.tensor_parallel_size}, {cfg.rollout.num_engines} engines): weights "
                         f"{r.weight_bytes_per_gpu / GIB:.2f} GiB/GPU, KV budget {r.kv_budget_bytes / GIB:.2f} GiB/GPU = "
                         f"{r.kv_tokens:,} tokens per engine ({r.kv_bytes_per_token / 1024:.1f} KiB/token/GPU), "
                         f"{r.full_length_sequences:,} sequences of {r.max_sequence_len} tokens at once")
        if cfg.rollout.placement == "colocated" and cfg.trainer.type == "rl":
            lines.append(f"training state left on each GPU during rollout: {r.resident_train_bytes / GIB:.2f} GiB")
        lines.append(f"host memory per node for offloaded state: {mem.host_bytes_per_node / GIB:.1f} GiB")
        if plan.sync is not None:
            lines.extend(format_sync_plan(plan.sync))
    for w in plan.warnings:
        lines.append(f"WARNING {w}")
    for e in plan.errors:
        lines.append(f"ERROR {e}")
    lines.append("plan: OK" if not plan.errors else f"plan: {len(plan.errors)} error(s)")
    return "\n".join(lines)
