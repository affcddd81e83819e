"""The run configuration: one tree of typed dataclasses, loaded from a YAML recipe.

Section and field names follow what verl / slime users already know (`rollout.n`, `clip_ratio_high`,
`kl_loss_type`, `optimizer_offload_fraction`, ...). Every field is typed; `megarl.config.loader`
turns YAML + CLI overrides into this tree and rejects unknown keys, wrong types and bad enum values,
then `megarl.config.validate` checks the relations between fields.

`None` on an optional field means "derive it" (see `megarl.config.resolve`), e.g. `parallel.etp`
defaults to `parallel.tp`, `rollout.num_engines` to "as many as the rollout GPUs allow".

Batch-size units (as in verl): `data.train_batch_size` and `actor.ppo_mini_batch_size` count
PROMPTS; each prompt yields `rollout.n` responses. `actor.micro_batch_size` counts SEQUENCES per GPU.
Token budgets (`*_max_token_len_per_gpu`) count prompt + response tokens per GPU per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

Dtype = Literal["bf16", "fp16", "fp32"]


@dataclass
class ModelConfig:
    path: Optional[str] = None
    """HuggingFace model folder (config.json, *.safetensors, tokenizer). Required."""
    ref_path: Optional[str] = None
    """Reference-policy folder for the KL term; defaults to `path` (the initial policy)."""
    tokenizer_path: Optional[str] = None
    """Defaults to `path`."""
    dtype: Dtype = "bf16"
    """Compute dtype of the Megatron model and of the rollout engine."""


@dataclass
class RecomputeConfig:
    """Activation recomputation, megatron-core names (`recompute_granularity`, ...)."""

    granularity: Optional[Literal["full", "selective"]] = None
    method: Optional[Literal["uniform", "block"]] = None
    """Only with granularity=full: recompute `num_layers` per chunk (uniform) or per stage (block)."""
    num_layers: Optional[int] = None


@dataclass
class ParallelConfig:
    """Training (Megatron) parallelism. Data parallelism is what is left of the world."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    """Virtual pipeline stages (model chunks) per pipeline rank; None = no interleaving."""
    ep: int = 1
    etp: Optional[int] = None
    """Expert tensor parallelism; None = same as tp (megatron's default)."""
    cp: int = 1
    sequence_parallel: Optional[bool] = None
    """None = on whenever tp > 1 (MoE with tp > 1 requires it)."""
    num_layers_in_last_pipeline_stage: Optional[int] = None
    """Uneven pipelines: the last stage gets this many layers, the others split the rest evenly."""
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)


@dataclass
class WeightSyncConfig:
    transport: str = "auto"
    """Registered weight transport (megarl.rollout.weight_sync); auto = chosen by placement and device."""
    bucket_mb: int = 512
    """Trainer → rollout weight push is sent in buckets of about this many MiB."""
    verify: Literal["none", "digest", "checksum", "all", "logprobs"] = "none"
    """Check each push: digest = every engine hashes each received bucket and must match the sender;
    checksum = after the push all engines' full weight checksums must agree; all = both; logprobs =
    after the push every engine scores fixed probe sequences and must match the trainer's log-probs."""
    nccl_host: Optional[str] = None
    """transport=nccl: the rendezvous address the engines connect to; None = the sending rank's node IP."""
    nccl_port: int = 29555
    """transport=nccl: the base rendezvous port; sender s and engine e use nccl_port + s * engines + e."""


