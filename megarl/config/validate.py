"""Checks on relations between fields, run once at start on the resolved config.

Each problem names the field and says what to change. Checks against the model's shape and the
parallel layout (heads per TP rank, layers per stage, experts per EP rank) live in the dry-run planner
(`megarl.planner`), which reads the model's config.json.
"""

from __future__ import annotations

import importlib
import os
from megarl.config.loader import ConfigError
from megarl.config.resolve import rollout_gpus, train_gpus
from megarl.config.schema import MegaRLConfig

# (field, module, registry): the registry is a `Registry` (with .names()), a dict keyed by name, or a
# function returning the registered names. A module that is not importable is skipped (an optional part not installed);
# `module:function` / `file.py:function` values are user code, loaded and checked when the run starts.
REGISTRY_CHECKS: list[tuple[str, str, str]] = [
    ("reward.name", "megarl.rewards.registry", "registered_rewards"),
    ("algorithm.adv_estimator", "megarl.algorithms", "ADVANTAGE_ESTIMATORS"),
    ("algorithm.policy_loss", "megarl.algorithms", "POLICY_LOSSES"),
    ("algorithm.loss_agg_mode", "megarl.algorithms", "LOSS_AGG_MODES"),
    ("algorithm.kl_loss_type", "megarl.algorithms", "KL_ESTIMATORS"),
    ("rollout.weight_sync.transport", "megarl.rollout.weight_sync.base", "registered_transports"),
    ("rollout.multi_turn_scheduler", "megarl.rollout.multi_turn", "SCHEDULERS"),
    ("critic.loss_agg_mode", "megarl.algorithms", "LOSS_AGG_MODES"),
    ("sft.loss_agg_mode", "megarl.algorithms", "LOSS_AGG_MODES"),
    ("dpo.loss_type", "megarl.algorithms", "DPO_LOSSES"),
]
_NOT_REGISTRY_NAMES = {"auto"}


def validate(cfg: MegaRLConfig, *, check_paths: bool = True, check_data_paths: bool = True) -> list[str]:
    """Raise ConfigError listing every problem of the (resolved) config; return warnings.

    check_paths: require model.path to hold a config.json (and the other named files to exist);
    check_data_paths: with check_paths, also require the data files (a dry run on a login node
    may not see them).
    """
    errors: list[str] = []
    warnings: list[str] = []
    for check in (_model, _parallel, _rollout, _data, _reward, _algorithm, _optimizer, _actor, _critic, _sft_dpo,
                  _trainer):
        check(cfg, errors, warnings)
    _registries(cfg, errors)
    if check_paths:
        _paths(cfg, errors, check_data_paths)
    if errors:
        raise ConfigError(errors)
    return warnings


