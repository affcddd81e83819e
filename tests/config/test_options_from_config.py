"""One route from the config to every options object (`from_config`), with defaults in one place:
an options class's default for a field it takes from the config equals the schema's default."""

import dataclasses

import pytest

from megarl.config import MegaRLConfig, load_config
from megarl.config.schema import (
    AlgorithmConfig,
    DPOConfig,
    KLControlConfig,
    OptimizerConfig,
    ParallelConfig,
    TISConfig,
    WeightSyncConfig,
)


def _options_classes():
    from megarl.algorithms import AdvantageOptions, KLRewardOptions, PolicyLossOptions, RolloutCorrectionOptions
    from megarl.algorithms.preference import DPOOptions
    from megarl.distributed import ParallelLayout
    from megarl.models.optimizer import OptimizerOptions
    from megarl.rollout.weight_sync.pusher import WeightPushOptions

    # (options class, schema section, {options field: schema field} for the fields copied from the config)
    same = lambda cls, section, skip=(): {f.name: f.name for f in dataclasses.fields(cls)  # noqa: E731
                                          if f.name in section.__dataclass_fields__ and f.name not in skip}
    return [
        (OptimizerOptions, OptimizerConfig, same(OptimizerOptions, OptimizerConfig)),
        (PolicyLossOptions, AlgorithmConfig, same(PolicyLossOptions, AlgorithmConfig)),
        (RolloutCorrectionOptions, TISConfig, same(RolloutCorrectionOptions, TISConfig)),
        (AdvantageOptions, AlgorithmConfig, same(AdvantageOptions, AlgorithmConfig)),
        (KLRewardOptions, KLControlConfig, same(KLRewardOptions, KLControlConfig)),
        (DPOOptions, DPOConfig, same(DPOOptions, DPOConfig)),
        (ParallelLayout, ParallelConfig, same(ParallelLayout, ParallelConfig)),
        (WeightPushOptions, WeightSyncConfig, same(WeightPushOptions, WeightSyncConfig, skip=("transport",))),
    ]


@pytest.mark.parametrize("options_cls, section, fields", _options_classes(), ids=lambda x: getattr(x, "__name__", ""))
def test_options_defaults_equal_the_schema_defaults(options_cls, section, fields):
    assert fields, f"{options_cls.__name__} shares no field with {section.__name__}"
    schema_default, options_default = section(), options_cls()
    differ = {o: (getattr(options_default, o), getattr(schema_default, s)) for o, s in fields.items()
              if getattr(options_default, o) != getattr(schema_default, s)}
    assert differ == {}, f"{options_cls.__name__} defaults (options, schema) disagree: {differ}"


def test_optimizer_defaults_that_used_to_disagree():
    from megarl.models.optimizer import OptimizerOptions

    o = OptimizerOptions()
    assert (o.weight_decay, o.use_distributed_optimizer, o.optimizer_offload_fraction) == (0.01, True, 0.0)


def _recipe(**overrides):
    return load_config(None, {"model.path": "/models/m", "data.train_files": ["t.parquet"], **overrides},
                       check_paths=False)


def test_optimizer_options_from_config_carry_every_field():
    from megarl.models.optimizer import OptimizerOptions

    o = OptimizerConfig(lr=3e-5, min_lr=1e-6, lr_warmup_steps=4, lr_decay_style="cosine", weight_decay=0.1,
                        adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6, clip_grad=0.5, use_distributed_optimizer=True,
                        optimizer_cpu_offload=True, optimizer_offload_fraction=0.5, overlap_cpu_optimizer_d2h_h2d=True)
    opts = OptimizerOptions.from_config(o, total_optimizer_steps=20, bf16=True)
    for name in OptimizerConfig.__dataclass_fields__:
        if name != "lr_decay_steps":
            assert getattr(opts, name) == getattr(o, name), name
    assert opts.lr_decay_steps == 20 and opts.bf16  # None = the run's optimizer steps
    assert OptimizerOptions.from_config(o, total_optimizer_steps=2, bf16=True).lr_decay_steps == 5  # > warmup
    assert OptimizerOptions.from_config(dataclasses.replace(o, lr_decay_steps=7), total_optimizer_steps=20,
                                        bf16=True).lr_decay_steps == 7