@dataclass
class RolloutConfig:
    engine: Literal["vllm"] = "vllm"
    """The rollout engine (megarl.rollout.vllm_engine); vLLM is the only one."""
    n: int = 8
    """Responses sampled per prompt (the GRPO group size)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 = disabled (vLLM's convention)."""
    max_new_tokens: int = 1024
    """Maximum response length in tokens (verl: data.max_response_length)."""
    tensor_parallel_size: int = 1
    num_engines: Optional[int] = None
    """None = every rollout GPU is used: (rollout GPUs) / tensor_parallel_size engines."""
    gpu_memory_utilization: float = 0.6
    """Fraction of each GPU's memory the engine may take (weights + KV cache)."""
    placement: Literal["colocated", "disaggregated"] = "colocated"
    """colocated: rollout and training time-share every GPU; disaggregated: the rollout engines get
    their own `num_engines * tensor_parallel_size` GPUs and training the rest."""
    max_turns: int = 1
    """Turns per rollout. Only 1 for now: the RL loop does not drive multi-turn rollouts yet
    (megarl.rollout.multi_turn works standalone), so > 1 is refused."""
    multi_turn_scheduler: Optional[str] = None
    """Registered scheduler name, or `module:function` / `path.py:function`; refused for now (see max_turns)."""
    enforce_eager: bool = False
    """vLLM: skip CUDA-graph capture (slower decoding, faster start, less memory)."""
    max_num_batched_tokens: Optional[int] = None
    """vLLM chunked-prefill token budget per engine step; None = vLLM's default."""
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    on_engine_failure: Literal["fail", "restart"] = "fail"
    """A rollout engine that dies (crash, OOM kill, node loss) — fail: stop the run with
    EngineDiedError; restart: start a fresh engine in its slot, push the current weights into it and
    retry the interrupted requests (generate) or the interrupted weight push."""
    max_engine_restarts: int = 3
    """restart: engine restarts allowed over the whole run (all engines together); the next failure
    stops the run. Only with on_engine_failure=restart."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Parquet / JSONL files with one prompt per row."""
    val_files: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"
    max_prompt_length: int = 1024
    """In tokens, after the chat template."""
    filter_overlong_prompts: bool = True
    truncation: Literal["error", "left", "right"] = "error"
    """What to do with a prompt longer than max_prompt_length when it is not filtered out."""
    skip_invalid_rows: bool = False
    """A row that fails its checks (missing or malformed field, empty prompt) stops start-up with the
    file and row number; true skips such rows instead, counting them in a warning."""
    shuffle: bool = True
    seed: int = 1
    train_batch_size: int = 256
    """Prompts per training step (each yields rollout.n responses)."""
    val_batch_size: Optional[int] = None
    """None = the whole validation set in one batch."""


@dataclass
class OverlongBufferConfig:
    """DAPO's soft overlong punishment: responses within `len` tokens of max_new_tokens lose up to
    `penalty_factor` reward, linearly in how far into the buffer they reach."""

    enable: bool = False
    len: int = 1024
    penalty_factor: float = 1.0


@dataclass
class RewardConfig:
    name: Union[str, list[str]] = "math"
    """Registered reward function name, or a list of names combined with `weights`."""
    weights: Optional[list[float]] = None
    """One weight per name; None = 1.0 each."""
    custom_function: Optional[str] = None
    """`module:function` or `path.py:function`, used instead of the registered names."""
    timeout_s: float = 10.0
    """Per-sample limit; a reward that takes longer scores `fallback`."""
    fallback: float = 0.0
    """Score given when the reward function raises or times out."""
    num_workers: int = 2
    """Worker processes scoring samples in parallel."""
    overlong_buffer: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)

    def terms(self) -> list[tuple[str, float]]:
        """[(name, weight), ...] with the defaults applied."""
        names = [self.name] if isinstance(self.name, str) else list(self.name)
        weights = self.weights if self.weights is not None else [1.0] * len(names)
        return list(zip(names, weights))


@dataclass
class KLControlConfig:
    """KL penalty folded into the reward (algorithm.use_kl_in_reward), verl's algorithm.kl_ctrl."""

    type: Literal["fixed", "adaptive"] = "fixed"
    kl_coef: float = 0.001
    target_kl: float = 0.1
    horizon: int = 10000


@dataclass
class TISConfig:
    """Rollout/trainer mismatch correction (truncated importance sampling): the rollout engine's
    log-probs differ from the trainer's (kernels, precision), so tokens are weighted by
    min(rho, is_cap) with rho = π_old(trainer) / π_rollout, and optionally masked when rho leaves
    [reject_below, reject_above]. Field names as megarl.algorithms.RolloutCorrectionOptions."""

    level: Literal["token", "sequence", "geometric"] = "token"
    is_cap: Optional[float] = None
    """None = no IS weighting (typical cap: 2.0)."""
    reject_above: Optional[float] = None
    reject_below: Optional[float] = None


@dataclass
class DynamicSamplingConfig:
    """DAPO's dynamic sampling: drop prompt groups whose responses all score the same (zero
    advantage) and keep generating until the batch is full again."""

    enable: bool = False
    metric: str = "score"
    max_num_gen_batches: int = 10
    """Give up (error) after generating this many batches for one step; 0 = no limit."""