def _positive(errors: list[str], where: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        errors.append(f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _model(cfg, errors, warnings):
    if not cfg.model.path:
        errors.append("model.path: required; set it to a HuggingFace model folder "
                      "(config.json + *.safetensors + tokenizer), e.g. --model.path=/models/Qwen3-30B-A3B")


def _parallel(cfg, errors, warnings):
    p = cfg.parallel
    for name in ("tp", "pp", "ep", "etp", "cp", "vpp"):
        _positive(errors, f"parallel.{name}", getattr(p, name))
    if p.vpp is not None and p.vpp > 1 and p.pp == 1:
        errors.append(f"parallel.vpp: virtual pipeline stages need parallel.pp > 1 (pp=1, vpp={p.vpp}); "
                      "unset vpp or raise pp")
    last = p.num_layers_in_last_pipeline_stage
    if last is not None and p.pp == 1:
        errors.append("parallel.num_layers_in_last_pipeline_stage: only meaningful with parallel.pp > 1 (pp=1); unset it")
    _positive(errors, "parallel.num_layers_in_last_pipeline_stage", last)
    rc = p.recompute
    if rc.granularity != "full" and (rc.method is not None or rc.num_layers is not None):
        errors.append("parallel.recompute.method/num_layers: only used with parallel.recompute.granularity=full "
                      f"(granularity={rc.granularity!r})")
    if rc.granularity == "full":
        if rc.method is None:
            errors.append("parallel.recompute.method: required with granularity=full (uniform or block)")
        if rc.num_layers is None:
            errors.append("parallel.recompute.num_layers: required with granularity=full (e.g. 1)")
    _positive(errors, "parallel.recompute.num_layers", rc.num_layers)


def _rollout(cfg, errors, warnings):
    r = cfg.rollout
    _positive(errors, "rollout.n", r.n)
    _positive(errors, "rollout.max_new_tokens", r.max_new_tokens)
    _positive(errors, "rollout.tensor_parallel_size", r.tensor_parallel_size)
    _positive(errors, "rollout.max_turns", r.max_turns)
    _positive(errors, "rollout.weight_sync.bucket_mb", r.weight_sync.bucket_mb)
    if r.max_engine_restarts < 0:
        errors.append(f"rollout.max_engine_restarts: must be >= 0, got {r.max_engine_restarts}")
    elif r.on_engine_failure == "fail" and r.max_engine_restarts != type(r)().max_engine_restarts:
        errors.append(f"rollout.max_engine_restarts: {r.max_engine_restarts} has no effect with "
                      "rollout.on_engine_failure=fail; set on_engine_failure=restart or drop it")
    if r.temperature <= 0:
        errors.append(f"rollout.temperature: must be > 0 for sampling, got {r.temperature}")
    if not 0 < r.top_p <= 1:
        errors.append(f"rollout.top_p: must be in (0, 1], got {r.top_p}")
    if r.top_k == 0 or r.top_k < -1:
        errors.append(f"rollout.top_k: must be -1 (off) or >= 1, got {r.top_k}")
    if not 0 < r.gpu_memory_utilization <= 1:
        errors.append(f"rollout.gpu_memory_utilization: must be in (0, 1], got {r.gpu_memory_utilization}")
    # Refused, not ignored: the RL loop generates single-turn rollouts only (a later issue wires
    # megarl.rollout.multi_turn into it).
    if r.max_turns > 1:
        errors.append(f"rollout.max_turns: {r.max_turns} > 1, but the RL loop does not run multi-turn rollouts yet "
                      "(megarl.rollout.multi_turn.run_multi_turn works on its own); set rollout.max_turns=1")
    if r.multi_turn_scheduler:
        errors.append(f"rollout.multi_turn_scheduler: {r.multi_turn_scheduler!r} would not be used: the RL loop does "
                      "not run multi-turn rollouts yet; unset it (null)")
    _positive(errors, "rollout.weight_sync.nccl_port", r.weight_sync.nccl_port)
    if r.weight_sync.nccl_port > 65535:
        errors.append(f"rollout.weight_sync.nccl_port: {r.weight_sync.nccl_port} is not a TCP port (1-65535)")
    if r.weight_sync.transport != "nccl":
        for name, default in (("nccl_host", None), ("nccl_port", 29555)):
            if getattr(r.weight_sync, name) != default:
                errors.append(f"rollout.weight_sync.{name}: only used by transport=nccl "
                              f"(transport={r.weight_sync.transport!r}); unset it or set the transport to nccl")
    world = cfg.world_size
    if r.placement == "disaggregated":
        if not r.num_engines:
            errors.append("rollout.num_engines: required with placement=disaggregated (rollout GPUs = "
                          "num_engines x tensor_parallel_size; training gets the rest)")
        elif train_gpus(cfg) < 1:
            errors.append(f"rollout.num_engines: {r.num_engines} engines x TP {r.tensor_parallel_size} = "
                          f"{rollout_gpus(cfg)} GPUs leaves none of the {world} for training")
    elif r.tensor_parallel_size > 0:
        if world % r.tensor_parallel_size:
            errors.append(f"rollout.tensor_parallel_size: {r.tensor_parallel_size} does not divide the "
                          f"{world} GPUs (trainer.nnodes x trainer.gpus_per_node)")
        elif r.num_engines is not None and r.num_engines * r.tensor_parallel_size > world:
            errors.append(f"rollout.num_engines: {r.num_engines} x TP {r.tensor_parallel_size} needs more than "
                          f"the {world} GPUs")


def _data(cfg, errors, warnings):
    d = cfg.data
    _positive(errors, "data.train_batch_size", d.train_batch_size)
    _positive(errors, "data.max_prompt_length", d.max_prompt_length)
    _positive(errors, "data.val_batch_size", d.val_batch_size)
    if not d.train_files:
        errors.append("data.train_files: required; a list of parquet/jsonl files with one prompt per row")


def _reward(cfg, errors, warnings):
    rw = cfg.reward
    names = [rw.name] if isinstance(rw.name, str) else rw.name
    if not names:
        errors.append("reward.name: give at least one reward name")
    if rw.weights is not None and len(rw.weights) != len(names):
        errors.append(f"reward.weights: {len(rw.weights)} weights for {len(names)} reward names {names}")
    _positive(errors, "reward.timeout_s", rw.timeout_s)
    _positive(errors, "reward.num_workers", rw.num_workers, allow_zero=True)
    ob = rw.overlong_buffer
    if ob.enable:
        _positive(errors, "reward.overlong_buffer.len", ob.len)
        if ob.len >= cfg.rollout.max_new_tokens:
            errors.append(f"reward.overlong_buffer.len: {ob.len} must be smaller than rollout.max_new_tokens "
                          f"({cfg.rollout.max_new_tokens}); the buffer is the last `len` tokens before the limit")


def _algorithm(cfg, errors, warnings):
    a = cfg.algorithm
    for name in ("clip_ratio", "clip_ratio_low", "clip_ratio_high"):
        value = getattr(a, name)
        if value is not None and value < 0:
            errors.append(f"algorithm.{name}: must be >= 0, got {value}")
    if a.clip_ratio_low is not None and a.clip_ratio_low >= 1:
        errors.append(f"algorithm.clip_ratio_low: must be < 1 (the ratio is clipped at 1 - low), got {a.clip_ratio_low}")
    if a.clip_ratio_c is not None and a.clip_ratio_c <= 1:
        errors.append(f"algorithm.clip_ratio_c: the dual-clip bound must be > 1, got {a.clip_ratio_c}")
    if a.adv_estimator in ("grpo", "rloo", "grpo_passk") and cfg.rollout.n < 2:
        errors.append(f"rollout.n: {a.adv_estimator} compares responses within a prompt group, so it needs "
                      f"rollout.n >= 2 (got {cfg.rollout.n})")
    if a.use_kl_loss and a.use_kl_in_reward:
        warnings.append("algorithm.use_kl_loss and use_kl_in_reward are both on: the KL is penalised twice")
    _positive(errors, "algorithm.kl_loss_coef", a.kl_loss_coef, allow_zero=True)
    if not 0 <= a.gamma <= 1 or not 0 <= a.lam <= 1:
        errors.append(f"algorithm.gamma/lam: must be in [0, 1], got gamma={a.gamma}, lam={a.lam}")
    if a.tis.is_cap is not None and a.tis.is_cap <= 0:
        errors.append(f"algorithm.tis.is_cap: must be > 0 (typically 2.0), got {a.tis.is_cap}")
    if a.tis.reject_above is not None and a.tis.reject_above <= 1:
        errors.append(f"algorithm.tis.reject_above: must be > 1 (rho = 1 is always kept), got {a.tis.reject_above}")
    if a.tis.reject_below is not None and not 0 <= a.tis.reject_below < 1:
        errors.append(f"algorithm.tis.reject_below: must be in [0, 1), got {a.tis.reject_below}")
    _positive(errors, "algorithm.dynamic_sampling.max_num_gen_batches", a.dynamic_sampling.max_num_gen_batches,
              allow_zero=True)
    _loss_specific(cfg, errors)



def _loss_specific(cfg, errors):
    """Options of the individual policy losses / estimators, and what they need from the rollout."""
    a, r = cfg.algorithm, cfg.rollout
    for name in ("tau_pos", "tau_neg"):
        if not getattr(a, name) > 0:
            errors.append(f"algorithm.{name}: the SAPO gate temperature must be > 0, got {getattr(a, name)}")
    for name in ("clip_cov_ratio", "kl_cov_ratio"):
        if not 0 < getattr(a, name) <= 1:
            errors.append(f"algorithm.{name}: a fraction of the loss tokens, must be in (0, 1], got {getattr(a, name)}")
    if not a.clip_cov_lb < a.clip_cov_ub:
        errors.append(f"algorithm.clip_cov_lb: must be < clip_cov_ub, got {a.clip_cov_lb} >= {a.clip_cov_ub}")
    _positive(errors, "algorithm.ppo_kl_coef", a.ppo_kl_coef, allow_zero=True)
    _positive(errors, "algorithm.dro_beta", a.dro_beta, allow_zero=True)
    if a.policy_loss in ("bypass_mode", "bypass"):
        if a.bypass_loss_type == "ppo_clip" and a.tis.is_cap is not None:
            errors.append("algorithm.tis.is_cap: bypass_mode with bypass_loss_type=ppo_clip already corrects the rollout "
                          "mismatch through its ratio pi/pi_rollout; an IS weight would count it twice (unset is_cap, "
                          "or set bypass_loss_type=reinforce, which truncates pi/pi_rollout at is_cap)")
        if r.top_p < 1 or r.top_k > 0:
            errors.append(f"algorithm.policy_loss: bypass_mode uses the rollout engine's log-probs as the old policy, "
                          f"which with rollout.top_p={r.top_p} / top_k={r.top_k} come from the truncated sampling "
                          "distribution, not the one the trainer computes; set top_p=1 and top_k=-1 (or 0)")
    if a.adv_estimator in ("optimal_token_baseline", "tir_optimal_token_baseline") and cfg.rollout.n < 2:
        errors.append(f"rollout.n: {a.adv_estimator} baselines each position with the other responses to the same "
                      f"prompt, so it needs rollout.n >= 2 (got {cfg.rollout.n})")


def _optimizer(cfg, errors, warnings, o=None, section: str = "optimizer"):
    o = o or cfg.optimizer
    _positive(errors, f"{section}.lr", o.lr)
    _positive(errors, f"{section}.min_lr", o.min_lr, allow_zero=True)
    _positive(errors, f"{section}.lr_warmup_steps", o.lr_warmup_steps, allow_zero=True)
    _positive(errors, f"{section}.weight_decay", o.weight_decay, allow_zero=True)
    _positive(errors, f"{section}.clip_grad", o.clip_grad, allow_zero=True)
    if o.min_lr > o.lr:
        errors.append(f"{section}.min_lr: {o.min_lr} exceeds {section}.lr {o.lr}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(o, name) < 1:
            errors.append(f"{section}.{name}: must be in [0, 1), got {getattr(o, name)}")
    if not 0 <= o.optimizer_offload_fraction <= 1:
        errors.append(f"{section}.optimizer_offload_fraction: must be in [0, 1], got {o.optimizer_offload_fraction}")
    if o.optimizer_offload_fraction > 0 and not o.optimizer_cpu_offload:
        errors.append(f"{section}.optimizer_offload_fraction: > 0 has no effect without "
                      f"{section}.optimizer_cpu_offload=true; turn that on or set the fraction to 0")
    if o.overlap_cpu_optimizer_d2h_h2d and not o.optimizer_cpu_offload:
        errors.append(f"{section}.overlap_cpu_optimizer_d2h_h2d: needs {section}.optimizer_cpu_offload=true")
    # megatron-core asserts these in OptimizerConfig.__post_init__; say it here, before any work.
    if o.use_precision_aware_optimizer and not o.use_distributed_optimizer:
        errors.append(f"{section}.use_precision_aware_optimizer: needs {section}.use_distributed_optimizer=true")
    if o.optimizer_cpu_offload and not o.use_distributed_optimizer:
        errors.append(f"{section}.optimizer_cpu_offload: needs {section}.use_distributed_optimizer=true")


def _critic(cfg, errors, warnings):
    a, c = cfg.algorithm, cfg.critic
    if a.adv_estimator == "gae" and a.name != "ppo":
        errors.append("algorithm.adv_estimator: gae needs values from a critic; set algorithm.name=ppo "
                      f"(got name={a.name!r})")
    if a.name == "ppo" and a.adv_estimator != "gae":
        errors.append(f"algorithm.adv_estimator: algorithm.name=ppo trains a critic for GAE; {a.adv_estimator!r} "
                      "would not use its values (set adv_estimator=gae, or name=grpo for critic-free estimators)")
    _positive(errors, "trainer.critic_warmup", cfg.trainer.critic_warmup, allow_zero=True)
    if a.name != "ppo":
        if cfg.trainer.critic_warmup:
            errors.append("trainer.critic_warmup: only meaningful with algorithm.name=ppo")
        return
    _optimizer(cfg, errors, warnings, c.optimizer, "critic.optimizer")
    for name in ("ppo_epochs", "ppo_mini_batch_size", "micro_batch_size"):
        _positive(errors, f"critic.{name}", getattr(c, name))
    if c.cliprange_value is not None and c.cliprange_value <= 0:
        errors.append(f"critic.cliprange_value: must be > 0 (or null for no clipping), got {c.cliprange_value}")
    batch = cfg.data.train_batch_size
    if c.ppo_mini_batch_size and batch % c.ppo_mini_batch_size:
        errors.append(f"critic.ppo_mini_batch_size: {c.ppo_mini_batch_size} does not divide "
                      f"data.train_batch_size {batch} (both count prompts)")


def _sft_dpo(cfg, errors, warnings):
    s, d = cfg.sft, cfg.dpo
    _positive(errors, "sft.max_length", s.max_length)
    _positive(errors, "sft.max_trained_count", s.max_trained_count)
    _positive(errors, "dpo.max_length", d.max_length)
    if d.beta <= 0:
        errors.append(f"dpo.beta: must be > 0, got {d.beta}")
    if not 0 <= d.label_smoothing < 0.5:
        errors.append(f"dpo.label_smoothing: must be in [0, 0.5), got {d.label_smoothing}")
    if cfg.trainer.type != "rl" and cfg.algorithm.name == "ppo":
        errors.append(f"algorithm.name: ppo is an RL algorithm; trainer.type={cfg.trainer.type} does not use it")
    kind = cfg.trainer.type
    if kind == "rl":
        return
    if cfg.actor.use_dynamic_bsz:
        # DPO: a pair's two sequences (each up to dpo.max_length) share one micro-batch
        longest, what = (s.max_length, "sequence") if kind == "sft" else (2 * d.max_length, "preference pair")
        if cfg.actor.max_token_len_per_gpu < longest:
            errors.append(f"actor.max_token_len_per_gpu: {cfg.actor.max_token_len_per_gpu} tokens cannot hold one "
                          f"{what} of up to {longest} tokens ({kind}.max_length); raise it")
    p = cfg.parallel
    dp = cfg.world_size // max(p.tp * p.pp * p.cp, 1)
    if cfg.data.train_batch_size < dp:
        unit = "conversations" if kind == "sft" else "pairs"
        errors.append(f"data.train_batch_size: {cfg.data.train_batch_size} {unit} cannot feed {dp} data-parallel "
                      "ranks; raise it to at least the data-parallel size")
    t = cfg.trainer
    if kind == "sft" and s.max_trained_count and not t.total_steps and t.total_epochs < s.max_trained_count:
        warnings.append(f"sft.max_trained_count: {s.max_trained_count} is never reached in trainer.total_epochs="
                        f"{t.total_epochs} epochs; set trainer.total_steps (the run then ends when every sample "
                        "reached the cap) or more epochs")


def _actor(cfg, errors, warnings):
    ac, d = cfg.actor, cfg.data
    for name in ("ppo_epochs", "ppo_mini_batch_size", "micro_batch_size", "max_token_len_per_gpu",
                 "log_prob_max_token_len_per_gpu"):
        _positive(errors, f"actor.{name}", getattr(ac, name))
    if cfg.trainer.type != "rl":
        return  # the rest is about rollout batches
    if ac.ppo_mini_batch_size > d.train_batch_size:
        errors.append(f"actor.ppo_mini_batch_size: {ac.ppo_mini_batch_size} prompts exceeds "
                      f"data.train_batch_size {d.train_batch_size}")
    elif d.train_batch_size % ac.ppo_mini_batch_size:
        errors.append(f"actor.ppo_mini_batch_size: {ac.ppo_mini_batch_size} does not divide "
                      f"data.train_batch_size {d.train_batch_size} (both count prompts)")
    longest = d.max_prompt_length + cfg.rollout.max_new_tokens
    if ac.use_dynamic_bsz:
        for name in ("max_token_len_per_gpu", "log_prob_max_token_len_per_gpu"):
            budget = getattr(ac, name)
            if budget is not None and budget < longest:
                errors.append(f"actor.{name}: {budget} tokens cannot hold one sequence of up to {longest} "
                              f"tokens (data.max_prompt_length + rollout.max_new_tokens); raise it")


def _trainer(cfg, errors, warnings):
    t = cfg.trainer
    _positive(errors, "trainer.nnodes", t.nnodes)
    _positive(errors, "trainer.gpus_per_node", t.gpus_per_node)
    _positive(errors, "trainer.total_steps", t.total_steps)
    _positive(errors, "trainer.total_epochs", t.total_epochs)
    _positive(errors, "trainer.keep_last_k", t.keep_last_k)
    _positive(errors, "trainer.gpu_memory_gib", t.gpu_memory_gib)
    _positive(errors, "trainer.host_memory_gib", t.host_memory_gib)
    if t.save_freq < -1:
        errors.append(f"trainer.save_freq: -1 (end only), 0 (never) or a step count, got {t.save_freq}")
    if t.test_freq < -1 or t.test_freq == 0:
        errors.append(f"trainer.test_freq: -1 (never) or a step count, got {t.test_freq}")
    if not t.resume:
        errors.append("trainer.resume: auto, disable, or a checkpoint folder")
    if t.test_freq > 0 and not cfg.data.val_files:
        errors.append(f"data.val_files: required with trainer.test_freq={t.test_freq}; or set test_freq=-1")


NOT_WIRED_OFFLOADS = ("param_offload", "grad_offload", "optimizer_offload")


def start_errors(cfg: MegaRLConfig) -> list[str]:
    """Problems that stop a run from starting but not a --dry-run: switches the memory planner
    counts and the trainer does not act on yet."""
    on = [name for name in NOT_WIRED_OFFLOADS if getattr(cfg.actor, name)]
    return [f"actor.{name}: the trainer does not move actor state to host memory between phases yet, so this "
            "run would not get the memory the plan counts on; set it to false to run (--dry-run plans with it)"
            for name in on]


def check_can_start(cfg: MegaRLConfig) -> None:
    """Raise ConfigError when a validated config must not start a run (see start_errors)."""
    errors = start_errors(cfg)
    if errors:
        raise ConfigError(errors)


def _registries(cfg, errors):
    for where, module_name, lister_name in REGISTRY_CHECKS:
        value = _get_dotted(cfg, where)
        if value is None:
            continue
        values = [value] if isinstance(value, str) else list(value)
        registered = _registered_names(module_name, lister_name)
        if registered is None:
            continue
        for v in values:
            if ":" not in v and v not in registered and v not in _NOT_REGISTRY_NAMES:
                errors.append(f"{where}: {v!r} is not registered; registered: {', '.join(registered)} "
                              "(or give your own as module:name or path/to/file.py:name)")


def _registered_names(module_name: str, attr: str) -> list[str] | None:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    registry = getattr(module, attr, None)
    if registry is None:
        return None
    if isinstance(registry, dict):
        return sorted(registry)
    return list(registry.names() if hasattr(registry, "names") else registry())


def _get_dotted(cfg, dotted: str):
    node = cfg
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


def _paths(cfg, errors, check_data_paths: bool):
    if cfg.model.path and not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        errors.append(f"model.path: {cfg.model.path!r} has no config.json (expected a HuggingFace model folder)")
    if cfg.model.ref_path and cfg.model.ref_path != cfg.model.path and not os.path.isdir(cfg.model.ref_path):
        errors.append(f"model.ref_path: {cfg.model.ref_path!r} is not a folder")
    critic = cfg.critic.path
    if cfg.algorithm.name == "ppo" and critic and not os.path.isfile(os.path.join(critic, "config.json")):
        errors.append(f"critic.path: {critic!r} has no config.json (expected a HuggingFace model folder)")
    for key in ("train_files", "val_files") if check_data_paths else ():
        for i, path in enumerate(getattr(cfg.data, key)):
            if not os.path.exists(path):
                errors.append(f"data.{key}[{i}]: {path!r} does not exist")
    if cfg.reward.custom_function:
        target = cfg.reward.custom_function.rpartition(":")[0]
        if target.endswith(".py") and not os.path.isfile(target):
            errors.append(f"reward.custom_function: file {target!r} does not exist")
    resume = cfg.trainer.resume
    if resume not in ("auto", "disable") and not os.path.isdir(resume):
        errors.append(f"trainer.resume: {resume!r} is neither auto, disable, nor an existing checkpoint folder")