def test_production_routes_use_from_config():
    """The trainer's option builders give what the classes' from_config give (no hand copies)."""
    from megarl.algorithms import PolicyLossOptions
    from megarl.trainer.model_worker import micro_batch_options, optimizer_options, parallel_layout
    from megarl.trainer.train_worker import policy_loss_options

    cfg = _recipe(**{"algorithm.clip_ratio_high": 0.28, "algorithm.tis.is_cap": 2.0, "parallel.tp": 2,
                     "trainer.gpus_per_node": 2, "actor.use_dynamic_bsz": True, "actor.max_token_len_per_gpu": 4096,
                     "actor.log_prob_max_token_len_per_gpu": 8192, "critic.optimizer.lr": 3e-5})
    loss = policy_loss_options(cfg)
    assert loss == PolicyLossOptions.from_config(cfg.algorithm)
    assert (loss.clip_high, loss.rollout_correction.is_cap) == (0.28, 2.0)
    assert parallel_layout(cfg).tp == 2 and parallel_layout(cfg).sequence_parallel
    assert optimizer_options(cfg, 10).lr == cfg.optimizer.lr and optimizer_options(cfg, 10).bf16
    assert optimizer_options(cfg, 10, cfg.critic.optimizer).lr == 3e-5
    assert micro_batch_options(cfg).max_tokens_per_gpu == 4096
    assert micro_batch_options(cfg, for_log_prob=True).max_tokens_per_gpu == 8192
    fixed = _recipe(**{"actor.micro_batch_size": 4, "critic.micro_batch_size": 2})
    assert (micro_batch_options(fixed).micro_batch_size, micro_batch_options(fixed, critic=True).micro_batch_size) == (4, 2)


def test_rollout_options_from_config_and_the_device_plan(tiny_moe_dir):
    from megarl.platform.device import device_plan
    from megarl.rollout import EngineGroupOptions, SamplingOptions, VLLMEngineConfig
    from megarl.rollout.weight_sync.pusher import WeightPushOptions

    cfg = _recipe(**{"model.path": tiny_moe_dir, "rollout.n": 4, "rollout.top_k": -1, "rollout.max_new_tokens": 64,
                     "rollout.max_num_batched_tokens": 512, "data.max_prompt_length": 128, "model.dtype": "fp32",
                     "rollout.weight_sync.verify": "digest", "rollout.weight_sync.bucket_mb": 64})
    device = device_plan("cpu", placement=cfg.rollout.placement, transport="auto")
    engine = VLLMEngineConfig.from_config(cfg, device)
    assert (engine.dtype, engine.max_model_len, engine.seed, engine.enforce_eager, engine.enable_sleep_mode) == (
        "float32", 192, cfg.trainer.seed, True, False)
    assert engine.engine_kwargs == {"max_num_batched_tokens": 512}
    group = EngineGroupOptions.from_config(cfg, device, num_engines=2)
    assert (group.num_engines, group.placement, group.engine_cpus) == (2, "disaggregated", 0.5)
    sampling = SamplingOptions.from_config(cfg.rollout)
    assert (sampling.n, sampling.top_k, sampling.max_tokens) == (4, 0, 64)
    assert SamplingOptions.from_config(cfg.rollout, validation=True) == SamplingOptions(n=1, temperature=0.0, max_tokens=64)
    push = WeightPushOptions.from_config(cfg.rollout.weight_sync, transport=device.weight_transport)
    assert (push.transport, push.verify, push.bucket_mb, push.transport_kwargs) == ("object_store", "digest", 64, {})


def test_nccl_host_and_port_reach_the_transport():
    from megarl.rollout.weight_sync.nccl import NcclBroadcastTransport
    from megarl.rollout.weight_sync.pusher import WeightPushOptions

    ws = WeightSyncConfig(transport="nccl", nccl_host="10.0.0.7", nccl_port=31000, verify="checksum")
    push = WeightPushOptions.from_config(ws, transport="nccl")
    assert push.transport_kwargs == {"host": "10.0.0.7", "port": 31000} and push.verify == "checksum"
    # None = the sender's node IP (resolved by the transport on the sending rank), never 127.0.0.1
    assert WeightPushOptions.from_config(WeightSyncConfig(), transport="nccl").transport_kwargs == {"host": None,
                                                                                                  "port": 29555}
    import inspect

    assert inspect.signature(NcclBroadcastTransport).parameters["host"].default is None


@pytest.mark.parametrize("overrides, message", [
    ({"rollout.weight_sync.nccl_port": 70000}, "rollout.weight_sync.nccl_port: 70000 is not a TCP port"),
    ({"rollout.weight_sync.nccl_host": "10.0.0.7"}, "rollout.weight_sync.nccl_host: only used by transport=nccl"),
    ({"rollout.weight_sync.verify": "logprobs"}, "rollout.weight_sync.verify: 'logprobs' is not one of"),
    ({"rollout.engine": "hf"}, "rollout.engine: 'hf' is not one of 'vllm'"),
])
def test_weight_sync_and_engine_values_are_checked(overrides, message):
    from megarl.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _recipe(**overrides)
    assert any(e.startswith(message) for e in err.value.errors), err.value.errors


def test_full_schema_defaults_build_every_options_object():
    """The schema's defaults are valid options (no from_config rejects the default config)."""
    from megarl.algorithms import AdvantageOptions, KLRewardOptions, PolicyLossOptions
    from megarl.algorithms.preference import DPOOptions
    from megarl.models.optimizer import OptimizerOptions

    cfg = MegaRLConfig()
    PolicyLossOptions.from_config(cfg.algorithm)
    AdvantageOptions.from_config(cfg.algorithm)
    KLRewardOptions.from_config(cfg.algorithm.kl_ctrl)
    DPOOptions.from_config(cfg.dpo)
    OptimizerOptions.from_config(cfg.optimizer, total_optimizer_steps=10, bf16=True)
