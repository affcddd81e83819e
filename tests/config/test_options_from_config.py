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
    from megarl.config import schema
    from megarl.data import RLDatasetConfig, SFTDatasetConfig
    from megarl.data.dpo_dataset import DPODatasetConfig
    from megarl.distributed import ParallelLayout
    from megarl.models.optimizer import OptimizerOptions
    from megarl.rewards.config import RewardConfig
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
        (RLDatasetConfig, schema.DataConfig, same(RLDatasetConfig, schema.DataConfig)),
        (SFTDatasetConfig, schema.SFTConfig, same(SFTDatasetConfig, schema.SFTConfig)),
        (DPODatasetConfig, DPOConfig, same(DPODatasetConfig, DPOConfig)),
        (RewardConfig, schema.RewardConfig, {"num_workers": "num_workers", "timeout_s": "timeout_s",
                                             "fallback_score": "fallback"}),
    ]


# The rollout library's option types are also used on their own (launch/rollout_server.py, tests): their
# from_config sets every field below from the config, and these defaults are what a direct library
# call gets. Pinned here so a change to either side is a decision, not drift.
LIBRARY_DEFAULTS = {
    ("SamplingOptions", "n"): (1, "rollout.n", 8, "one sample per request unless asked"),
    ("SamplingOptions", "max_tokens"): (256, "rollout.max_new_tokens", 1024, "short replies for a direct call"),
    ("SamplingOptions", "top_k"): (0, "rollout.top_k", -1, "vLLM-side 'off' is 0, the config's is -1"),
    ("VLLMEngineConfig", "gpu_memory_utilization"): (0.85, "rollout.gpu_memory_utilization", 0.6,
                                                     "a standalone engine owns its GPU; colocated runs share it"),
    ("EngineGroupOptions", "placement"): ("disaggregated", "rollout.placement", "colocated",
                                          "standalone engines get their own bundles; the device plan decides for runs"),
}


def test_rollout_library_defaults_are_the_pinned_ones():
    from megarl.rollout import EngineGroupOptions, SamplingOptions, VLLMEngineConfig

    classes = {"SamplingOptions": SamplingOptions, "VLLMEngineConfig": VLLMEngineConfig,
               "EngineGroupOptions": EngineGroupOptions}
    cfg = MegaRLConfig()
    for (cls_name, field_name), (library, path, schema_default, _why) in LIBRARY_DEFAULTS.items():
        assert classes[cls_name].__dataclass_fields__[field_name].default == library, (cls_name, field_name)
        section, leaf = path.split(".")
        assert getattr(getattr(cfg, section), leaf) == schema_default, path
    shared = {"temperature": "temperature", "top_p": "top_p"}
    for option, field_name in shared.items():  # the fields they share without a reason to differ agree
        assert getattr(SamplingOptions(), option) == getattr(cfg.rollout, field_name)
    assert VLLMEngineConfig.__dataclass_fields__["enforce_eager"].default == cfg.rollout.enforce_eager


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


def test_rollout_options_from_config_and_the_device_plan(tiny_moe_dir, monkeypatch):
    monkeypatch.setenv("MEGARL_DEVICE", "auto")  # device_plan("cpu") sets it for the run; restored after
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


def test_data_and_reward_options_from_config():
    from megarl.data import RLDatasetConfig, SFTDatasetConfig
    from megarl.data.dpo_dataset import DPODatasetConfig
    from megarl.rewards.config import RewardConfig

    cfg = _recipe(**{"data.prompt_key": "question", "data.max_prompt_length": 77, "data.truncation": "left",
                     "data.filter_overlong_prompts": False, "sft.messages_key": "conv", "sft.max_length": 99,
                     "dpo.max_length": 55, "data.skip_invalid_rows": True, "reward.name": ["math", "format"], "reward.weights": [1.0, 0.5],
                     "reward.num_workers": 3, "reward.timeout_s": 2.0, "reward.fallback": -1.0,
                     "reward.overlong_buffer.enable": True, "reward.overlong_buffer.len": 16})
    rl = RLDatasetConfig.from_config(cfg.data, ["a.parquet"])
    assert (rl.files, rl.prompt_key, rl.max_prompt_length, rl.truncation, rl.filter_overlong_prompts,
            rl.skip_invalid_rows) == (["a.parquet"], "question", 77, "left", False, True)
    sft = SFTDatasetConfig.from_config(cfg.sft, cfg.data, ["s.parquet"])
    assert (sft.messages_key, sft.max_length, sft.skip_invalid_rows) == ("conv", 99, True)
    dpo = DPODatasetConfig.from_config(cfg.dpo, cfg.data, ["d.parquet"])
    assert (dpo.max_length, dpo.skip_invalid_rows) == (55, True)
    reward = RewardConfig.from_config(cfg.reward, max_response_length=cfg.rollout.max_new_tokens)
    assert [(t.name, t.weight) for t in reward.terms] == [("math", 1.0), ("format", 0.5), ("overlong", 1.0)]
    assert reward.terms[-1].kwargs == {"max_response_length": 1024, "overlong_buffer_len": 16, "penalty_factor": 1.0}
    assert (reward.num_workers, reward.timeout_s, reward.fallback_score) == (3, 2.0, -1.0)
    custom = RewardConfig.from_config(_recipe(**{"reward.custom_function": "my.py:score"}).reward, 64)
    assert [t.name for t in custom.terms] == ["my.py:score"]


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
    ({"rollout.weight_sync.verify": "probes"}, "rollout.weight_sync.verify: 'probes' is not one of"),
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