@dataclass
class AlgorithmConfig:
    name: Literal["grpo", "ppo"] = "grpo"
    """grpo: critic-free (group baselines, or rloo / reinforce_plus_plus through adv_estimator);
    ppo: a Megatron critic (section `critic`) learns values and advantages come from GAE."""
    adv_estimator: Optional[str] = None
    """Registered advantage estimator (megarl.algorithms): grpo, rloo, reinforce_plus_plus, gae, ...
    None = from `name` (grpo -> grpo, ppo -> gae)."""
    norm_adv_by_std: bool = True
    """GRPO: divide group-centred rewards by the group std (False = Dr. GRPO)."""
    gamma: float = 1.0
    lam: float = 1.0
    policy_loss: str = "ppo"
    """Registered policy loss (megarl.algorithms.POLICY_LOSSES): ppo (= vanilla, PPO clip), gspo, cispo, sapo,
    geo_mean (= gmpo), clip_cov, kl_cov, dppo_tv, dppo_kl, reinforce (= gpg), dro, bypass_mode."""
    clip_ratio: float = 0.2
    clip_ratio_low: Optional[float] = None
    """None = clip_ratio. The ratio is clipped to [1 - low, 1 + high]."""
    clip_ratio_high: Optional[float] = None
    """None = clip_ratio (DAPO's clip-higher uses 0.28)."""
    clip_ratio_c: Optional[float] = 3.0
    """Dual-clip bound for negative advantages (> 1); None disables dual clip."""
    loss_agg_mode: str = "token-mean"
    """Registered (megarl.algorithms.LOSS_AGG_MODES): token-mean, seq-mean-token-sum, seq-mean-token-mean,
    seq-mean-token-sum-norm, token-sum."""
    entropy_coeff: float = 0.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    """Registered KL estimator (megarl.algorithms.KL_ESTIMATORS): k1/kl, abs, k2/mse, k3/low_var_kl, and the
    straight-through k1+/kl+, abs+, k3+/low_var_kl+ (value of the estimator, gradient of k2)."""
    tau_pos: float = 1.0
    """sapo: gate temperature for tokens with a positive advantage."""
    tau_neg: float = 1.05
    """sapo: gate temperature for tokens with a non-positive advantage."""
    clip_cov_ratio: float = 0.0002
    """clip_cov: fraction of the mini-batch's loss tokens whose gradient is removed."""
    clip_cov_lb: float = 1.0
    """clip_cov: lower bound of the covariance band the removed tokens are drawn from."""
    clip_cov_ub: float = 5.0
    """clip_cov: upper bound of that band."""
    kl_cov_ratio: float = 0.0002
    """kl_cov: fraction of the mini-batch's loss tokens (largest covariance) given the KL penalty."""
    ppo_kl_coef: float = 1.0
    """kl_cov: coefficient of the |log ratio| penalty on the selected tokens."""
    dro_beta: float = 0.1
    """dro: coefficient of the quadratic log-ratio penalty."""
    bypass_loss_type: Literal["ppo_clip", "reinforce"] = "ppo_clip"
    """bypass_mode: PPO clip against the rollout log-probs, or REINFORCE with the IS weight pi/pi_rollout
    (truncated at tis.is_cap)."""
    use_kl_in_reward: bool = False
    kl_ctrl: KLControlConfig = field(default_factory=KLControlConfig)
    tis: TISConfig = field(default_factory=TISConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)


@dataclass
class OptimizerConfig:
    """Adam(W) through megatron-core's optimizer; names as in megatron's OptimizerConfig."""

    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "cosine"] = "constant"
    lr_decay_steps: Optional[int] = None
    """None = the run's total steps."""
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    optimizer_cpu_offload: bool = False
    """Run part of the optimizer step on the CPU (megatron's HybridDeviceOptimizer)."""
    optimizer_offload_fraction: float = 0.0
    """With optimizer_cpu_offload: fraction of the optimizer states kept and updated on the host."""
    overlap_cpu_optimizer_d2h_h2d: bool = False
    use_precision_aware_optimizer: bool = False


@dataclass
class ActorConfig:
    ppo_epochs: int = 1
    ppo_mini_batch_size: int = 64
    """Prompts per optimizer step (x rollout.n responses); train_batch_size / this = updates per step."""
    micro_batch_size: int = 1
    """Sequences per GPU per forward/backward when use_dynamic_bsz is off."""
    use_dynamic_bsz: bool = False
    """Pack micro-batches by token budget instead of a fixed sequence count."""
    max_token_len_per_gpu: int = 16384
    """Token budget per micro-batch for training (use_dynamic_bsz)."""
    log_prob_max_token_len_per_gpu: Optional[int] = None
    """Token budget for old/ref log-prob passes; None = max_token_len_per_gpu."""
    param_offload: bool = False
    """Move parameters to host memory while the rollout engine runs (colocated). Counted by the
    --dry-run memory plan; a run refuses it until the trainer moves state between phases."""
    grad_offload: bool = False
    """Move the gradient buffers to host memory outside the update phase (as param_offload: plan only)."""
    optimizer_offload: bool = False
    """Move the GPU-resident optimizer states to host memory outside the update phase (as param_offload)."""
    router_dtype: Optional[Literal["fp32", "fp64"]] = "fp32"
    """MoE router logits / softmax dtype (megatron moe_router_dtype); None = model dtype."""


