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


def make_trainer(config, chunks, optimizer: str = "sgd", lr: float = 0.5, distributed_optimizer: bool = False):
    """megatron DDP wrappers + megatron optimizer for the model chunks: (ddp_chunks, optimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer)
    ddp = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c) for c in chunks]
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer=optimizer, lr=lr, weight_decay=0.0, clip_grad=1.0, params_dtype=torch.float32,
                        use_distributed_optimizer=distributed_optimizer),
        ddp,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in ddp] if len(ddp) > 1 else ddp[0].no_sync
    return ddp, opt


def train_losses(config, ddp, optimizer, tokens: torch.Tensor, steps: int = 2, micro_batch: int = 1):
    """Mean next-token loss of `tokens` [global_batch, seq+1] at each of `steps` optimizer steps,
    through megatron's pipeline schedule. Returns the per-step losses (same on every rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

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
    return losses


def build_and_train(layout, steps: int = 2, num_layers: int = 2, **config_kwargs) -> list[float]:
    """Build the tiny GPT for `layout` (parallel state already initialised), init, train: losses."""
    config = tiny_config(layout, num_layers=num_layers, **config_kwargs)
    chunks = build_tiny_gpt(config)
    deterministic_init(chunks)
    ddp, optimizer = make_trainer(config, chunks)
    return train_losses(config, ddp, optimizer, random_tokens(4, 16), steps=steps)


def _cp_gather_objects(obj):
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    group = mpu.get_context_parallel_group()
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


@torch.no_grad()
def packed_vs_padded_max_diff(
    chunks, lengths: list[int], pad_packed_to: int = 1, vocab: int = 128, seed: int = 7, ignore_boundaries: bool = False
) -> float:
    """Max |per-token loss (packed THD) - per-token loss (right-padded [b, s])| over real tokens.

    Sequences of `lengths` are run once as a padded batch and once packed into one THD row (each
    sequence padded to a multiple of `pad_packed_to`, as CP requires: 2*CP). Under CP every rank
    holds its load-balanced part of both forms; values are compared by (sequence, position).
    PP=1 only (one chunk). `ignore_boundaries` (negative control, CP1): run the packed row as one
    long causal sequence, without packed_seq_params.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.packed_seq_params import PackedSeqParams

    from megarl.platform.attention import cp_local_positions, packed_local_layout

    (model,) = chunks
    model.eval()
    cp, cp_rank = mpu.get_context_parallel_world_size(), mpu.get_context_parallel_rank()
    generator = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n + 1,), generator=generator) for n in lengths]

    # padded [b, s]: s a multiple of 2*cp (and of tp for sequence parallelism)
    multiple = 2 * cp * mpu.get_tensor_model_parallel_world_size()
    s = -(-max(lengths) // multiple) * multiple
    tokens = torch.zeros(len(seqs), s + 1, dtype=torch.long)
    for i, seq in enumerate(seqs):
        tokens[i, : seq.numel()] = seq
    positions = torch.arange(s).expand(len(seqs), -1)
    padded = model(cp_shard(tokens[:, :-1]), cp_shard(positions), None, labels=cp_shard(tokens[:, 1:]))  # [b, s/cp]
    local_pos = cp_local_positions(s, cp, cp_rank)
    padded_values = {(i, int(p)): float(padded[i, j]) for i in range(len(seqs)) for j, p in enumerate(local_pos)}

    # packed [1, t]: sequence i occupies a slot of padded length L_i
    slots = [-(-n // pad_packed_to) * pad_packed_to for n in lengths]
    slot_starts = [0]
    for n in slots:
        slot_starts.append(slot_starts[-1] + n)
    packed_in = torch.zeros(slot_starts[-1], dtype=torch.long)
    packed_labels = torch.zeros(slot_starts[-1], dtype=torch.long)
    for i, seq in enumerate(seqs):
        packed_in[slot_starts[i] : slot_starts[i] + lengths[i]] = seq[:-1]
        packed_labels[slot_starts[i] : slot_starts[i] + lengths[i]] = seq[1:]
    cu_padded = torch.tensor(slot_starts, dtype=torch.int32)
    cu_actual = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    seq_ids, seq_pos = packed_local_layout(cu_padded, cp, cp_rank)
    index = cu_padded[seq_ids].long() + seq_pos
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_actual,
        cu_seqlens_kv=cu_actual,
        cu_seqlens_q_padded=cu_padded if pad_packed_to > 1 else None,
        cu_seqlens_kv_padded=cu_padded if pad_packed_to > 1 else None,
        max_seqlen_q=max(slots),
        max_seqlen_kv=max(slots),
    )
    if ignore_boundaries:
        params, positions = None, torch.arange(index.numel())[None]
    else:
        positions = seq_pos[None]
    packed = model(packed_in[index][None], positions, None, labels=packed_labels[index][None], packed_seq_params=params)[0]
    packed_values = {(int(i), int(p)): float(v) for i, p, v in zip(seq_ids, seq_pos, packed)}

    all_padded, all_packed = {}, {}
    for part in _cp_gather_objects(padded_values):
        all_padded.update(part)
    for part in _cp_gather_objects(packed_values):
        all_packed.update(part)
    model.train()
    real = [(i, p) for i, n in enumerate(lengths) for p in range(n)]
    assert all(key in all_packed and key in all_padded for key in real)
    return max(abs(all_packed[key] - all_padded[key]) for key in real)
