"""Option validation of the engine and optimizer (no distributed world needed)."""

import pytest

from megarl.models.engine import MicroBatchOptions
from megarl.models.optimizer import OptimizerOptions


def test_micro_batch_options():
    assert MicroBatchOptions().max_tokens_per_gpu == 4096
    assert MicroBatchOptions(micro_batch_size=4).max_tokens_per_gpu is None
    with pytest.raises(ValueError, match="not both"):
        MicroBatchOptions(micro_batch_size=4, max_tokens_per_gpu=1024)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr_decay_style": "step"}, "lr_decay_style must be one of"),
        ({"lr": 1e-5, "min_lr": 1e-4}, "min_lr <= lr"),
        ({"optimizer_offload_fraction": 1.5}, r"optimizer_offload_fraction must be in \[0, 1\]"),
        ({"lr_warmup_steps": 10, "lr_decay_steps": 5}, "must exceed lr_warmup_steps"),
        ({"optimizer": "lamb"}, "'adam' or 'sgd'"),
        ({"optimizer_cpu_offload": True, "use_distributed_optimizer": True}, "needs bf16=True"),
    ],
)
def test_optimizer_options_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizerOptions(**kwargs)


def test_megatron_config_carries_the_options():
    cfg = OptimizerOptions(lr=3e-4, min_lr=1e-5, clip_grad=0.5, optimizer_cpu_offload=True,
                           optimizer_offload_fraction=0.25, use_distributed_optimizer=False).megatron_config()
    assert (cfg.lr, cfg.min_lr, cfg.clip_grad) == (3e-4, 1e-5, 0.5)
    assert cfg.optimizer_cpu_offload and cfg.optimizer_offload_fraction == 0.25
    assert OptimizerOptions().megatron_config().optimizer_offload_fraction == 0.0