@dataclass
class CriticConfig:
    """The PPO value model (built when algorithm.name = ppo): the actor's architecture with a scalar
    value head in place of the LM head, on the same parallel layout, with its own optimizer. Batch
    fields left at None take the actor's value."""

    path: Optional[str] = None
    """HF folder the critic starts from; None = model.path (the actor's weights, a fresh value head).
    A folder whose weights hold `score.weight` (an exported critic, a *ForTokenClassification model)
    loads the value head too."""
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    ppo_epochs: Optional[int] = None
    ppo_mini_batch_size: Optional[int] = None
    """Prompts per critic optimizer step, like actor.ppo_mini_batch_size."""
    micro_batch_size: Optional[int] = None
    cliprange_value: Optional[float] = 0.5
    """New values are clipped to old value +- this (PPO value clipping); None = no clipping."""
    loss_agg_mode: str = "token-mean"


@dataclass
class SFTConfig:
    """Supervised fine-tuning (trainer.type = sft) on conversations: loss on assistant tokens only.
    `data.train_batch_size` counts conversations per optimizer step; micro-batching follows
    `actor.micro_batch_size` or, with `actor.use_dynamic_bsz`, packs by `actor.max_token_len_per_gpu`."""

    messages_key: str = "messages"
    max_length: int = 2048
    """Tokens per conversation after the chat template; longer ones are dropped or cut (truncation)."""
    filter_overlong: bool = True
    truncation: Literal["error", "left", "right"] = "error"
    max_trained_count: Optional[int] = None
    """Train each conversation at most this many times over the run (None = no limit): when every
    sample has reached it the run ends, and samples at the cap are skipped by later epochs."""
    loss_agg_mode: str = "token-mean"


@dataclass
class DPOConfig:
    """Direct preference optimisation (trainer.type = dpo) against a frozen reference (model.ref_path).
    `data.train_batch_size` counts pairs per optimizer step."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    """Registered DPO loss (megarl.algorithms.DPO_LOSSES): sigmoid | ipo."""
    label_smoothing: float = 0.0
    max_length: int = 2048
    """Tokens of prompt + the longer response; longer pairs are dropped."""


@dataclass
class TrainerConfig:
    type: Literal["rl", "sft", "dpo"] = "rl"
    """rl: rollouts + GRPO/PPO (algorithm.name); sft: supervised on conversations (section `sft`);
    dpo: preference pairs (section `dpo`)."""
    critic_warmup: int = 0
    """PPO: the first this-many steps train only the critic (the actor is not updated)."""
    total_steps: Optional[int] = None
    """None = total_epochs passes over data.train_files."""
    total_epochs: int = 1
    save_freq: int = -1
    """Save every this many steps (and at the end); -1 = only at the end, 0 = never."""
    test_freq: int = -1
    """Validate every this many steps; -1 = never."""
    output_dir: Optional[str] = None
    """Run folder for checkpoints, logs and TensorBoard; None = outputs/<experiment_name>."""
    experiment_name: str = "megarl"
    resume: str = "auto"
    """auto (latest checkpoint in output_dir if any) | disable | <checkpoint folder>."""
    keep_last_k: Optional[int] = None
    """Keep only the newest k checkpoints; None = keep all."""
    seed: int = 1234
    logger: list[Literal["console", "tensorboard"]] = field(default_factory=lambda: ["console", "tensorboard"])
    nnodes: int = 1
    gpus_per_node: int = 8
    """Accelerators per node; on CPU the number of worker processes per node."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = CUDA when visible, else CPU; cpu forces the CPU path even where CUDA exists; cuda without a
    visible GPU is an error at start (megarl.platform.device_plan decides and prints what follows)."""
    gpu_memory_gib: float = 80.0
    """Memory of one accelerator, for the dry-run memory plan."""
    host_memory_gib: Optional[float] = None
    """Host memory per node, for the dry-run plan's offload check; None = not checked."""


@dataclass
class MegaRLConfig:
    """The whole run: one YAML recipe = one of these."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    @property
    def world_size(self) -> int:
        return self.trainer.nnodes * self.trainer.gpus_per_node
