"""A tiny megatron GPT (optionally MoE) built directly from megatron-core + megarl's layer spec.

Shared by the platform and distributed tests. Weights are drawn per *global* tensor from a seed
derived from the tensor's checkpoint key, then sliced to this rank's shard (using megatron's own
sharded_state_dict metadata), so every parallel layout holds exactly the same model.
"""

from __future__ import annotations

import zlib

import torch


def tiny_config(layout, *, moe: bool = True, num_layers: int = 2, recompute: bool = False, **extra):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megarl.platform import transformer_config_overrides

    kwargs = dict(
        num_layers=num_layers,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=32,
        normalization="RMSNorm",
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        init_method_std=0.02,
    )
    if moe:
        kwargs.update(
            num_moe_experts=4,
            moe_router_topk=2,
            moe_ffn_hidden_size=32,
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
        )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(transformer_config_overrides(layout, is_moe=moe))
    kwargs.update(extra)
    return TransformerConfig(**kwargs)


def build_tiny_gpt(config, vocab_size: int = 128, max_seq: int = 64):
    """List of model chunks (one per VPP stage) for this rank."""
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel

    from megarl.platform.layer_specs import gpt_decoder_block_spec

    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=gpt_decoder_block_spec(config, vp_stage=vp_stage),
                vocab_size=vocab_size,
                max_sequence_length=max_seq,
                pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                parallel_output=True,
                share_embeddings_and_output_weights=False,
                position_embedding_type="rope",
                rotary_base=10000,
                vp_stage=vp_stage,
            )
        )
    return chunks


def _sharded_tensors(node):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(node, ShardedTensor):
        yield node
    elif isinstance(node, ShardedTensorFactory):
        yield from _sharded_tensors(node.build())
    elif isinstance(node, dict):
        for value in node.values():
            yield from _sharded_tensors(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _sharded_tensors(value)


@torch.no_grad()
def deterministic_init(chunks, seed: int = 0) -> None:
    """Fill every parameter with its slice of a global tensor drawn from (seed, checkpoint key)."""
    for chunk in chunks:
        for sharded in _sharded_tensors(chunk.sharded_state_dict()):
            if sharded.flattened_range is not None or not sharded.data.is_floating_point():
                raise NotImplementedError(sharded.key)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(sharded.key.encode()))
            full = torch.randn(sharded.global_shape, generator=generator)
            full = 1.0 + 0.1 * full if "norm" in sharded.key else 0.05 * full
            local_shape = (1,) * sharded.prepend_axis_num + tuple(sharded.data.shape)
            index = tuple(slice(o, o + n) for o, n in zip(sharded.global_offset, local_shape))
            sharded.data.copy_(full[index].reshape(sharded.data.shape))


def random_tokens(batch: int, seq: int, vocab: int = 128, seed: int = 42) -> torch.Tensor:
    """[batch, seq + 1] token ids (inputs are [:, :-1], labels [:, 1:])."""
    return torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))


def cp_shard(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This CP rank's load-balanced part of a padded [b, s, ...] tensor: chunks r and 2cp-1-r."""
    from megatron.core import parallel_state as mpu

    cp = mpu.get_context_parallel_world_size()
    if cp == 1:
        return t
    rank = mpu.get_context_parallel_rank()
    parts = t.chunk(2 * cp, dim=dim)
    return torch.cat([parts[rank], parts[2 * cp - 1 - rank]], dim=dim)


def train_losses(config, chunks, tokens: torch.Tensor, steps: int = 2, micro_batch: int = 1, lr: float = 0.5):
    """Mean next-token loss of `tokens` [global_batch, seq+1] for `steps` SGD steps, through megatron's
    DDP, optimizer and pipeline schedule. Returns the per-step losses (same on every rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp = [
        DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=c)
        for c in chunks
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="sgd", lr=lr, weight_decay=0.0, clip_grad=1.0, params_dtype=torch.float32), ddp
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in ddp] if len(ddp) > 1 else ddp[0].no_sync

    dp, dp_rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    per_rank = tokens.size(0) // dp
    local = tokens[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    seq = tokens.size(1) - 1
    num_micro = per_rank // micro_batch
    cp_group = mpu.get_context_parallel_group()

    def batches():
        for i in range(num_micro):
            b = local[i * micro_batch : (i + 1) * micro_batch]
            positions = torch.arange(seq).expand(b.size(0), -1)
            yield cp_shard(b[:, :-1]), cp_shard(b[:, 1:]), cp_shard(positions)

    def forward_step(iterator, model):
        inputs, labels, positions = next(iterator)
        per_token = model(inputs, positions, None, labels=labels)

        def loss_func(output):
            # a CP rank holds part of every sequence: normalise by the tokens of all CP ranks
            count = torch.tensor(float(output.numel()))
            dist.all_reduce(count, group=cp_group)
            loss = output.sum() / count
            reported = loss.detach().clone()
            dist.all_reduce(reported, group=cp_group)
            return loss, {"loss": reported}

        return per_token, loss_func

    losses = []
    for _ in range(steps):
        for m in ddp:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        iterators = [batches() for _ in ddp] if len(ddp) > 1 else batches()
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=ddp if len(ddp) > 1 else ddp[0],
            num_microbatches=num_micro,
            seq_length=seq,
            micro_batch_size=micro_batch,
            forward_only=False,
        )
        optimizer.step()
        value = torch.tensor(0.0)
        if mpu.is_pipeline_last_stage(ignore_virtual=True):
            value = torch.stack([o["loss"] for o in out]).mean()
        # losses live on the last PP stage; average over DP, share with every rank
        dist.all_reduce(value, group=mpu.get_pipeline_model_parallel_group())
        dist.all_reduce(value, group=mpu.get_data_parallel_group())
        losses.append(value.item() / dp)
    config.finalize_model_grads_func = None
    config.no_sync_func = None
    return losses
