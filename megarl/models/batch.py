"""Batches of token sequences for the Megatron actor: padded and packed (THD) layouts, micro-batch
plans balanced across data-parallel ranks, and megatron's load-balanced context-parallel split.

Conventions (shared with the trainer and the losses):
- A `SequenceBatch` holds B sequences of unequal length, right-padded to `[B, S]`. Every per-token
  field (loss_mask, old_logprobs, advantages, ...) is a float tensor `[B, S]` aligned with
  `input_ids`: `field[b, t]` belongs to token `input_ids[b, t]`; padding positions hold 0.
- Log-probs are aligned the same way: `logprobs[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`
  in nats for 1 <= t < length[b]; position 0 (no context) and padding are 0.

The model sees next-token targets instead (`labels[p] = token[p + 1]` within a sequence), because
under context parallelism the logits of position t-1 and the token at t may sit on different ranks.
`MicroBatch` converts between the two: `model_inputs()` gives the CP-local model inputs and labels,
`aligned()` turns full next-token values back into the `[b, S]` token-aligned form above.

Every rank holds the same global batch; the plan (which sequences go to which DP rank and micro-batch)
is a pure function of the lengths, so all ranks compute the same plan without communicating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

PAD_TOKEN_ID = 0  # any valid id: padded positions never influence real tokens (causal) and are masked


@dataclass
class SequenceBatch:
    """B sequences, right-padded. input_ids `[B, S]` long, lengths `[B]`, fields name -> `[B, S]` float."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    fields: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(self.input_ids.shape)}")
        self.input_ids = self.input_ids.long()
        self.lengths = torch.as_tensor(self.lengths, dtype=torch.long).reshape(-1)
        batch, width = self.input_ids.shape
        if self.lengths.numel() != batch:
            raise ValueError(f"lengths has {self.lengths.numel()} entries for {batch} sequences")
        if batch and (self.lengths.min() < 1 or self.lengths.max() > width):
            raise ValueError(f"sequence lengths must be in [1, {width}], got {self.lengths.tolist()}")
        for name, value in self.fields.items():
            if tuple(value.shape) != (batch, width):
                raise ValueError(f"field {name!r} has shape {tuple(value.shape)}, expected {(batch, width)}")

    @classmethod
    def from_sequences(
        cls, sequences: Sequence[Sequence[int]], **fields: Sequence[Sequence[float]]
    ) -> "SequenceBatch":
        """From token id lists and per-token value lists of the same lengths."""
        if not sequences:
            raise ValueError("a batch needs at least one sequence")
        lengths = [len(s) for s in sequences]
        width = max(lengths)
        input_ids = torch.full((len(sequences), width), PAD_TOKEN_ID, dtype=torch.long)
        for i, seq in enumerate(sequences):
            input_ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        padded = {}
        for name, values in fields.items():
            if len(values) != len(sequences):
                raise ValueError(f"field {name!r} has {len(values)} rows for {len(sequences)} sequences")
            out = torch.zeros(len(sequences), width, dtype=torch.float32)
            for i, row in enumerate(values):
                row = torch.as_tensor(row, dtype=torch.float32).reshape(-1)
                if row.numel() != lengths[i]:
                    raise ValueError(f"field {name!r} row {i} has {row.numel()} values for {lengths[i]} tokens")
                out[i, : lengths[i]] = row
            padded[name] = out
        return cls(input_ids, torch.tensor(lengths), padded)

    @classmethod
    def from_padded(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, **fields: torch.Tensor):
        """From right-padded `[B, S]` ids and a 0/1 mask; fields are `[B, S]` and zeroed at padding."""
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1)
        expected = torch.arange(mask.size(1))[None, :] < lengths[:, None]
        if not torch.equal(mask, expected):
            raise ValueError("attention_mask must be right-padded (ones then zeros in every row)")
        fields = {k: v.float() * expected for k, v in fields.items()}
        return cls(input_ids.masked_fill(~expected, PAD_TOKEN_ID), lengths, fields)

    def __len__(self) -> int:
        return self.input_ids.size(0)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def token_mask(self) -> torch.Tensor:
        """`[B, S]` bool, True at real (non-padding) tokens."""
        return torch.arange(self.input_ids.size(1))[None, :] < self.lengths[:, None]

    def select(self, indices: Sequence[int]) -> "SequenceBatch":
        """The given rows, re-padded to their own longest length."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        lengths = self.lengths[idx]
        width = int(lengths.max()) if idx.numel() else 1
        return SequenceBatch(
            self.input_ids[idx, :width], lengths, {k: v[idx, :width] for k, v in self.fields.items()}
        )

    def with_fields(self, **fields: torch.Tensor) -> "SequenceBatch":
        return SequenceBatch(self.input_ids, self.lengths, {**self.fields, **fields})

    def to(self, device) -> "SequenceBatch":
        """The same batch with every tensor on `device` (no copy when already there)."""
        return SequenceBatch(
            self.input_ids.to(device), self.lengths.to(device), {k: v.to(device) for k, v in self.fields.items()}
        )


# ---------------------------------------------------------------------------------------------
# Planning: which sequences go to which DP rank and micro-batch.


def sequence_alignment(cp_size: int = 1, tp_size: int = 1, sequence_parallel: bool = False) -> int:
    """Length every (packed) sequence or padded row is padded to a multiple of.

    CP splits a sequence into 2*cp equal chunks; sequence parallelism splits each CP-local piece
    across TP ranks. Both must divide evenly.
    """
    align = 2 * cp_size if cp_size > 1 else 1
    return align * (tp_size if sequence_parallel and tp_size > 1 else 1)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def balanced_partition(costs: Sequence[int], parts: int, max_items: int | None = None) -> list[list[int]]:
    """Split item indices into `parts` groups with near-equal total cost (longest-first greedy).

    Each group gets at most `max_items` items when given; groups keep ascending index order.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if max_items is not None and max_items * parts < len(costs):
        raise ValueError(f"{len(costs)} items do not fit in {parts} groups of at most {max_items}")
    groups: list[list[int]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        open_groups = [g for g in range(parts) if max_items is None or len(groups[g]) < max_items]
        g = min(open_groups, key=lambda g: (totals[g], len(groups[g]), g))
        groups[g].append(i)
        totals[g] += costs[i]
    return [sorted(g) for g in groups]


@dataclass(frozen=True)
class MicroBatchPlan:
    """`assignment[dp_rank][micro_batch]` = indices into the global batch. Same number of
    micro-batches on every DP rank (the EP all-to-alls and the pipeline schedule need that)."""

    assignment: list[list[list[int]]]

    @property
    def num_micro_batches(self) -> int:
        return len(self.assignment[0])

    def for_rank(self, dp_rank: int) -> list[list[int]]:
        return self.assignment[dp_rank]


def plan_micro_batches(
    lengths: Sequence[int],
    dp_size: int,
    *,
    micro_batch_size: int | None = None,
    max_tokens: int | None = None,
    align: int = 1,
    group_size: int = 1,
) -> MicroBatchPlan:
    """Balanced DP split, then micro-batches by count (`micro_batch_size` sequences) or by token
    budget (`max_tokens`: sum of aligned sequence lengths per micro-batch, before any CP split).

    `group_size` > 1 keeps each run of `group_size` consecutive sequences together, in order, in one
    micro-batch (DPO: chosen and rejected of a pair); `micro_batch_size` then counts groups.
    Every micro-batch is non-empty; raises ValueError when the batch is too small for that.
    """
    if group_size > 1:
        if len(lengths) % group_size:
            raise ValueError(f"{len(lengths)} sequences do not form groups of {group_size}")
        costs = [round_up(int(length), align) for length in lengths]
        group_costs = [sum(costs[g * group_size:(g + 1) * group_size]) for g in range(len(lengths) // group_size)]
        plan = plan_micro_batches(group_costs, dp_size, micro_batch_size=micro_batch_size, max_tokens=max_tokens)
        return MicroBatchPlan([
            [[g * group_size + k for g in sorted(mb) for k in range(group_size)] for mb in rank]
            for rank in plan.assignment
        ])
    if (micro_batch_size is None) == (max_tokens is None):
        raise ValueError("give exactly one of micro_batch_size (sequences) or max_tokens (token budget)")
    n = len(lengths)
    if n < dp_size:
        raise ValueError(f"{n} sequences cannot feed {dp_size} data-parallel ranks; send at least {dp_size}")
    costs = [round_up(int(length), align) for length in lengths]
    if micro_batch_size is not None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        per_rank = balanced_partition(costs, dp_size, max_items=math.ceil(n / dp_size))
        num_mb = max(math.ceil(len(r) / micro_batch_size) for r in per_rank)
        return MicroBatchPlan(
            [_split_rank(r, costs, num_mb, max_items=micro_batch_size) for r in per_rank]
        )
    too_long = [i for i, c in enumerate(costs) if c > max_tokens]
    if too_long:
        raise ValueError(
            f"sequences {too_long[:5]} are longer than the token budget {max_tokens} "
            f"(aligned lengths {[costs[i] for i in too_long[:5]]}); raise max_tokens"
        )
    per_rank = balanced_partition(costs, dp_size)
    num_mb = max(math.ceil(sum(costs[i] for i in r) / max_tokens) for r in per_rank)
    while True:
        if num_mb > min(len(r) for r in per_rank):
            raise ValueError(
                f"cannot give every DP rank {num_mb} non-empty micro-batches within {max_tokens} tokens; "
                f"raise max_tokens or send more sequences"
            )
        split = [_split_rank(r, costs, num_mb) for r in per_rank]
        if all(sum(costs[i] for i in mb) <= max_tokens for rank in split for mb in rank):
            return MicroBatchPlan(split)
        num_mb += 1


def _split_rank(indices: list[int], costs: Sequence[int], parts: int, max_items: int | None = None):
    if len(indices) < parts:
        raise ValueError(
            f"a data-parallel rank got {len(indices)} sequences for {parts} micro-batches; "
            "send more sequences or use larger micro-batches"
        )
    groups = balanced_partition([costs[i] for i in indices], parts, max_items=max_items)
    return [[indices[j] for j in g] for g in groups]


# ---------------------------------------------------------------------------------------------
# Layout of one micro-batch for the model.


def context_parallel_index(seq_lengths: Sequence[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions (in the flat full layout) that CP rank `cp_rank` holds, in its local order.

    Megatron's load-balanced split, applied per sequence (as TransformerEngine does for THD): each
    sequence of length L (divisible by 2*cp) is cut into 2*cp chunks; rank r keeps chunks r and
    2*cp-1-r, so every rank gets an equal share of cheap early and costly late causal positions.
    """
    if cp_size == 1:
        return torch.arange(sum(seq_lengths))
    pieces, offset = [], 0
    for length in seq_lengths:
        if length % (2 * cp_size):
            raise ValueError(f"sequence length {length} is not divisible by 2*cp={2 * cp_size}")
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(offset + c * chunk, offset + (c + 1) * chunk))
        offset += length
    return torch.cat(pieces)


@dataclass
class MicroBatch:
    """Sequences `indices` of the global batch, laid out for one model forward.

    padded: tokens `[b, S_pad]`, every row padded to S_pad (multiple of the alignment);
    packed: tokens `[1, T]`, sequence i occupies `cu_seqlens[i]:cu_seqlens[i+1]` (its length padded
    to the alignment), positions restart at 0 per sequence.
    `sequences` is the same data token-aligned (`[b, max_len]`), as handed to loss functions.
    """

    indices: list[int]
    sequences: SequenceBatch
    packed: bool
    tokens: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor  # next-token targets in the layout of `tokens` (0 where there is none)
    padding: torch.Tensor  # bool, layout of `tokens`: True where no real token is (MoE router losses skip it)
    cu_seqlens: torch.Tensor | None  # [b + 1] int32, packed only (padded boundaries)
    row_lengths: list[int]  # layout length of each row (padded) or sequence (packed)
    source_index: torch.Tensor  # [b, max_len] flat layout position whose next-token value is token t's
    source_valid: torch.Tensor  # [b, max_len] bool: t >= 1 and t < length

    @classmethod
    def build(cls, batch: SequenceBatch, indices: Sequence[int], *, packed: bool, align: int = 1):
        seqs = batch.select(indices)
        lengths = seqs.lengths.tolist()
        b, width = seqs.input_ids.shape
        t = torch.arange(width)
        valid = (t[None, :] >= 1) & (t[None, :] < seqs.lengths[:, None])
        if packed:
            row_lengths = [round_up(n, align) for n in lengths]
            starts = [0]
            for n in row_lengths:
                starts.append(starts[-1] + n)
            total = starts[-1]
            tokens = torch.full((1, total), PAD_TOKEN_ID, dtype=torch.long)
            positions = torch.zeros(1, total, dtype=torch.long)
            padding = torch.ones(1, total, dtype=torch.bool)
            for i, n in enumerate(lengths):
                tokens[0, starts[i] : starts[i] + n] = seqs.input_ids[i, :n]
                padding[0, starts[i] : starts[i] + n] = False
                positions[0, starts[i] : starts[i + 1]] = torch.arange(row_lengths[i])
            row_start = torch.tensor(starts[:-1])
            cu_seqlens = torch.tensor(starts, dtype=torch.int32)
        else:
            padded_width = round_up(width, align)
            row_lengths = [padded_width] * b
            tokens = torch.full((b, padded_width), PAD_TOKEN_ID, dtype=torch.long)
            tokens[:, :width] = seqs.input_ids
            positions = torch.arange(padded_width).expand(b, -1).contiguous()
            padding = positions >= seqs.lengths[:, None]
            row_start = torch.arange(b) * padded_width
            cu_seqlens = None
        # value for token t comes from the logits at position t-1 of the same sequence
        source_index = (row_start[:, None] + t[None, :] - 1).clamp(min=0) * valid
        flat_labels = torch.zeros(tokens.numel(), dtype=torch.long)
        flat_labels[source_index[valid]] = seqs.input_ids[valid]
        return cls(
            indices=list(indices), sequences=seqs, packed=packed, tokens=tokens, positions=positions,
            labels=flat_labels.view_as(tokens), padding=padding, cu_seqlens=cu_seqlens, row_lengths=row_lengths,
            source_index=source_index, source_valid=valid,
        )

    @property
    def num_layout_tokens(self) -> int:
        return self.tokens.numel()

    def cp_index(self, cp_size: int, cp_rank: int) -> torch.Tensor:
        """Positions along the layout's sequence dim held by `cp_rank` (same for every padded row)."""
        lengths = self.row_lengths if self.packed else self.row_lengths[:1]
        return context_parallel_index(lengths, cp_size, cp_rank)

    def model_inputs(self, cp_size: int = 1, cp_rank: int = 0, device=None) -> dict:
        """CP-local `input_ids`, `position_ids`, `labels`, `padding_mask` (`[b, s_local]`) and, when
        packed, the THD `packed_seq_params` fields (`cu_seqlens`, `max_seqlen`) over the full sequences."""
        idx = self.cp_index(cp_size, cp_rank)
        out = {
            "input_ids": self.tokens[:, idx].to(device).contiguous(),
            "position_ids": self.positions[:, idx].to(device).contiguous(),
            "labels": self.labels[:, idx].to(device).contiguous(),
            "padding_mask": self.padding[:, idx].to(device).contiguous(),
        }
        if self.packed:
            out["cu_seqlens"] = self.cu_seqlens.to(device)
            out["max_seqlen"] = max(self.row_lengths)
        return out

    def aligned(self, layout_values: torch.Tensor) -> torch.Tensor:
        """Full next-token values `[rows, s_layout]` (logits position p scored at labels[p]) ->
        token-aligned `[b, max_len]` (value of token t from position t-1; 0 at t=0 and padding).
        Differentiable."""
        flat = layout_values.reshape(-1)
        index, valid = self.source_index.to(flat.device), self.source_valid.to(flat.device, flat.dtype)
        return flat[index] * valid
