"""Parallel layout (TP/PP/VPP/EP/ETP/CP) of a megatron model, and its validation.

`validate_layout` runs before any process group or model exists and raises `LayoutError` with a
message that says what to change; the rules are megatron-core 0.16.1's own
(parallel_state.initialize_model_parallel, TransformerConfig.__post_init__, MoELayer), stated up
front instead of surfacing as an assert deep in model construction or a hang in a collective.

Rank grid (megatron's default order "tp-cp-ep-dp-pp"):
  dense part:  world = TP x CP x DP x PP
  expert part: world = ETP x EP x EDP x PP   (same PP groups; EP spans the TP x CP x DP ranks of
               a pipeline stage, so ETP x EP must divide world / PP)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping


class LayoutError(ValueError):
    """A parallel layout that cannot work for this world size, model or sequence length."""


@dataclass(frozen=True)
class ParallelLayout:
    """Parallel sizes. `etp=None` means ETP = TP (megatron's default); `sequence_parallel=None`
    means on whenever TP > 1; `vpp` is the number of virtual pipeline chunks per PP rank."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int | None = None
    cp: int = 1
    sequence_parallel: bool | None = None
    num_layers_in_last_pipeline_stage: int | None = None

    @classmethod
    def from_config(cls, parallel) -> "ParallelLayout":
        """From megarl.config's ParallelConfig (recompute is a model setting, not a layout)."""
        return cls(tp=parallel.tp, pp=parallel.pp, vpp=parallel.vpp, ep=parallel.ep, etp=parallel.etp,
                   cp=parallel.cp, sequence_parallel=parallel.sequence_parallel,
                   num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage)

    @property
    def expert_tensor_parallel_size(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def uses_sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else bool(self.sequence_parallel)

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one replica of the dense part: TP x PP x CP."""
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        """Replicas of the dense part: world / (TP x PP x CP)."""
        return world_size // self.model_parallel_size

    def expert_data_parallel_size(self, world_size: int) -> int:
        """Replicas of each expert: world / (ETP x EP x PP)."""
        return world_size // (self.expert_tensor_parallel_size * self.ep * self.pp)

    def describe(self) -> str:
        parts = [f"tp={self.tp}", f"pp={self.pp}"]
        if self.vpp:
            parts.append(f"vpp={self.vpp}")
        parts += [f"cp={self.cp}", f"ep={self.ep}", f"etp={self.expert_tensor_parallel_size}"]
        if self.uses_sequence_parallel:
            parts.append("sp")
        return " ".join(parts)


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The model dimensions a layout has to divide."""

    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    num_experts: int = 0
    hidden_size: int
    vocab_size: int

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelShape":
        """From a transformers config (object or dict) of Qwen2 / Qwen3 / Qwen3-MoE style models."""
        get = cfg.get if isinstance(cfg, Mapping) else (lambda key, default=None: getattr(cfg, key, default))
        missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size") if get(k) is None]
        if missing:
            raise ValueError(f"HF config (model_type={get('model_type')!r}) lacks {missing}")
        heads = int(get("num_attention_heads"))
        return cls(
            num_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            num_experts=int(get("num_experts") or get("num_local_experts") or 0),
            hidden_size=int(get("hidden_size")),
            vocab_size=int(get("vocab_size")),
        )


def _check_sizes(layout: ParallelLayout) -> None:
    for name in ("tp", "pp", "ep", "cp"):
        value = getattr(layout, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LayoutError(f"{name} must be a positive integer, got {value!r}")
    for name in ("vpp", "etp", "num_layers_in_last_pipeline_stage"):
        value = getattr(layout, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise LayoutError(f"{name} must be None or a positive integer, got {value!r}")


def _check_world(layout: ParallelLayout, world_size: int) -> None:
    if world_size % layout.model_parallel_size:
        raise LayoutError(
            f"world size {world_size} is not divisible by TP x PP x CP = {layout.tp} x {layout.pp} x {layout.cp} "
            f"= {layout.model_parallel_size}: use a world size that is a multiple of {layout.model_parallel_size}, "
            f"or change tp/pp/cp so that their product divides {world_size}"
        )
    expert_grid = layout.expert_tensor_parallel_size * layout.ep
    if (world_size // layout.pp) % expert_grid:
        raise LayoutError(
            f"ETP x EP = {layout.expert_tensor_parallel_size} x {layout.ep} = {expert_grid} does not divide the "
            f"{world_size // layout.pp} ranks of a pipeline stage (world {world_size} / PP {layout.pp}): megatron "
            f"lays experts out as world = ETP x EP x expert-DP x PP; choose ep/etp whose product divides "
            f"{world_size // layout.pp}"
        )


def _check_attention(layout: ParallelLayout, shape: ModelShape) -> None:
    if shape.num_attention_heads % layout.tp:
        raise LayoutError(
            f"{shape.num_attention_heads} attention heads are not divisible by TP={layout.tp}: "
            f"use a tp that divides {shape.num_attention_heads}"
        )
    if shape.num_kv_heads % layout.tp:
        raise LayoutError(
            f"{shape.num_kv_heads} KV heads (query groups) are not divisible by TP={layout.tp}: megatron "
            f"splits whole query groups over TP; use a tp that divides {shape.num_kv_heads}"
        )


def _check_experts(layout: ParallelLayout, shape: ModelShape) -> None:
    if not shape.is_moe:
        if layout.ep > 1:
            raise LayoutError(f"EP={layout.ep} needs a mixture-of-experts model; this model is dense: set ep=1")
        return
    if shape.num_experts % layout.ep:
        raise LayoutError(
            f"{shape.num_experts} experts are not divisible by EP={layout.ep}: use an ep that divides "
            f"{shape.num_experts}"
        )
    if layout.tp > 1 and layout.sequence_parallel is False:
        raise LayoutError(
            f"MoE with TP={layout.tp} requires sequence parallelism (megatron's MoELayer refuses to train "
            f"otherwise): set sequence_parallel=True (or leave it unset)"
        )


def _check_pipeline(layout: ParallelLayout, shape: ModelShape) -> None:
    pp, vpp, last = layout.pp, layout.vpp, layout.num_layers_in_last_pipeline_stage
    if vpp is not None and pp == 1:
        raise LayoutError(f"vpp={vpp} (interleaved pipeline) needs pp > 1: set pp >= 2 or vpp=None")
    if last is not None and pp == 1:
        raise LayoutError("num_layers_in_last_pipeline_stage needs pp > 1: set pp >= 2 or leave it unset")
    chunks = vpp or 1
    if last is None:
        if shape.num_layers % pp:
            raise LayoutError(
                f"{shape.num_layers} layers cannot be split evenly over PP={pp}: use a pp that divides "
                f"{shape.num_layers}, or set num_layers_in_last_pipeline_stage"
            )
        if (shape.num_layers // pp) % chunks:
            raise LayoutError(
                f"{shape.num_layers // pp} layers per pipeline rank cannot be split into VPP={chunks} chunks: "
                f"num_layers must be divisible by pp x vpp = {pp * chunks}"
            )
        return
    rest, middle_stages = shape.num_layers - last, pp - 1
    if last >= shape.num_layers:
        raise LayoutError(
            f"num_layers_in_last_pipeline_stage={last} leaves no layers for the other {pp - 1} stage(s) "
            f"of {shape.num_layers}"
        )
    if rest % middle_stages:
        raise LayoutError(
            f"with num_layers_in_last_pipeline_stage={last}, the remaining {rest} layers cannot be split evenly "
            f"over the other {middle_stages} pipeline stage(s): choose it so that num_layers - it is divisible by {middle_stages}"
        )
    if last % chunks or (rest // middle_stages) % chunks:
        raise LayoutError(
            f"with VPP={chunks}, every pipeline stage's layer count must be divisible by {chunks}: last stage has "
            f"{last}, the others {rest // middle_stages}"
        )


def _check_sequence(layout: ParallelLayout, seq_length: int) -> None:
    if layout.cp > 1 and seq_length % (2 * layout.cp):
        raise LayoutError(
            f"sequence length {seq_length} is not divisible by 2 x CP = {2 * layout.cp} (megatron splits each "
            f"sequence into 2 x CP load-balanced chunks): pad sequences to a multiple of {2 * layout.cp}"
        )
    if layout.uses_sequence_parallel and (seq_length // layout.cp) % layout.tp:
        raise LayoutError(
            f"sequence parallelism splits each CP rank's {seq_length // layout.cp} tokens over TP={layout.tp}: "
            f"pad sequences to a multiple of {math.lcm(layout.tp * layout.cp, 2 * layout.cp if layout.cp > 1 else 1)}"
        )


def validate_layout(
    layout: ParallelLayout, world_size: int, shape: ModelShape | None = None, seq_length: int | None = None
) -> None:
    """Raise LayoutError (what to change) unless `layout` runs `shape` on `world_size` ranks.

    Without `shape` only the sizes and the rank grid are checked; `seq_length` (tokens per padded
    sequence, or per packed micro-batch) is checked when given.
    """
    _check_sizes(layout)
    if layout.sequence_parallel and layout.tp == 1:
        raise LayoutError("sequence_parallel=True needs TP > 1: set tp >= 2 or sequence_parallel=None")
    _check_world(layout, world_size)
    if shape is not None:
        if layout.etp is not None and not shape.is_moe and layout.etp != layout.tp:
            raise LayoutError(f"etp={layout.etp} only applies to mixture-of-experts models: leave etp unset")
        _check_attention(layout, shape)
        _check_experts(layout, shape)
        _check_pipeline(layout, shape)
    if seq_length is not None:
        _check_sequence(layout, seq_length)
