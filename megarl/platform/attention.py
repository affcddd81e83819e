"""Pure-torch core attention for megatron-core without TransformerEngine.

megatron's local `DotProductAttention` refuses context parallelism ("Context parallelism is only
supported by TEDotProductAttention!") and packed sequences (`assert packed_seq_params is None`);
both are TE-only upstream. `TorchCoreAttention` is a drop-in core attention (same constructor and
forward signature) that supports:

- context parallelism (CP>1): K/V are all-gathered over the CP group (backward: reduce-scatter, via
  megatron's own `gather_from_sequence_parallel_region`), and every token gets its global position
  back from megatron's load-balanced split (each sequence cut into 2*CP chunks, CP rank r holds
  chunks r and 2*CP-1-r);
- packed THD sequences: a block-diagonal causal mask from `packed_seq_params.cu_seqlens_q(_padded)`
  (tokens attend only within their own sequence), also under CP (each packed sequence is split as
  above, like TE's `thd_get_partitioned_indices`);
- grouped-query attention (num_query_groups < num_attention_heads).

It materialises the [queries, keys] score matrix (O(S^2) memory): a correctness reference for CPU
and tests, not a performance kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


def cp_local_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions within a sequence of global length `seq_len` that CP rank `cp_rank` holds.

    megatron's load-balanced split: 2*cp_size equal chunks, rank r keeps chunks r and 2*cp_size-1-r.
    Returns int64 `[seq_len // cp_size]`.
    """
    if cp_size == 1:
        return torch.arange(seq_len)
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2*CP = {2 * cp_size}")
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(chunk) + cp_rank * chunk
    second = torch.arange(chunk) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])


def packed_local_layout(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence id, position in sequence) of each local token of a packed THD batch.

    `cu_seqlens` `[num_seqs + 1]` are the GLOBAL (padded) boundaries; under CP every sequence is
    split by `cp_local_positions` and the local shards are concatenated in sequence order.
    Returns two int64 tensors `[total_tokens // cp_size]`.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    seq_ids, positions = [], []
    for seq_id, length in enumerate(lengths):
        pos = cp_local_positions(int(length), cp_size, cp_rank)
        positions.append(pos)
        seq_ids.append(torch.full_like(pos, seq_id))
    return torch.cat(seq_ids), torch.cat(positions)


class TorchCoreAttention(MegatronModule):
    """Core attention `softmax(Q K^T * scale + mask) V` with CP, packed THD and GQA.

    Inputs (megatron's core-attention contract), per TP rank and local CP shard:
      sbhd: query `[sq, b, heads/tp, head_dim]`, key/value `[sk, b, groups/tp, head_dim]`
      thd:  query `[t, heads/tp, head_dim]`, key/value `[t, groups/tp, head_dim]`
    Output: `[sq, b, heads/tp * head_dim]` (sbhd) or `[t, heads/tp * head_dim]` (thd).
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"TorchCoreAttention supports softmax_type='vanilla', got {config.softmax_type!r}")
        if config.window_size is not None:
            raise NotImplementedError("TorchCoreAttention does not implement sliding-window attention")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.tp_group = pg_collection.tp
        self.cp_group = pg_collection.cp
        self.cp_size = self.cp_group.size() if self.cp_group is not None else 1
        self.cp_rank = self.cp_group.rank() if self.cp_group is not None else 0
        tp_size = self.tp_group.size()
        self.heads_per_rank = config.num_attention_heads // tp_size
        self.groups_per_rank = config.num_query_groups // tp_size
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("TorchCoreAttention does not support attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"

        if self.cp_size > 1:
            gather = tensor_parallel.gather_from_sequence_parallel_region
            key = gather(key, tensor_parallel_output_grad=True, group=self.cp_group)
            value = gather(value, tensor_parallel_output_grad=True, group=self.cp_group)

        if packed:
            if attention_mask is not None:
                raise NotImplementedError("attention_mask with packed (thd) sequences: the mask comes from cu_seqlens")
            allowed = self._packed_mask(packed_seq_params, query.size(0), causal)
            q, k, v = (t.unsqueeze(0).transpose(1, 2) for t in (query, key, value))  # [1, heads, t, d]
        else:
            allowed = self._sbhd_mask(query.size(0), key.size(0), causal, attention_mask)
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        allowed = allowed.to(query.device)

        if self.heads_per_rank != self.groups_per_rank:
            repeats = self.heads_per_rank // self.groups_per_rank
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        # A query with nothing to attend to (fully masked padding row) attends everywhere
        # instead of producing NaN, like megatron's additive -10000 mask.
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)

        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=self.softmax_scale)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=self.softmax_scale)

        if packed:
            return context.squeeze(0).transpose(0, 1).reshape(query.size(0), -1)  # [t, heads*d]
        sq, batch = query.size(0), query.size(1)
        return context.permute(2, 0, 1, 3).reshape(sq, batch, -1)  # [sq, b, heads*d]

    def _sbhd_mask(self, sq: int, sk: int, causal: bool, attention_mask) -> torch.Tensor:
        """Boolean `[sq, sk]` (or broadcast with the user's `[b, 1, sq, sk]`) mask, True = attend."""
        if self.cp_size > 1 and attention_mask is not None:
            raise NotImplementedError("an explicit attention_mask is not supported with context parallelism")
        allowed = _positional_mask(sq, sk, self.cp_size, self.cp_rank, causal)
        if attention_mask is not None:  # megatron convention: True = masked out
            allowed = allowed.to(attention_mask.device) & ~attention_mask.bool()
        return allowed

    def _packed_mask(self, params, local_tokens: int, causal: bool) -> torch.Tensor:
        """Block-diagonal (causal) `[t_local, t_local * cp]` mask from the packed boundaries."""
        cu_seqlens = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_seqlens = tuple(cu_seqlens.tolist())
        allowed = _packed_block_mask(cu_seqlens, self.cp_size, self.cp_rank, causal)
        if allowed.size(0) != local_tokens:
            raise ValueError(
                f"packed_seq_params describe {allowed.size(0)} local tokens (cu_seqlens {list(cu_seqlens)}, "
                f"CP {self.cp_size}) but the query has {local_tokens}"
            )
        return allowed


# Every layer of a forward pass asks for the same mask: build it once (callers never modify it).
@functools.lru_cache(maxsize=8)
def _positional_mask(sq: int, sk: int, cp_size: int, cp_rank: int, causal: bool) -> torch.Tensor:
    if not causal:
        return torch.ones(sq, sk, dtype=torch.bool)
    if cp_size > 1:
        q_pos = cp_local_positions(sq * cp_size, cp_size, cp_rank)
        k_pos = torch.cat([cp_local_positions(sq * cp_size, cp_size, r) for r in range(cp_size)])
    else:
        q_pos, k_pos = torch.arange(sq), torch.arange(sk)
    return q_pos[:, None] >= k_pos[None, :]


@functools.lru_cache(maxsize=8)
def _packed_block_mask(cu_seqlens: tuple[int, ...], cp_size: int, cp_rank: int, causal: bool) -> torch.Tensor:
    cu = torch.tensor(cu_seqlens)
    q_seq, q_pos = packed_local_layout(cu, cp_size, cp_rank)
    layouts = [packed_local_layout(cu, cp_size, r) for r in range(cp_size)]
    k_seq = torch.cat([seq for seq, _ in layouts])
    k_pos = torch.cat([pos for _, pos in layouts])
    allowed = q_seq[:, None] == k_seq[None, :]
    if causal:
        allowed = allowed & (q_pos[:, None] >= k_pos[None, :])
    return allowed
